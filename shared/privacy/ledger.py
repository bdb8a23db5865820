"""The privacy ledger: immutable events, appended to a JSONL file on the device, never rewritten.

The accountant's state (its history) is persisted beside it and resumed every round, so
the ε a device reports after k rounds is that of one accountant that saw all k rounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from shared.privacy.accounting import History
from shared.store import atomic_write_bytes


@dataclasses.dataclass(frozen=True)
class PrivacyEvent:
    round: int
    unit: str            # "record" (DP-SGD on the device) | "user" (DP-FedAvg)
    mechanism: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float       # cumulative, after this event
    accountant: str
    private: bool        # False when σ = 0: the run is NOT PRIVATE

    def wire(self) -> dict[str, float | int | str]:
        """The plaintext metadata the server receives for this event (listed in shared/wire.py)."""
        return {"dp-epsilon": self.epsilon, "dp-delta": self.delta, "dp-sigma": self.noise_multiplier,
                "dp-clip": self.clip, "dp-sample-rate": self.sample_rate, "dp-steps": self.steps,
                "dp-accountant": self.accountant}


class PrivacyLedger:
    """``ledger.jsonl`` (append-only events) and ``accountant.json`` (the history) in a state-dir."""

    EVENTS = "ledger.jsonl"
    STATE = "accountant.json"

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def events(self) -> list[PrivacyEvent]:
        path = self.dir / self.EVENTS
        if not path.is_file():
            return []
        return [PrivacyEvent(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def append(self, event: PrivacyEvent, history: History) -> None:
        """Append ``event`` (flushed and fsynced) and persist the accountant history it results from."""
        with (self.dir / self.EVENTS).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(dataclasses.asdict(event), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_bytes(self.dir / self.STATE, json.dumps({"history": history}).encode())

    def history(self) -> History:
        path = self.dir / self.STATE
        if not path.is_file():
            return []
        return [(float(s), float(q), int(n)) for s, q, n in json.loads(path.read_text())["history"]]

    def plan(self) -> dict[str, Any]:
        path = self.dir / "dp_plan.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_plan(self, plan: dict[str, Any]) -> None:
        atomic_write_bytes(self.dir / "dp_plan.json", json.dumps(plan, sort_keys=True).encode())
