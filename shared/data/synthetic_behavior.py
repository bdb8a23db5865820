"""A synthetic population of interaction logs with known latent tastes.

The generative story (so tests and simulations know what can be learned, and by whom):

- **Catalog**: ``num_items`` items in ``num_genres`` genres; popularity is Zipf-skewed
  over a random ranking. The *public* population (pre-training the base) uses another
  ranking: last season's trends, which the federation has to learn anew.
- **Clusters**: each user belongs to one of ``num_clusters`` taste clusters (a genre
  distribution concentrated on a few genres); the profile's ``region`` attribute agrees
  with the cluster 70% of the time, ``age`` is noise.
- **Individual drift**: each user's genre mix is their cluster's mixed with a personal
  Dirichlet draw, and each user has a handful of personal favourites re-consumed often.
  The favourites are what only the personal part can learn well.
- **Sequences**: the next event stays in the previous genre with probability
  ``stickiness`` (what a sequence model learns from context), re-plays a favourite with
  probability ``p_favourite``, else draws a genre from the user's mix; items within a genre
  follow popularity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

EVENTS = ("view", "click", "purchase", "play")
_REGIONS = ("north", "south", "east", "west", "coast", "hills", "city", "plains")
_AGES = ("18-24", "25-34", "35-49", "50+")


@dataclasses.dataclass(frozen=True)
class World:
    num_items: int = 400
    num_genres: int = 10
    num_clusters: int = 8
    zipf: float = 0.9
    stickiness: float = 0.45
    p_favourite: float = 0.3
    num_favourites: int = 8


def item_id(i: int) -> str:
    return f"i{i:04d}"


def catalog(world: World, seed: int) -> list[dict[str, str]]:
    """Item ids, titles and genres (public information, shipped with the base model)."""
    genres = _genres(world, seed)
    return [{"item": item_id(i), "title": f"Title {i} ({_genre_name(g)})", "genre": _genre_name(g)}
            for i, g in enumerate(genres)]


def _genre_name(g: int) -> str:
    return f"genre-{g:02d}"


def _genres(world: World, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).integers(0, world.num_genres, world.num_items)


def _popularity(world: World, seed: int, *, public: bool) -> np.ndarray:
    rank = np.random.default_rng([seed, 2, int(public)]).permutation(world.num_items)
    return 1.0 / (rank + 1.0) ** world.zipf


def _cluster_tastes(world: World, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 3])
    return rng.dirichlet(np.full(world.num_genres, 0.3), size=world.num_clusters)


def users(*, num_users: int, events_per_user: tuple[int, int], seed: int, world: World = World(),
          public: bool = False) -> dict[str, tuple[list[dict], dict[str, str]]]:
    """Generate ``{name: (events, profile)}``; events are dicts in timestamp order."""
    return dict(iter_users(num_users=num_users, events_per_user=events_per_user, seed=seed, world=world,
                           public=public))


@dataclasses.dataclass(frozen=True)
class Taste:
    """A user's latent taste, drawn before any of their events: their cluster, genre mix and
    favourites (item indices; a favourite may repeat)."""

    cluster: int
    mix: np.ndarray
    favourites: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Story:
    """The generative story of one population, with what each user's events are drawn from:
    ``genres`` per item, ``within`` (each item's share of its genre's popularity) and the
    clusters' genre mixes."""

    world: World
    genres: np.ndarray
    within: np.ndarray
    tastes: np.ndarray
    members: tuple[tuple[np.ndarray, np.ndarray], ...]  # per genre: its items, their within-genre shares

    @classmethod
    def of(cls, world: World, seed: int, *, public: bool = False) -> Story:
        genres = _genres(world, seed)
        pop = _popularity(world, seed, public=public)
        members = []
        for g in range(world.num_genres):
            idx = np.flatnonzero(genres == g)
            members.append((idx, pop[idx] / pop[idx].sum() if idx.size else idx.astype(float)))
        within = np.zeros(world.num_items)
        for idx, share in members:
            within[idx] = share
        return cls(world=world, genres=genres, within=within, tastes=_cluster_tastes(world, seed),
                   members=tuple(members))

    def pick(self, rng: np.random.Generator, g: int) -> int:
        """One item of genre ``g``, drawn by popularity."""
        items, share = self.members[g]
        return int(rng.choice(items, p=share))

    def draw_taste(self, rng: np.random.Generator) -> Taste:
        w = self.world
        cluster = int(rng.integers(w.num_clusters))
        mix = 0.6 * self.tastes[cluster] + 0.4 * rng.dirichlet(np.full(w.num_genres, 0.5))
        mix = np.where([items.size > 0 for items, _ in self.members], mix, 0.0)
        mix /= mix.sum()
        favourite_genres = rng.choice(w.num_genres, size=w.num_favourites, p=mix)
        favourites = tuple(self.pick(rng, int(g)) for g in favourite_genres)
        return Taste(cluster=cluster, mix=mix, favourites=favourites)

    def next_item(self, taste: Taste, previous: int, *, within: np.ndarray | None = None) -> np.ndarray:
        """P(next item | the previous one) over the catalog, as ``iter_users`` draws it: a
        favourite with ``p_favourite``, the previous item's genre with ``stickiness``, else a
        genre from the user's mix; within a genre by popularity (``within``: another
        population's, e.g. the public one's, to ask what knowing it is worth)."""
        replayed = np.bincount(np.asarray(taste.favourites), minlength=self.world.num_items) / len(taste.favourites)
        return self.next_item_given(replayed, taste.mix, previous, within=within)

    def next_item_given(self, replayed: np.ndarray, mix: np.ndarray, previous: int, *,
                        within: np.ndarray | None = None) -> np.ndarray:
        """The same story with any estimate of a taste: ``replayed``, which item a re-play picks
        (a distribution over the catalog), and ``mix``, the genre mix."""
        w = self.world
        within = self.within if within is None else within
        genre = (self.genres == self.genres[previous]) * w.stickiness
        return w.p_favourite * replayed + within * (genre + mix[self.genres] * (1.0 - w.p_favourite - w.stickiness))


