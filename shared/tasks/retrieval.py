"""Retrieval over a user's own history (``retrieval-k``): the survey's RAG-style user modeling.

On the device, a text record is conditioned on the top-k of the user's *other* documents,
ranked by TF-IDF cosine similarity to what precedes the record in its own document (at
generation: to the prompt). Everything here runs on the device, over the device's own
files; nothing it reads or ranks is sent (the wire schema is unchanged, docs/wire.md).

Pure Python, no torch: the text task builds records from what :class:`History` returns.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> Counter[str]:
    return Counter(w.lower() for w in _WORD.findall(text))


class History:
    """A user's documents, indexed for similarity (TF-IDF over lower-cased words).

    Parameters
    ----------
    docs
        The texts that may be retrieved, by document index; "" for a document that may not
        be (e.g. one held out for evaluation): it is never returned.
    """

    def __init__(self, docs: Sequence[str]) -> None:
        self.docs = list(docs)
        counts = [_words(d) for d in self.docs]
        df: Counter[str] = Counter()
        for c in counts:
            df.update(c.keys())
        n = len(self.docs)
        self._idf = {w: math.log((1 + n) / (1 + f)) + 1.0 for w, f in df.items()}
        self._vectors = [self._weigh(c) for c in counts]

    def _weigh(self, counts: Counter[str]) -> dict[str, float]:
        vec = {w: c * self._idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {w: v / norm for w, v in vec.items()} if norm > 0 else {}

    def top_k(self, query: str, k: int, *, exclude: int | None = None) -> list[int]:
        """Indices of the ``k`` retrievable documents most similar to ``query``, best first.

        Ties (an empty query ties everything) go to the document nearest ``exclude`` in the
        device's order (the user's most recent other writing), then the earlier one. The
        document ``exclude`` (the record's own) is never returned.
        """
        q = self._weigh(_words(query))
        own = exclude if exclude is not None else len(self.docs)

        def rank(i: int) -> tuple[float, int, int]:
            score = sum(q[w] * self._vectors[i].get(w, 0.0) for w in q)
            return (-score, abs(i - own), i)

        candidates = [i for i, d in enumerate(self.docs) if d and i != exclude]
        return sorted(candidates, key=rank)[:k]


def context_ids(pieces: Sequence[list[int]], *, budget: int, sep: list[int]) -> list[int]:
    """The retrieved documents' token ids, each cut to an equal share of ``budget`` and ended
    with ``sep``; at most ``budget`` ids in all ([] when nothing fits)."""
    if not pieces:
        return []
    share = budget // len(pieces) - len(sep)
    if share <= 0:
        return []
    out: list[int] = []
    for ids in pieces:
        out += ids[:share] + sep
    return out[:budget]
