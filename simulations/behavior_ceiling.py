"""What can be learned about the synthetic behavior population, and by whom: a ceiling.

The population is generated from a known story (``shared/data/synthetic_behavior.py``), so
the best possible next-item prediction for each user is known: the story's own
probabilities with the user's true taste. This script scores, on the same held-out events
a run evaluates (each user's last events, split as ``BehaviorTask.read_user`` splits them),
estimators that know less:

- ``truth``: the user's taste and the population's popularity (the ceiling);
- ``truth, last season's popularity``: the taste, but the public population's popularity
  (what the pre-trained base knows);
- ``own events, last season's popularity``: favourites, genre mix and popularity counted on
  the user's *training* events only, popularity smoothed toward the public one: what a device
  can estimate alone (a count model that knows the story's shape, not a trained network);
- ``own events + the population's popularity``: the same counts with the population's true
  popularity as the prior: the most that federation (which learns the population's
  popularity) can add to a device that estimates its own favourites and mix.

Per user, the last two are compared (wins / ties / losses) on HR@10 and on the held-out
negative log-likelihood. With ``--run DIR`` (a finished behavior run evaluated four-way) the
learned variants' medians are printed beside them: how far from the ceiling each is.

    python simulations/behavior_ceiling.py --config simulations/behavior_cohort.toml \
        --run runs/dp_sweep/behavior-head-user/eps-8
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedpgen.shared.data.synthetic_behavior import Story, World, iter_users, latent_tastes  # noqa: E402

TOP_K = 10
# Pseudo-counts of the popularity prior: weak for last season's (a device's own counts
# should override it), near-certain for the population's (what a federation could learn).
PRIOR_STRENGTH = {"public": 20.0, "population": 1000.0}

Predictor = Callable[[int], np.ndarray]  # previous item -> P(next item) over the catalog


def split(n: int, heldout_fraction: float, val_fraction: float) -> tuple[int, int]:
    """(training events, first held-out index) of a user with ``n`` events."""
    from fedpgen.shared.tasks.behavior import split_sizes

    n_train, n_val, n_held = split_sizes(n, heldout_fraction, val_fraction)
    return n_train, n - n_held


def counted(story: Story, train: np.ndarray, prior: np.ndarray, strength: float) -> Predictor:
    """A count model of one user's training events that knows the story's shape: genre mix
    from their genres, favourites as items seen more often than the mix and ``prior``
    popularity predict, popularity as their counts smoothed toward ``prior``."""
    w = story.world
    counts = np.bincount(train, minlength=w.num_items).astype(float)
    mix = np.bincount(story.genres[train], minlength=w.num_genres) + 0.5
    mix = mix / mix.sum()
    within = np.zeros(w.num_items)
    for items, _ in story.members:
        v = counts[items] * (1.0 - w.p_favourite) + strength * prior[items]
        within[items] = v / v.sum()
    expected = train.size * (1.0 - w.p_favourite) * mix[story.genres] * prior
    excess = np.clip(counts - expected - 2.0, 0.0, None)
    replayed = excess / max(excess.sum(), 1e-9)
    return lambda previous: story.next_item_given(replayed, mix, previous, within=within)


def score(predict: Predictor, items: np.ndarray, first: int) -> tuple[float, float]:
    """HR@10 and mean negative log-likelihood of events ``first..`` given the event before each."""
    hits, nll = 0, 0.0
    for t in range(first, items.size):
        p = predict(int(items[t - 1]))
        p = p / p.sum()  # a count model that found no favourite leaves that share unassigned
        hits += int(items[t] in np.argpartition(-p, TOP_K)[:TOP_K])
        nll -= float(np.log(p[items[t]]))
    n = items.size - first
    return hits / n, nll / n


def estimates(*, num_users: int, events: tuple[int, int], seed: int, heldout_fraction: float,
              val_fraction: float) -> dict[str, list[tuple[float, float]]]:
    """Per estimator, each user's (HR@10, NLL) on their held-out events."""
    world = World()
    story, public = Story.of(world, seed), Story.of(world, seed, public=True)
    tastes = latent_tastes(num_users=num_users, seed=seed, world=world)
    out: dict[str, list[tuple[float, float]]] = {}
    users = iter_users(num_users=num_users, events_per_user=events, seed=seed, world=world)
    for taste, (_, (log, _)) in zip(tastes, users, strict=True):
        items = np.array([int(e["item"][1:]) for e in log])
        n_train, first = split(items.size, heldout_fraction, val_fraction)
        train = items[:n_train]
        for name, predict in (
            ("truth", lambda prev, t=taste: story.next_item(t, prev)),
            ("truth, last season's popularity", lambda prev, t=taste: story.next_item(t, prev, within=public.within)),
            ("own events, last season's popularity", counted(story, train, public.within, PRIOR_STRENGTH["public"])),
            ("own events + the population's popularity",
             counted(story, train, story.within, PRIOR_STRENGTH["population"])),
        ):
            out.setdefault(name, []).append(score(predict, items, first))
    return out