def latent_tastes(*, num_users: int, seed: int, world: World = World(), public: bool = False) -> list[Taste]:
    """Each user's taste as ``iter_users`` draws it (the same per-user random stream)."""
    story = Story.of(world, seed, public=public)
    return [story.draw_taste(np.random.default_rng([seed, 4, int(public), u])) for u in range(num_users)]


def iter_users(*, num_users: int, events_per_user: tuple[int, int], seed: int, world: World = World(),
               public: bool = False) -> Iterator[tuple[str, tuple[list[dict], dict[str, str]]]]:
    """``users`` one user at a time (the same users): a population of 100,000 users with
    hundreds of events each is gigabytes as Python objects, one user is kilobytes."""
    story = Story.of(world, seed, public=public)
    prefix = "public" if public else "user"
    for u in range(num_users):
        rng = np.random.default_rng([seed, 4, int(public), u])
        taste = story.draw_taste(rng)
        favourites = taste.favourites
        n = int(rng.integers(events_per_user[0], events_per_user[1] + 1))
        ts = 1_700_000_000 + int(rng.integers(0, 10**6))
        genre = int(rng.choice(world.num_genres, p=taste.mix))
        events = []
        for _ in range(n):
            draw = rng.random()
            if draw < world.p_favourite:
                item = favourites[int(rng.integers(len(favourites)))]
            else:
                if draw > world.p_favourite + world.stickiness:
                    genre = int(rng.choice(world.num_genres, p=taste.mix))
                item = story.pick(rng, genre)
            genre = int(story.genres[item])
            ts += int(rng.exponential(3600)) + 1
            event = {"item": item_id(item), "ts": ts, "event": EVENTS[int(rng.integers(len(EVENTS)))]}
            if event["event"] == "purchase":
                event["rating"] = int(rng.integers(3, 6))
            events.append(event)
        cluster = taste.cluster
        region = _REGIONS[cluster % len(_REGIONS)] if rng.random() < 0.7 else _REGIONS[int(rng.integers(8))]
        profile = {"region": region, "age": _AGES[int(rng.integers(len(_AGES)))]}
        yield f"{prefix}{u:04d}", (events, profile)
