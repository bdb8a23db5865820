"""Run configuration: parsed once, at the boundary, into a frozen validated dataclass.

The schema is ``[tool.flwr.app.config]`` of ``pyproject.toml``: every key and its
default lives there. Overrides (``--set key=value``, ``simulations/*.toml``, Flower's
``--run-config``) may only name keys that exist; values are coerced to the default's
type and validated here. Invalid values raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpgen.shared.presets import PRESETS
from fedpgen.shared.tasks.registry import TASKS

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# Keys that do not change what a checkpoint means: a run may resume with other values.
_RESUMABLE_KEYS = frozenset({"num-server-rounds", "run-dir", "client-cpus", "client-gpus", "ray-address",
                             "threads-per-client", "cpu-heap-keep-mib", "round-timeout", "min-available-clients",
                             "wire-transcript", "evaluation", "personal-refit", "metrics-log", "history-mix"})

# Keys added after runs were made with this schema: at these values they leave model_hash as it
# was without them, so older runs' checkpoints stay theirs (resume, simulations/reevaluate.py).
_LATER_KEYS = {"personal-folds": 0, "user-noise-dropouts": 0.0}

METRICS_LOGS = ("none", "tensorboard", "mlflow")  # metrics-log: where the server logs its per-round aggregates


def default_config() -> dict[str, Any]:
    """Return ``[tool.flwr.app.config]`` of this repository's ``pyproject.toml``."""
    if not PYPROJECT.is_file():
        raise FileNotFoundError(f"pyproject.toml not found at {PYPROJECT}: install with `pip install -e .`")
    with PYPROJECT.open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` (possibly a CLI string) to the type of ``default``."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in {"true", "1", "yes"}:
                    return True
                if value.lower() in {"false", "0", "no"}:
                    return False
                raise ValueError
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config '{key}': {value!r} is not a valid {type(default).__name__}") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every run setting, validated. Field names are the TOML keys with ``_`` for ``-``."""

    task: str
    preset: str
    data: str
    data_dir: str
    num_users: int
    min_records: int
    base_model: str
    pretrain_steps: int
    seq_len: int
    heldout_fraction: float
    val_fraction: float
    num_server_rounds: int
    fraction_fit: float
    min_fit_clients: int
    min_available_clients: int
    round_timeout: float
    eval_fraction: float
    evaluation: str
    local_steps: int
    batch_size: int
    lr: float
    personal_lr: float
    personal_max_steps: int
    personal_eval_every: int
    personal_batch_size: int
    personal_refit: str
    personal_folds: int
    lora_rank: int
    lora_alpha: int
    personal_rank: int
    retrieval_k: int
    history_mix: float
    history_mix_fit: bool
    prior_images: int
    server_optimizer: str
    server_lr: float
    seed: int
    dp: str
    dp_epsilon: float
    dp_delta: float
    dp_noise_multiplier: float
    dp_clip: float
    dp_accountant: str
    dp_max_participations: int
    user_dp: str
    user_clip: float
    user_noise_multiplier: float
    user_noise_dropouts: float
    secure_aggregation: bool
    secagg_num_shares: float
    secagg_max_shares: int
    secagg_threshold: float
    secagg_clip: float
    secagg_max_weight: float
    secagg_quantization: int
    run_dir: str
    client_cpus: float
    client_gpus: float
    ray_address: str
    threads_per_client: int
    cpu_heap_keep_mib: int
    wire_transcript: bool
    metrics_log: str

    def _need(self, ok: bool, key: str, why: str) -> None:
        if not ok:
            value = getattr(self, key.replace("-", "_"))
            raise ValueError(f"config '{key}': {value!r} is invalid: {why}")

    def __post_init__(self) -> None:
        need = self._need
        for f in dataclasses.fields(self):  # TOML and the CLI accept inf and nan: no setting means either
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                why = ("an infinite budget is no DP: say so with dp = 'off' (NOT PRIVATE)"
                       if f.name == "dp_epsilon" else "must be a finite number")
                need(False, f.name.replace("_", "-"), why)
        need(self.task in TASKS, "task", f"unknown task; valid: {', '.join(sorted(TASKS))}")
        need(self.preset in PRESETS, "preset", f"unknown preset; valid: {', '.join(sorted(PRESETS))}")
        if self.task in TASKS:
            valid = (*TASKS[self.task].datasets, "dir")
            need(self.data in valid, "data", f"task {self.task!r} takes data: {', '.join(valid)}")
        need(self.data != "dir" or bool(self.data_dir), "data-dir", "data = 'dir' needs a data-dir")
        need(self.num_users >= 1, "num-users", "must be >= 1")
        need(self.min_records >= 2, "min-records", "must be >= 2")
        need(self.pretrain_steps >= 0, "pretrain-steps", "must be >= 0")
        need(self.seq_len >= 8, "seq-len", "must be >= 8")
        need(0.0 < self.heldout_fraction < 1.0, "heldout-fraction", "must be in (0, 1)")
        need(0.0 <= self.val_fraction < 1.0, "val-fraction", "must be in [0, 1)")
        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(0.0 < self.fraction_fit <= 1.0, "fraction-fit", "must be in (0, 1]")
        need(self.min_fit_clients >= 1, "min-fit-clients", "must be >= 1")
        need(self.min_available_clients >= 0, "min-available-clients", "must be >= 0 (0 = the whole population)")
        need(self.round_timeout >= 0.0, "round-timeout", "must be >= 0 (0 = wait forever)")
        need(0.0 < self.eval_fraction <= 1.0, "eval-fraction", "must be in (0, 1]")
        need(self.evaluation in {"auto", "device", "four-way"}, "evaluation", "valid: auto, device, four-way")
        need(self.local_steps >= 1, "local-steps", "must be >= 1")
        need(self.batch_size >= 1, "batch-size", "must be >= 1")
        need(self.lr > 0.0, "lr", "must be > 0")
        self._check_personal_fit()
        need(self.lora_rank >= 1, "lora-rank", "must be >= 1")
        need(self.lora_alpha >= 1, "lora-alpha", "must be >= 1")
        need(self.personal_rank >= 1, "personal-rank", "must be >= 1")
        need(0.0 <= self.history_mix < 1.0, "history-mix", "must be in [0, 1) (0 = off)")
        need(self.history_mix == 0.0 or self.task == "behavior", "history-mix",
             "the user's item frequencies exist for the behavior task only")
        need(not self.history_mix_fit or self.history_mix > 0.0, "history-mix-fit",
             "trains the personal fit through the mixture of history-mix: set history-mix > 0")
        need(self.retrieval_k >= 0, "retrieval-k", "must be >= 0 (0 = off)")
        need(self.retrieval_k == 0 or self.task == "text", "retrieval-k",
             "retrieval over the user's history is built for the text task only (0 = off)")
        need(self.prior_images >= 0, "prior-images", "must be >= 0 (0 = off)")
        need(self.prior_images == 0 or self.task == "image", "prior-images",
             "prior preservation is built for the image task only (0 = off)")
        need(self.retrieval_k == 0 or not self.record_dp, "retrieval-k",
             "does not combine with record-level DP (dp = 'off' needed): a document retrieved as context moves "
             "the gradient of every record that retrieves it, so DP-SGD's per-record bound would not hold; "
             "protect the whole user instead with user-dp = 'distributed' or 'central' (docs/architecture.md)")
        need(self.retrieval_k == 0 or self.seq_len >= 32, "seq-len",
             "retrieval-k > 0 needs seq-len >= 32 (a quarter of each record holds the retrieved context)")
        need(self.server_optimizer in {"fedavg", "fedadam"}, "server-optimizer", "valid: fedavg, fedadam")
        need(self.server_lr > 0.0, "server-lr", "must be > 0")
        self._check_runtime()
        self._check_privacy()

    def _check_personal_fit(self) -> None:
        """The phases that fit the personal part without DP, and the final fit."""
        need = self._need
        need(self.personal_lr > 0.0, "personal-lr", "must be > 0")
        need(self.personal_max_steps >= 0, "personal-max-steps", "must be >= 0")
        need(self.personal_eval_every >= 1, "personal-eval-every", "must be >= 1")
        need(self.personal_batch_size >= 0, "personal-batch-size", "must be >= 0 (0 = batch-size)")
        need(self.personal_refit in {"continue", "fresh"}, "personal-refit", "valid: continue, fresh")
        need(self.personal_folds >= 0 and self.personal_folds != 1, "personal-folds",
             "0 (one validation split) or at least 2 folds")
        need(not (self.personal_folds and self.history_mix_fit), "personal-folds",
             "cross-validation scores the model's loss alone: not with history-mix-fit")
        need(not (self.personal_folds and self.personal_refit == "continue"), "personal-folds",
             'needs personal-refit = "fresh": a stored personal part has trained on the records the folds '
             "hold out, so their scores would flatter it (docs/architecture.md)")

    def _check_runtime(self) -> None:
        """Where and how the run executes: folders, simulation resources, processes, logs."""
        need = self._need
        need(bool(self.run_dir), "run-dir", "must not be empty")
        need(self.client_cpus >= 1 and float(self.client_cpus).is_integer(), "client-cpus",
             "a whole number of CPUs >= 1 (Flower's federation config takes whole CPUs per virtual device)")
        need(self.client_gpus >= 0.0, "client-gpus", "must be >= 0 (0 = CPU only)")
        need(self.ray_address.strip() == self.ray_address and " " not in self.ray_address, "ray-address",
             "'auto', HOST:PORT of a Ray head, or empty")
        need(self.threads_per_client >= 1, "threads-per-client", "must be >= 1")
        need(0 <= self.cpu_heap_keep_mib <= 4096, "cpu-heap-keep-mib", "MiB between 0 (glibc's defaults) and 4096")
        need(isinstance(self.wire_transcript, bool), "wire-transcript", "must be true or false")
        need(self.metrics_log in METRICS_LOGS, "metrics-log", f"valid: {', '.join(METRICS_LOGS)}")

    def _check_privacy(self) -> None:
        """Record-level DP, user-level DP and SecAgg+ settings."""
        need = self._need
        need(self.dp in {"epsilon", "sigma", "off"}, "dp", "valid: epsilon, sigma, off")
        need(self.dp_epsilon > 0.0, "dp-epsilon", "must be > 0")
        need(0.0 < self.dp_delta < 1.0, "dp-delta", "must be in (0, 1)")
        need(self.dp_noise_multiplier >= 0.0, "dp-noise-multiplier", "must be >= 0")
        need(self.dp_clip > 0.0, "dp-clip", "must be > 0")
        need(self.dp_accountant in {"prv", "rdp"}, "dp-accountant", "valid: prv, rdp")
        need(self.dp_max_participations >= 0, "dp-max-participations", "must be >= 0 (0 = every round)")
        need(self.user_dp in {"off", "central", "distributed"}, "user-dp", "valid: off, central, distributed")
        need(self.user_clip > 0.0, "user-clip", "must be > 0")
        need(self.user_noise_multiplier >= 0.0, "user-noise-multiplier", "must be >= 0")
        need(0.0 <= self.user_noise_dropouts < 1.0, "user-noise-dropouts", "must be in [0, 1)")
        need(self.user_noise_dropouts == 0.0 or self.user_dp == "distributed", "user-noise-dropouts",
             "sizes the devices' noise shares: set it only with user-dp = \"distributed\"")
        shares, threshold = self.secagg_num_shares, self.secagg_threshold
        need(shares > 0 and (shares <= 1 or (shares.is_integer() and int(shares) % 2 == 1 and shares >= 3)),
             "secagg-num-shares", "a fraction in (0, 1] or an odd integer >= 3 (an even integer makes SecAgg+ "
             "fail every round silently)")
        cap = self.secagg_max_shares
        need(cap == 0 or (cap >= 3 and cap % 2 == 1), "secagg-max-shares",
             "0 (no cap) or an odd integer >= 3 (an even one makes SecAgg+ fail every round silently)")
        need(threshold > 0 and (threshold < 1 or (threshold.is_integer() and (shares <= 1 or threshold <= shares))),
             "secagg-threshold", "a fraction in (0, 1) or an integer count <= secagg-num-shares")
        need(threshold < 1 or shares > 1 or cap == 0 or threshold < cap, "secagg-threshold",
             "an integer count must be below secagg-max-shares (the shares a capped fraction gives)")
        need(self.secagg_clip >= 0.0, "secagg-clip", "must be >= 0 (0 = derived)")
        need(self.secagg_max_weight >= 1.0, "secagg-max-weight", "must be >= 1")
        need(self.secagg_quantization >= 2**8, "secagg-quantization", "must be >= 256")

    @classmethod
    def merged(cls, *mappings: Mapping[str, Any] | None) -> RunConfig:
        """From the mappings merged in order (later keys win), parsed and validated once per
        distinct content: a ClientApp asks for its run config on every message."""
        merged: dict[str, Any] = {}
        for mapping in mappings:
            merged.update(mapping or {})
        return _parse_once(json.dumps(merged, sort_keys=True, default=str))

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Build from the pyproject defaults plus ``overrides`` (TOML key names)."""
        defaults = default_config()
        values = dict(defaults)
        for key, value in (overrides or {}).items():
            if key not in defaults:
                raise ValueError(f"unknown config key '{key}'; valid keys: {', '.join(sorted(defaults))}")
            values[key] = _coerce(key, value, defaults[key])
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k.replace("-", "_"): v for k, v in values.items()}
        missing = fields - kwargs.keys()
        if missing or kwargs.keys() - fields:
            raise RuntimeError(f"pyproject schema and RunConfig disagree: {sorted(missing ^ (kwargs.keys() - fields))}")
        return cls(**kwargs)

    def to_toml_dict(self) -> dict[str, Any]:
        """Return the settings under their TOML key names (Flower's run-config form)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def planned_participations(self) -> int:
        """Rounds a device may train in: what its σ is planned for (``dp-max-participations``)."""
        cap = self.dp_max_participations
        return min(cap, self.num_server_rounds) if cap else self.num_server_rounds

    @property
    def record_dp(self) -> bool:
        """Whether devices run DP-SGD with noise (else the run is NOT PRIVATE at record level)."""
        return self.dp == "epsilon" or (self.dp == "sigma" and self.dp_noise_multiplier > 0.0)

    @property
    def secagg_clipping_range(self) -> float:
        """Clipping range of a weighted delta element: given, or 4·local-steps·lr (AdamW moves a weight
        by about lr per step; weights n/max-weight <= 1 only shrink it), widened for user-level DP."""
        if self.secagg_clip > 0:
            return self.secagg_clip
        derived = 4.0 * self.local_steps * self.lr
        if self.user_dp != "off":
            derived = max(derived, self.user_clip * (1.0 + 4.0 * self.user_noise_multiplier))
        return derived

    def model_hash(self) -> str:
        """Hash of every setting that changes what a checkpoint means (not rounds or paths)."""
        # history-mix is read at evaluation only, unless the personal fit trains through it
        fixed = {"history-mix"} if self.history_mix_fit else set()
        items = {k: v for k, v in self.to_toml_dict().items()
                 if k not in _RESUMABLE_KEYS - fixed and not (k in _LATER_KEYS and v == _LATER_KEYS[k])}
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def load_override_file(path: str | Path) -> dict[str, Any]:
    """Read a ``simulations/*.toml`` override file (flat ``key = value`` table)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"override file not found: {p}")
    with p.open("rb") as fh:
        data = tomllib.load(fh)
    return dict(data.get("config", data))


@functools.lru_cache(maxsize=16)
def _parse_once(items: str) -> RunConfig:
    return RunConfig.from_mapping(json.loads(items))