def versus(a: list[tuple[float, float]], b: list[tuple[float, float]], col: int, higher: bool) -> str:
    sign = 1.0 if higher else -1.0
    d = [sign * (x[col] - y[col]) for x, y in zip(a, b, strict=True)]
    return f"{sum(v > 0 for v in d)}/{sum(v == 0 for v in d)}/{sum(v < 0 for v in d)}"


def learned(run: Path) -> list[tuple[str, float, float]]:
    """A finished four-way run's medians per variant (clients.csv)."""
    from fedpgen.server.results import read_clients

    rows = read_clients(run)
    labels = (("base", "base"), ("shared", "shared-only"), ("personal", "shared+personal"), ("local", "local-only"))
    return [(f"learned: {label}", statistics.median(float(r[f"{v}-hr10"]) for r in rows),
             statistics.median(float(r[f"{v}-nll"]) for r in rows)) for v, label in labels if f"{v}-hr10" in rows[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="override file, e.g. simulations/behavior_cohort.toml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override")
    parser.add_argument("--run", type=Path, help="a finished behavior run (four-way) to place beside the ceiling")
    args = parser.parse_args()
    from fedpgen.shared.config import RunConfig, load_override_file

    base = dict(load_override_file(args.config)) if args.config else {"task": "behavior"}
    base.update(s.split("=", 1) for s in args.sets)
    cfg = RunConfig.from_mapping(base)
    low = cfg.min_records * cfg.seq_len  # as BehaviorTask.materialize_users draws each user's events
    res = estimates(num_users=cfg.num_users, events=(low, low * 3 // 2), seed=cfg.seed,
                    heldout_fraction=cfg.heldout_fraction, val_fraction=cfg.val_fraction)
    local, fed = res["own events, last season's popularity"], res["own events + the population's popularity"]
    print(f"{cfg.num_users} users of {low}-{low * 3 // 2} events, seed {cfg.seed}: held-out medians\n")
    print("| predictor | HR@10 | NLL | vs own events alone: HR@10 (W/T/L) | NLL (W/T/L) |\n|---|---|---|---|---|")
    for name, rows in res.items():
        cmp = ("—", "—") if rows is local else (versus(rows, local, 0, True), versus(rows, local, 1, False))
        print(f"| {name} | {statistics.median(r[0] for r in rows):.3f} | "
              f"{statistics.median(r[1] for r in rows):.3f} | {cmp[0]} | {cmp[1]} |")
    for name, hr, nll in learned(args.run) if args.run else []:
        print(f"| {name} | {hr:.3f} | {nll:.3f} | | |")
    print(f"\nown events + the population's popularity vs own events alone: {versus(fed, local, 0, True)} on "
          f"HR@10, {versus(fed, local, 1, False)} on NLL (W/T/L)")


if __name__ == "__main__":
    main()
