"""The privacy ledger: immutable events, appended to a file on the device, never rewritten.

The accountant's state (its history) is persisted beside it and resumed every round, so
the ε a device reports after k rounds is that of one accountant that saw all k rounds.
Both are sealed (``shared/sealing.py``): each ledger line is encrypted and chained to the
previous one, and the accountant state records how many events there are, so an edited,
removed, reordered or truncated event is detected. ``fedpgen ledger STATE_DIR`` prints it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from shared.privacy.accounting import History
from shared.sealing import TamperedStateError
from shared.store import SealedFiles


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


class PrivacyLedger(SealedFiles):
    """``ledger.jsonl.sealed`` (append-only events), ``accountant.json`` (the history) and
    ``dp_plan.json`` in a state-dir, all sealed with the device key."""

    EVENTS = "ledger.jsonl"
    STATE = "accountant.json"
    PLAN = "dp_plan.json"

    def _lines(self) -> list[str]:
        self.refuse_plaintext(self.EVENTS)
        path = self.dir / f"{self.EVENTS}.sealed"
        return [x for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    def events(self) -> list[PrivacyEvent]:
        lines = self._lines()
        events = [PrivacyEvent(**json.loads(raw)) for raw in
                  self.sealer.open_lines(self.EVENTS, lines, where=str(self.dir / f"{self.EVENTS}.sealed"))]
        recorded = int((self.read_json(self.STATE) or {}).get("events", 0))
        if recorded != len(events):
            raise TamperedStateError(f"{self.dir}: the ledger holds {len(events)} events but the accountant state "
                                     f"records {recorded} (events removed or a file rolled back)")
        return events

    def append(self, event: PrivacyEvent, history: History) -> None:
        """Append ``event`` (flushed and fsynced) and persist the accountant history it results from."""
        lines = self._lines()
        self.events()  # verify the chain before extending it
        line = self.sealer.seal_line(self.EVENTS, lines[-1] if lines else "",
                                     json.dumps(dataclasses.asdict(event), sort_keys=True).encode())
        with (self.dir / f"{self.EVENTS}.sealed").open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.write_json(self.STATE, {"history": history, "events": len(lines) + 1})

    def history(self) -> History:
        state = self.read_json(self.STATE)
        if not state:
            return []
        return [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    def plan(self) -> dict[str, Any]:
        return self.read_json(self.PLAN) or {}

    def save_plan(self, plan: dict[str, Any]) -> None:
        self.write_json(self.PLAN, plan)
