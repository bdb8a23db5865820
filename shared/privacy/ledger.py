"""The privacy ledger: immutable events, appended to a file on the device, never rewritten.

The accountant's state (its history of (σ, q, steps)) is *derived from the events*, never
kept apart from them, so the ε a device reports after k rounds is that of one accountant
that saw every event, and ledger and accountant cannot disagree (a lost update in a
separate file once let a budget be overspent). Sealed (``shared/sealing.py``): each ledger
line is encrypted and chained to the previous one, and ``accountant.json`` records how many
events there are, so an edited, removed, reordered or truncated event is detected.
``fedpgen ledger STATE_DIR`` prints it. The state-dir's writer holds it exclusively
(``shared/locking.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from fedpgen.shared.privacy.accounting import History, compose
from fedpgen.shared.sealing import TamperedStateError
from fedpgen.shared.store import SealedFiles


@dataclasses.dataclass(frozen=True)
class PrivacyEvent:
    round: int
    unit: str            # "record" (DP-SGD on the device) | "user" (DP-FedAvg, as the server sees it)
    mechanism: str
    noise_multiplier: float
    clip: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float       # cumulative, after this event
    accountant: str
    private: bool        # False when σ = 0: the run is NOT PRIVATE
    attempt: int = 1     # 2+: this round was spent before (a retry after a crash); charged again

    def wire(self) -> dict[str, float | int | str]:
        """The plaintext metadata the server receives for this event (listed in shared/wire.py)."""
        return {"dp-epsilon": self.epsilon, "dp-delta": self.delta, "dp-sigma": self.noise_multiplier,
                "dp-clip": self.clip, "dp-sample-rate": self.sample_rate, "dp-steps": self.steps,
                "dp-accountant": self.accountant, "dp-attempt": self.attempt}


def participations(events: list[PrivacyEvent]) -> int:
    """Rounds trained, retries included, from a ledger's events: each such round writes one event
    per unit that protects it (record and user level: two; neither: one "none" at record level),
    all of one (round, attempt). Counted by those pairs, so a ledger begun before user-level
    events (a "none" per round) and continued after still counts every round."""
    return len({(e.round, e.attempt) for e in events})


class PrivacyLedger(SealedFiles):
    """``ledger.jsonl.sealed`` (append-only events), ``accountant.json`` (the history) and
    ``dp_plan.json`` in a state-dir, all sealed with the device key."""

    EVENTS = "ledger.jsonl"
    STATE = "accountant.json"
    PLAN = "dp_plan.json"
    USER_PLAN = "user_dp_plan.json"  # user-level DP: what the device first trained with (plan.check_user_plan)

    def _lines(self) -> list[str]:
        self.refuse_plaintext(self.EVENTS)
        path = self.dir / f"{self.EVENTS}.sealed"
        return [x for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    def events(self, unit: str | None = None) -> list[PrivacyEvent]:
        """The verified events, or those of one ``unit`` ("record" | "user")."""
        events = self._verified()
        return events if unit is None else [e for e in events if e.unit == unit]

    def _verified(self) -> list[PrivacyEvent]:
        lines = self._lines()
        events = [PrivacyEvent(**json.loads(raw)) for raw in
                  self.sealer.open_lines(self.EVENTS, lines, where=str(self.dir / f"{self.EVENTS}.sealed"))]
        recorded = int((self.read_json(self.STATE) or {}).get("events", 0))
        # One authentic event more than recorded: a crash between appending the line and
        # recording the count (``append``). The line is sealed and chained with the device key,
        # so only this device can have written it: it stands, and the next append records it.
        if recorded not in (len(events), len(events) - 1):
            raise TamperedStateError(f"{self.dir}: the ledger holds {len(events)} events but the accountant state "
                                     f"records {recorded} (events removed or a file rolled back)")
        return events

    def append(self, event: PrivacyEvent) -> None:
        """Append ``event`` (flushed and fsynced), then record the new event count."""
        lines = self._lines()
        self.events()  # verify the chain before extending it
        line = self.sealer.seal_line(self.EVENTS, lines[-1] if lines else "",
                                     json.dumps(dataclasses.asdict(event), sort_keys=True).encode())
        with (self.dir / f"{self.EVENTS}.sealed").open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.write_json(self.STATE, {"events": len(lines) + 1})

    def history(self, unit: str = "record") -> History:
        """The accountant's history of one unit, composed from its private events (a pure function
        of the ledger). Record level: DP-SGD's steps; user level: one Gaussian per participation at
        the multiplier the server saw, q = 1 (it drew the cohort: no amplification against it)."""
        history: History = []
        for e in self.events(unit):
            if e.private:
                history = compose(history, sigma=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
        return history

    def participations(self) -> int:
        """Rounds this device trained in, retries included (:func:`participations`)."""
        return participations(self.events())

    def plan(self) -> dict[str, Any]:
        return self.read_json(self.PLAN) or {}

    def save_plan(self, plan: dict[str, Any]) -> None:
        self.write_json(self.PLAN, plan)

    def user_plan(self) -> dict[str, Any]:
        return self.read_json(self.USER_PLAN) or {}

    def save_user_plan(self, plan: dict[str, Any]) -> None:
        self.write_json(self.USER_PLAN, plan)
