"""What a task supplies. It never supplies the device's training loop, aggregation or a ledger.

torch appears here in annotations only: ``shared.tasks`` (and with it the config layer,
which validates against ``shared/tasks/registry.py``) imports without it.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedpgen.shared.tasks.registry import TASKS, TaskInfo

if TYPE_CHECKING:
    import torch

    from fedpgen.shared.config import RunConfig


# LoRA targets by architecture, shared by every task built on these architectures:
# attention is shared, the MLP or the output head personal.
LORA_TARGETS = {
    "llama": {"shared": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "mlp": ["gate_proj", "up_proj", "down_proj"], "head": ["lm_head"]},
    "gpt2": {"shared": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"], "head": ["lm_head"]},
}


class NoUsableDataError(ValueError):
    """A device folder holds too little usable data to train or evaluate: the device refuses."""


@dataclasses.dataclass
class UserData:
    """One user's records, split on the device. ``skipped`` counts bad inputs by reason
    (one of ``shared.wire.SKIP_REASONS``)."""

    train: torch.Tensor
    val: torch.Tensor
    heldout: torch.Tensor
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    # How this user's inputs map onto the model, where that must not change between rounds
    # (image: subject folder -> subject-token slot). Kept in the device's sealed meta.
    bindings: dict[str, Any] = dataclasses.field(default_factory=dict)
    # What the user's personal variants may consult besides their weights, read from this
    # user's own training split on the device (behavior, ``history-mix``: how often they had each
    # item); never sent, and never in a private phase's loss. None: nothing.
    memory: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train.shape[0])


class Task(abc.ABC):
    """A modality: base model, LoRA targets, device-folder reader, loss and metrics.

    A subclass names its registry entry, ``class TextTask(Task, task="text")``, and reads its
    name, datasets and metrics from it (``info``): the registry is their one source.
    """

    info: ClassVar[TaskInfo]
    # Draws per validation record when the loss is stochastic (diffusion draws a timestep and
    # noise per record): early stopping compares checkpoints on the same draws, this many each.
    val_draws: int = 1

    def __init_subclass__(cls, *, task: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if task is None:  # a subclass of a task keeps its parent's entry
            return
        if task not in TASKS:
            raise TypeError(f"{cls.__qualname__}: no task {task!r} in shared/tasks/registry.py; "
                            f"valid: {', '.join(sorted(TASKS))}")
        here = f"{cls.__module__}:{cls.__qualname__}"
        if TASKS[task].target != here:
            raise TypeError(f"{here} claims task {task!r}, whose registry entry names {TASKS[task].target}")
        cls.info = TASKS[task]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def datasets(self) -> tuple[str, ...]:
        return self.info.datasets

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.info.metric_names

    @property
    def primary(self) -> str:
        return self.info.primary

    @property
    def higher_is_better(self) -> bool:
        return self.info.higher_is_better

    @property
    def primary_label(self) -> str:
        return self.info.primary_label

    @property
    def tie_free(self) -> tuple[str, bool] | None:
        return self.info.tie_free

    def lora_targets(self, model: torch.nn.Module) -> dict[str, list[str]]:
        """Module names for LoRA (keys ``shared``, ``mlp``, ``head``), by the model's architecture."""
        kind = getattr(getattr(model, "config", None), "model_type", "")
        if kind not in LORA_TARGETS:
            raise ValueError(f"{self.name} task: no LoRA targets for model_type {kind!r}; "
                             f"known: {sorted(LORA_TARGETS)}")
        return LORA_TARGETS[kind]

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b`` (the primary metric's direction)."""
        return self.info.better(a, b)

    @abc.abstractmethod
    def base_model_path(self, cfg: RunConfig) -> Path:
        """Return a local checkpoint directory for the base (building and caching it if needed)."""

    @abc.abstractmethod
    def load_base(self, path: Path) -> torch.nn.Module:
        """Load the frozen base model from a local checkpoint directory."""

    @abc.abstractmethod
    def materialize_users(self, cfg: RunConfig, dest: Path) -> list[Path]:
        """Write the configured built-in population as user device folders under ``dest``."""

    @abc.abstractmethod
    def read_user(self, user_dir: Path, cfg: RunConfig, *, base_path: Path,
                  bindings: dict[str, Any] | None = None) -> UserData:
        """Read one device folder into train / val / held-out records; count skipped inputs.

        ``bindings``: the ones this device trained with so far (``UserData.bindings``), to keep.

        Raises ``NoUsableDataError`` when too little is usable (the device then refuses)."""

    def prior_records(self, model: torch.nn.Module, data: UserData, cfg: RunConfig) -> torch.Tensor | None:
        """Records generated by the frozen base (no user record in them) that train the personal part
        beside the user's own, in the phases without DP (DreamBooth's prior preservation); None: none."""
        return None

    @abc.abstractmethod
    def per_record_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Loss per record, shape ``[batch]``: no record's loss may depend on another's."""

    def fit_loss(self, model: torch.nn.Module, batch: torch.Tensor, memory: torch.Tensor | None, *,
                 counted: bool) -> torch.Tensor:
        """The per-record loss of a phase without DP that trains the personal part alone, which may
        consult the user's ``memory`` (``UserData.memory``; a private phase never calls this).
        ``counted``: the batch's targets are among what ``memory`` holds (training records, not
        validation). The default ignores the memory."""
        return self.per_record_loss(model, batch)

    @abc.abstractmethod
    def metrics(self, model: torch.nn.Module, records: torch.Tensor) -> dict[str, float]:
        """Held-out metrics of ``model`` on ``records``."""

    def evaluate(self, model: torch.nn.Module, records: torch.Tensor,
                 memory: torch.Tensor | None = None) -> tuple[dict[str, float], Any]:
        """``metrics``, plus optional artifacts of this variant (e.g. the generated samples the
        metrics were measured on) for ``render_report``; they stay on the device. ``memory``:
        the user's ``UserData.memory``, passed for the variants with a personal part only."""
        return self.metrics(model, records), None

    def instrument(self) -> dict[str, Any]:
        """What measures this task's metrics besides the data itself, with its own measured
        quality, for the run summary (e.g. the image task's identity encoder); {} if nothing."""
        return {}

    def render_report(self, parts: dict[str, Any], records: torch.Tensor) -> bytes | None:
        """Optional PNG from the variants' artifacts, stored sealed on the device (``report.png``)."""
        return None

    @abc.abstractmethod
    def generate(self, model: torch.nn.Module, base_path: Path, prompt: str, **kwargs: Any) -> str:
        """Generate from ``model`` given a prompt."""
