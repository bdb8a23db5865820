"""Personalization presets: which parameters are shared, personal, frozen; in what order.

One mechanism (DESIGN.md §3): two named PEFT adapters, ``shared`` and ``personal``,
and regular expressions over parameter names. Nothing is hand-picked in code.

- ``send``: shared parameters whose deltas leave the device (the wire allowlist).
- ``keep``: parameters that stay on the device (the personal part, stored encrypted later).
- ``frozen``: parameters that never train (FFA-LoRA's A: a common seeded init).
- ``schedule``: ``shared-then-personal`` (DESIGN.md §2 pattern a: the personal adapter is
  switched off while the shared one trains), ``joint`` (pattern b: both in one optimizer),
  ``personal-then-shared`` (FedRep: head first, then body).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    """A personalization scheme expressed as name patterns."""

    name: str
    personal_targets: str  # "mlp" | "head" | "" (no personal adapter)
    send: str
    keep: str
    frozen: str
    schedule: str
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="fedavg-lora",
            personal_targets="mlp",
            send=r"\.lora_[AB]\.shared\.",
            keep=r"\.lora_[AB]\.personal\.",
            frozen=r"$^",
            schedule="shared-then-personal",
            description="shared LoRA (A and B) on attention, personal LoRA on the MLP",
        ),
        Preset(
            name="ffa-lora",
            personal_targets="mlp",
            send=r"\.lora_B\.shared\.",
            keep=r"\.lora_[AB]\.personal\.",
            frozen=r"\.lora_A\.shared\.",
            schedule="shared-then-personal",
            description="FFA-LoRA: shared A frozen at a common seeded init, only B trained and shared",
        ),
        Preset(
            name="fedsa-lora",
            personal_targets="",
            send=r"\.lora_A\.shared\.",
            keep=r"\.lora_B\.shared\.",
            frozen=r"$^",
            schedule="joint",
            description="FedSA-LoRA: A shared, B personal (same LoRA, trained jointly)",
        ),
        Preset(
            name="fedrep",
            personal_targets="head",
            send=r"\.lora_[AB]\.shared\.",
            keep=r"\.lora_[AB]\.personal\.",
            frozen=r"$^",
            schedule="personal-then-shared",
            description="FedRep: personal low-rank output head trained first, then the shared body",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
