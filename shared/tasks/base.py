"""What a task supplies. It never supplies a training loop, aggregation or a ledger."""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from shared.config import RunConfig


@dataclasses.dataclass
class UserData:
    """One user's records, split on the device. ``skipped`` counts unreadable inputs."""

    train: torch.Tensor
    val: torch.Tensor
    heldout: torch.Tensor
    skipped: int = 0

    @property
    def num_train(self) -> int:
        return int(self.train.shape[0])


class Task(abc.ABC):
    """A modality: base model, LoRA targets, device-folder reader, loss and metrics."""

    name: str = ""

    @abc.abstractmethod
    def base_model_path(self, cfg: RunConfig) -> Path:
        """Return a local checkpoint directory for the base (building and caching it if needed)."""

    @abc.abstractmethod
    def load_base(self, path: Path) -> torch.nn.Module:
        """Load the frozen base model from a local checkpoint directory."""

    @abc.abstractmethod
    def lora_targets(self, model: torch.nn.Module) -> dict[str, list[str]]:
        """Module names for LoRA: keys ``shared``, ``mlp`` and ``head``."""

    @abc.abstractmethod
    def materialize_users(self, cfg: RunConfig, dest: Path) -> list[Path]:
        """Write the configured built-in population as user device folders under ``dest``."""

    @abc.abstractmethod
    def read_user(self, user_dir: Path, cfg: RunConfig, *, base_path: Path) -> UserData:
        """Read one device folder into train / val / held-out records; count skipped files."""

    @abc.abstractmethod
    def per_record_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Loss per record, shape ``[batch]``: no record's loss may depend on another's."""

    @abc.abstractmethod
    def metrics(self, model: torch.nn.Module, records: torch.Tensor) -> dict[str, float]:
        """Held-out metrics of ``model`` on ``records``."""

    @abc.abstractmethod
    def generate(self, model: torch.nn.Module, base_path: Path, prompt: str, **kwargs: Any) -> str:
        """Generate from ``model`` given a prompt."""
