"""Build the task's base model with the preset's adapters: the same on server and devices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from peft import PeftModel
from transformers.utils import logging as hf_logging

from fedpgen.shared.adapters import ParamSets, attach_adapters, param_sets
from fedpgen.shared.config import RunConfig
from fedpgen.shared.presets import Preset, get_preset
from fedpgen.shared.tasks import Task, get_task


@dataclasses.dataclass
class Built:
    task: Task
    preset: Preset
    base_path: Path
    model: PeftModel
    sets: ParamSets


def build_model(cfg: RunConfig) -> Built:
    """Load (or pre-train and cache) the base and attach the seeded shared/personal adapters."""
    hf_logging.disable_progress_bar()
    task, preset = get_task(cfg.task), get_preset(cfg.preset)
    base_path = task.base_model_path(cfg)
    base = task.load_base(base_path)
    model = attach_adapters(base, preset=preset, targets=task.lora_targets(base), rank=cfg.lora_rank,
                            alpha=cfg.lora_alpha, personal_rank=cfg.personal_rank, seed=cfg.seed)
    return Built(task=task, preset=preset, base_path=base_path, model=model, sets=param_sets(model, preset))
