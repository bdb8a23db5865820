"""Two named PEFT adapters and the parameter sets a preset selects by name pattern."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedpgen.shared.presets import Preset


@dataclasses.dataclass(frozen=True)
class ParamSets:
    """Parameter names by role. ``send`` is the wire allowlist, in a fixed order."""

    send: tuple[str, ...]
    keep: tuple[str, ...]
    shared_trainable: tuple[str, ...]
    personal_trainable: tuple[str, ...]


def attach_adapters(base: torch.nn.Module, *, preset: Preset, targets: dict[str, list[str]],
                    rank: int, alpha: int, personal_rank: int, seed: int) -> PeftModel:
    """Wrap ``base`` with a ``shared`` and (if the preset has one) a ``personal`` LoRA adapter.

    Initialization is seeded, so the server and every device build identical adapters
    (FFA-LoRA relies on this: its frozen A is the common seeded init; so does `fedavg-bias-deep`,
    whose frozen shared A and B are never sent).
    """
    torch.manual_seed(seed)

    def modules(groups: tuple[str, ...]) -> list[str]:  # the task's module names of the preset's groups
        return [m for group in groups for m in targets[group]]

    shared = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules(preset.shared_targets),
                        lora_bias=preset.shared_bias)
    with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5 deprecated: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # a bias on a layer without one cannot be merged into it; FedPGen never merges adapters
        warnings.filterwarnings("ignore", message=".*lora_bias=True.*has no bias.*")
        model = get_peft_model(base, shared, adapter_name="shared")
        if preset.personal_targets:
            personal = LoraConfig(r=personal_rank, lora_alpha=alpha, lora_dropout=0.0,
                                  target_modules=modules(preset.personal_targets), lora_bias=preset.personal_bias)
            model.add_adapter("personal", personal)
    return model


def param_sets(model: PeftModel, preset: Preset) -> ParamSets:
    """Select the parameter sets by the preset's patterns over parameter names."""
    names = [n for n, _ in model.named_parameters() if ".lora_" in n]
    send = tuple(n for n in names if re.search(preset.send, n))
    keep = tuple(n for n in names if re.search(preset.keep, n))
    frozen = {n for n in names if re.search(preset.frozen, n)}
    if not send:
        raise ValueError(f"preset {preset.name}: no parameter matches the send pattern {preset.send!r}")
    if set(send) & set(keep):
        raise ValueError(f"preset {preset.name}: parameters both sent and kept: {sorted(set(send) & set(keep))[:3]}")
    return ParamSets(send=send, keep=keep,
                     shared_trainable=tuple(n for n in send if n not in frozen),
                     personal_trainable=tuple(n for n in keep if n not in frozen))


@contextlib.contextmanager
def active(model: PeftModel, adapters: list[str], trainable: tuple[str, ...]) -> Iterator[list[torch.nn.Parameter]]:
    """Activate ``adapters`` (others switched off) with exactly ``trainable`` requiring grad."""
    if isinstance(adapters, str):  # "shared" would iterate as letters, match nothing and leave the bare base
        raise TypeError(f"active() takes a list of adapter names, not the string {adapters!r}")
    present = [a for a in adapters if a in model.peft_config]
    model.base_model.set_adapter(present)
    wanted = set(trainable)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            params.append(param)
    try:
        yield params
    finally:
        for param in model.parameters():
            param.requires_grad_(False)


def get_arrays(model: torch.nn.Module, names: tuple[str, ...]) -> list[np.ndarray]:
    params = dict(model.named_parameters())
    return [params[n].detach().cpu().numpy().copy() for n in names]


def set_arrays(model: torch.nn.Module, names: tuple[str, ...], arrays: list[np.ndarray]) -> None:
    """Load ``arrays`` into the named parameters, checking count and shapes (malformed input is rejected)."""
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} arrays, got {len(arrays)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, arr in zip(names, arrays, strict=True):
            if tuple(arr.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(arr.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(torch.as_tensor(np.asarray(arr), dtype=params[name].dtype))


def get_tensors(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def set_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
