"""What each observer of a run sees, and the membership score it gives a user's record.

Every score is "higher: more likely trained on", computed with the base model plus a shared
adapter (the personal part off) — ℓ(θ; x) is the record's loss under shared parameters θ:

- ``final`` (black box, anyone holding the final shared base θ_T — every device has it):
  the loss threshold, −ℓ(θ_T; x).
- ``final-calibrated`` (same observer): RMIA (Zarifzadeh et al. 2024) offline, with one
  reference model: the pre-federation base θ_0, trained on public data only — an OUT model
  for every user's record. With one reference model RMIA's score Pr_z[p(x|θ_T)/p(x|θ_0) >
  γ·p(z|θ_T)/p(z|θ_0)] is an increasing function of p(x|θ_T)/p(x|θ_0), so its ROC is that
  of ℓ(θ_0; x) − ℓ(θ_T; x) (also Watson et al. 2022's difficulty calibration).
- ``aggregate`` (a server with SecAgg+: it sees θ_{r−1} and the aggregate θ_r of every round):
  Σ over the rounds r the user took part in of ℓ(θ_{r−1}; x) − ℓ(θ_r; x).
- ``per-device`` (a server without SecAgg+: it sees each device's own update Δ_{u,r}):
  Σ_r ℓ(θ_{r−1}; x) − ℓ(θ_{r−1} + Δ_{u,r}; x). Needs the server's wire transcript of a run
  without SecAgg+ (``wire-transcript = true``); with SecAgg+ the server holds only masked
  vectors, which is the point.

θ_r comes from the server's checkpoints (one per round); a round without one (refused)
leaves the base unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

VIEWS = {
    "final": "black box: final shared model, loss threshold",
    "final-calibrated": "black box: final shared model, RMIA with the pre-federation base as reference",
    "aggregate": "server with SecAgg+: each round's aggregate",
    "per-device": "server without SecAgg+: each device's own update",
}
_ROUND = re.compile(r"^round_(\d{4,})\.safetensors$")


class Observer:
    """Scores records under each view of one run folder (a simulation's: users' folders known)."""

    def __init__(self, run_dir: Path, cfg: Any) -> None:
        from safetensors.numpy import load as st_load

        from fedpgen.server.results import read_jsonl
        from fedpgen.shared.adapters import get_arrays
        from fedpgen.shared.data.user_folder import list_user_dirs
        from fedpgen.shared.model import build_model
        from fedpgen.shared.population import population_dir

        self.run_dir, self.cfg = Path(run_dir), cfg
        self.built = build_model(cfg)
        names = self.built.sets.send
        self.thetas: dict[int, list[np.ndarray]] = {0: get_arrays(self.built.model, names)}
        for path in sorted((self.run_dir / "checkpoints").glob("round_*.safetensors")):
            match = _ROUND.match(path.name)
            if match:
                tensors = st_load(path.read_bytes())
                self.thetas[int(match.group(1))] = [tensors[f"theta/{n}"] for n in names]
        if len(self.thetas) == 1:
            raise FileNotFoundError(f"{self.run_dir}/checkpoints: no shared base to attack")
        self.last_round = max(self.thetas)
        self.users = {p.name: p for p in list_user_dirs(population_dir(cfg))}
        by_index = sorted(self.users)
        self.rounds_of: dict[str, list[int]] = {}
        for row in read_jsonl(self.run_dir / "client_rounds.jsonl"):
            i = row.get("client-index")
            if isinstance(i, int) and 0 <= i < len(by_index) and row.get("round"):
                self.rounds_of.setdefault(by_index[i], []).append(int(row["round"]))
        self.deltas, self.per_device_unavailable = self._read_deltas(by_index)
        self._data: dict[str, Any] = {}
        self._cache: dict[tuple[Any, ...], np.ndarray] = {}

    # -- parameters each observer holds --------------------------------------------------------
    def theta_after(self, r: int) -> list[np.ndarray]:
        """The shared base after round r (0: before federation); a refused round changed nothing."""
        while r > 0 and r not in self.thetas:
            r -= 1
        return self.thetas[r]

    def _read_deltas(self, by_index: list[str]) -> tuple[dict[tuple[str, int], list[np.ndarray]], str]:
        """(user, round) -> the update the server received, from the server's transcript."""
        from fedpgen.audit.wire_scan import _content
        from fedpgen.shared.wire_transcript import RUN_TRANSCRIPT_DIR, SERVER_STEM, UPLINK, read_transcript

        if self.cfg.secure_aggregation:
            return {}, "the server saw only masked vectors (SecAgg+): no device's own update to attack"
        path = self.run_dir / RUN_TRANSCRIPT_DIR / f"{SERVER_STEM}.jsonl"
        if not path.is_file():
            return {}, "no server transcript (run with wire-transcript = true to record what the server received)"
        deltas = {}
        for entry in read_transcript(path):
            if isinstance(entry, str) or entry.direction != UPLINK or entry.message_type != "train":
                continue
            content = _content(entry)
            if content is None or "fitres.parameters" not in content or entry.round is None:
                continue
            index = content["fitres.metrics"].get("client-index") if "fitres.metrics" in content else None
            if not isinstance(index, int) or not 0 <= index < len(by_index):
                continue
            arrays = content["fitres.parameters"]
            deltas[(by_index[index], entry.round)] = [arrays[k].numpy() for k in sorted(arrays.keys(), key=int)]
        return deltas, "" if deltas else "the server transcript holds no device update"

    # -- scoring --------------------------------------------------------------------------------
    def user_data(self, user: str) -> Any:
        if user not in self._data:
            self._data[user] = self.built.task.read_user(self.users[user], self.cfg, base_path=self.built.base_path)
        return self._data[user]

    def losses(self, theta: list[np.ndarray], records: torch.Tensor, key: tuple[Any, ...] | None = None) -> np.ndarray:
        from fedpgen.audit.membership import record_losses
        from fedpgen.shared.adapters import active, set_arrays

        if key is not None and key in self._cache:
            return self._cache[key]
        set_arrays(self.built.model, self.built.sets.send, theta)
        with active(self.built.model, ["shared"], ()):
            out = record_losses(self.built.model, self.built.task, records)
        if key is not None:
            self._cache[key] = out
        return out

    def available(self, view: str) -> str:
        """"" when the view can be scored, else why not."""
        if view == "per-device":
            return self.per_device_unavailable
        if view in ("aggregate", "per-device") and not self.rounds_of:
            return "client_rounds.jsonl names no device's rounds"
        return ""

    def score(self, view: str, user: str, records: torch.Tensor, tag: str) -> np.ndarray:
        """Membership scores of ``records`` (as records of ``user``; ``tag`` names the set, for caching)."""
        if view == "final":
            return -self.losses(self.theta_after(self.last_round), records, ("T", user, tag))
        if view == "final-calibrated":
            return self.losses(self.thetas[0], records, (0, user, tag)) \
                - self.losses(self.theta_after(self.last_round), records, ("T", user, tag))
        total = np.zeros(records.shape[0])
        for r in sorted(set(self.rounds_of.get(user, []))):
            before = self.losses(self.theta_after(r - 1), records, (r - 1, user, tag))
            if view == "aggregate":
                after = self.losses(self.theta_after(r), records, (r, user, tag))
            elif (user, r) in self.deltas:
                theta = [t + d.astype(t.dtype) for t, d in zip(self.theta_after(r - 1), self.deltas[(user, r)],
                                                               strict=True)]
                after = self.losses(theta, records)
            else:  # the server received nothing from this device in round r (it failed or was rejected)
                continue
            total += before - after
        return total

    def participants(self, view: str) -> list[str]:
        """Users whose records the view can say anything about."""
        if view.startswith("final"):
            return sorted(self.users)
        return sorted(u for u in self.users if self.rounds_of.get(u))

    def canary_records(self, user: str, texts: list[str]) -> torch.Tensor:
        """``texts`` as records of ``user`` (the text task's layout: profile prefix, text, padding)."""
        from fedpgen.audit.canaries import records
        from fedpgen.shared.data.user_folder import read_profile
        from fedpgen.shared.tasks.text_tokenizer import load_tokenizer

        profile, _ = read_profile(self.users[user])
        return records(texts, profile=profile, tokenizer=load_tokenizer(self.built.base_path), seq_len=self.cfg.seq_len)

    def final_losses(self, user: str, texts: list[str]) -> np.ndarray:
        """Losses of ``texts`` as records of ``user`` under the final shared model (exposure)."""
        return self.losses(self.theta_after(self.last_round), self.canary_records(user, texts))
