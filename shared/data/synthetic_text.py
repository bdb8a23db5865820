"""Synthetic users with distinct writing styles, for fast tests and scaling benchmarks.

Every user writes from one shared grammar (what federation can learn) with a personal
vocabulary, a personal signature phrase and a personal punctuation habit (what only the
personal part can learn).
"""

from __future__ import annotations

import random

_SUBJECTS = ["the river", "my garden", "the old town", "our market", "the north road", "a small boat"]
_VERBS = ["remembers", "keeps", "hides", "follows", "carries", "watches"]
_OBJECTS = ["the light", "a quiet song", "the last train", "every letter", "the morning", "a red door"]
_STYLE_WORDS = [
    ["indeed", "verily", "forsooth"], ["basically", "like", "totally"], ["per se", "thus", "hence"],
    ["yo", "lit", "fam"], ["alas", "o woe", "hark"], ["kindly", "duly", "herewith"],
    ["zap", "boom", "whoosh"], ["meow", "purr", "hiss"],
]
_MARKS = [".", "!", "...", "?!", ";", " :)"]


def users(*, num_users: int, docs_per_user: int, seed: int) -> dict[str, list[str]]:
    """Generate ``num_users`` users, each with ``docs_per_user`` short documents."""
    out: dict[str, list[str]] = {}
    for u in range(num_users):
        rng = random.Random(seed * 100_003 + u)
        words = _STYLE_WORDS[u % len(_STYLE_WORDS)]
        mark = _MARKS[u % len(_MARKS)]
        signature = f"user{u:03d} says"
        docs = []
        for _ in range(docs_per_user):
            sentences = []
            for _ in range(rng.randint(2, 4)):
                sentences.append(f"{signature} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
                                 f"{rng.choice(_OBJECTS)}, {rng.choice(words)}{mark}")
            docs.append(" ".join(sentences))
        out[f"synthetic-{u:04d}"] = docs
    return out
