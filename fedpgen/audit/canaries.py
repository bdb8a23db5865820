"""Planted canaries for the text task: Secret Sharer exposure and the black-box one-run audit.

Planting is the auditor's act, before the run (``fedpgen plant-canaries``): canary documents
go into users' device folders, and the secret — which canary, in whose folder, planted or
not — goes to ``<run-dir>/audit/canaries.json``, which no device reads. The run itself is an
ordinary run; nothing in the product path knows about canaries.

Every canary is the sentence ``the secret code is DDDDDD.`` with a random six-digit secret
(the randomness space R has |R| = 10^6), drawn from ``secrets``; each planted copy is its own
document, so one copy is one record (the unit record-level DP protects).

- **Exposure canaries** (Carlini et al. 2019, "The Secret Sharer"): ``per-repetition``
  secrets planted 1×, 10× and 100× in the chosen users' folders. Exposure = log2|R| −
  log2 rank of the secret among all of R, ranked by the final shared model's loss on the
  planting user's record. The rank is estimated from ``candidates`` random secrets: by a
  skew-normal fitted to their losses (the paper's extrapolation, §4.3) and empirically
  (which cannot exceed log2(candidates + 1)).
- **One-run canaries** (Steinke, Nasr & Jagielski 2023): ``m`` secrets, each planted once
  with probability 1/2, in the users' folders in turn. After training every one of the m is
  scored by a view (``fedpgen/audit/views.py``) and the one-run bound is computed from the
  coins. A planted copy that the device's split puts into held-out or validation is not
  trained on: that only weakens the attack (the bound stays valid, since the coins are
  independent of everything else).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

CANARY_FILE = Path("audit") / "canaries.json"
SPACE = 10**6
PREFIX = "the secret code is "
REPETITIONS = (1, 10, 100)


def canary_text(secret: int) -> str:
    return f"{PREFIX}{secret:06d}."


@dataclasses.dataclass(frozen=True)
class Canary:
    user: str
    secret: int
    copies: int  # planted copies: 0 for a one-run canary whose coin said "out"
    kind: str  # "exposure" | "one-run"
    files: tuple[str, ...]  # relative to the users' folder

    @property
    def included(self) -> bool:
        return self.copies > 0


@dataclasses.dataclass(frozen=True)
class Planted:
    users_dir: Path
    canaries: tuple[Canary, ...]

    def of(self, kind: str) -> list[Canary]:
        return [c for c in self.canaries if c.kind == kind]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant(users: Sequence[Path], *, run_dir: Path, one_run: int = 200, per_repetition: int = 2,
          repetitions: Sequence[int] = REPETITIONS, chosen_users: int = 2) -> Path:
    """Plant canaries into ``users`` (device folders) and write the secret; return its path.

    Refuses (``FileExistsError``) when the run folder already has canaries or checkpoints:
    planting after training measures nothing, and planting twice would lose the first secret.
    """
    run_dir = Path(run_dir)
    secret_file = run_dir / CANARY_FILE
    if secret_file.exists():
        raise FileExistsError(f"{secret_file}: canaries were already planted for this run")
    if any((run_dir / "checkpoints").glob("round_*.safetensors")):
        raise FileExistsError(f"{run_dir} has checkpoints: plant canaries before the run, in a fresh run-dir")
    users = sorted(Path(u) for u in users)
    if not users or chosen_users < 1 or one_run < 0 or per_repetition < 0:
        raise ValueError("plant-canaries needs users, chosen-users >= 1, and non-negative counts")
    if len({u.parent for u in users}) != 1:
        raise ValueError("plant-canaries: every user folder must sit in one users' folder")
    drawn: set[int] = set()

    def fresh_secret() -> int:
        while True:
            s = secrets.randbelow(SPACE)
            if s not in drawn:
                drawn.add(s)
                return s

    canaries: list[Canary] = []
    n = 0

    def write(user: Path, secret: int, copies: int) -> tuple[str, ...]:
        nonlocal n
        files = []
        for _ in range(copies):
            path = user / "documents" / f"c{n:05d}.txt"
            n += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(canary_text(secret), encoding="utf-8")
            files.append(str(path.relative_to(user.parent)))
        return tuple(files)

    for i, (rep, _) in enumerate((r, j) for r in repetitions for j in range(per_repetition)):
        user = users[i % min(chosen_users, len(users))]
        secret = fresh_secret()
        canaries.append(Canary(user.name, secret, rep, "exposure", write(user, secret, rep)))
    for i in range(one_run):
        user = users[i % len(users)]
        secret = fresh_secret()
        copies = secrets.randbits(1)  # the coin: planted once, or not at all
        canaries.append(Canary(user.name, secret, copies, "one-run", write(user, secret, copies)))
    digests = {f: _digest(users[0].parent / f) for c in canaries for f in c.files}
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    secret_file.write_text(json.dumps({"users-dir": str(users[0].parent.resolve()), "space": SPACE,
                                       "format": canary_text(0).replace("000000", "{secret:06d}"),
                                       "canaries": [dataclasses.asdict(c) for c in canaries],
                                       "sha256": digests}, indent=1), encoding="utf-8")
    return secret_file


def load(run_dir: Path) -> Planted | None:
    """The canaries planted for this run; None if none were. ``ValueError`` when a planted file
    is missing or changed (e.g. the population was generated again): the audit cannot use them."""
    path = Path(run_dir) / CANARY_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    users_dir = Path(data["users-dir"])
    for rel, digest in data["sha256"].items():
        file = users_dir / rel
        if not file.is_file() or _digest(file) != digest:
            raise ValueError(f"canary file {file} is missing or changed since planting: re-plant in a fresh run-dir")
    canaries = tuple(Canary(c["user"], int(c["secret"]), int(c["copies"]), c["kind"], tuple(c["files"]))
                     for c in data["canaries"])
    return Planted(users_dir=users_dir, canaries=canaries)


def records(texts: Sequence[str], *, profile: dict[str, str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Each text as the text task makes one record of it: profile prefix, the text, padding."""
    from fedpgen.shared.tasks.text import profile_prefix

    prefix, _ = profile_prefix(tokenizer, profile, seq_len)
    rows = []
    for text in texts:
        ids = (prefix + tokenizer.encode(text))[:seq_len]
        rows.append(ids + [tokenizer.pad_id] * (seq_len - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


@dataclasses.dataclass(frozen=True)
class Exposure:
    repetitions: int
    secret_loss: float
    exposure_fit: float  # skew-normal extrapolation
    exposure_empirical: float  # log2((candidates + 1) / (rank among candidates + 1))
    candidates: int


def exposure(secret_loss: float, candidate_losses: np.ndarray, *, repetitions: int) -> Exposure:
    """Exposure of one secret whose record loss is ``secret_loss``, given random candidates' losses
    (lower loss: ranked earlier). Capped at log2|R| (rank 1 of |R|)."""
    cands = np.asarray(candidate_losses, dtype=np.float64)
    below = int((cands <= secret_loss).sum())
    empirical = math.log2((len(cands) + 1) / (below + 1))
    a, loc, scale = stats.skewnorm.fit(cands)
    cdf = float(stats.skewnorm.cdf(secret_loss, a, loc=loc, scale=scale))
    fitted = min(math.log2(SPACE), -math.log2(max(cdf, 1.0 / SPACE)))
    return Exposure(repetitions=repetitions, secret_loss=float(secret_loss), exposure_fit=fitted,
                    exposure_empirical=empirical, candidates=len(cands))


def measure_exposure(planted: Planted, loss_of: Callable[[str, list[str]], np.ndarray], *,
                     candidates: int = 1000, seed: int = 0) -> list[Exposure]:
    """Exposure of every exposure canary: ``loss_of(user, texts)`` gives the record losses the
    attacker's model assigns to ``texts`` as records of ``user``."""
    rng = np.random.default_rng(seed)
    out = []
    for c in planted.of("exposure"):
        others = [canary_text(int(s)) for s in rng.choice(SPACE, size=candidates, replace=False) if s != c.secret]
        losses = loss_of(c.user, [canary_text(c.secret), *others])
        out.append(exposure(float(losses[0]), losses[1:], repetitions=c.copies))
    return out
