"""Personalization presets: which parameters are shared, personal, frozen, and one round's schedule.

One mechanism (docs/architecture.md, "Presets"): two named PEFT adapters, ``shared`` and
``personal``, and regular expressions over parameter names. Nothing is hand-picked in code.

- ``send``: shared parameters whose deltas leave the device (the wire allowlist).
- ``keep``: parameters that stay on the device (the personal part, sealed).
- ``frozen``: parameters that never train (FFA-LoRA's A: a common seeded init).
- ``schedule``: one round on a device, as a list of :class:`Phase`. The device executes it
  (``client/device.py``), the DP plan counts its private steps (``shared/privacy/plan.py``)
  and the pattern check reads it: the three cannot disagree.
"""

from __future__ import annotations

import dataclasses

SHARED, PERSONAL = "shared", "personal"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase of a device's round.

    ``adapters``: the adapters in the forward pass; ``trains``: whose trainable parameters
    the optimizer updates (``shared``, ``personal`` or both); ``steps`` and ``lr``: the
    run-config keys giving its step count and learning rate; ``private``: it runs under
    the record-level mechanism when the run is private (its steps are planned and
    accounted); ``early_stopping``: without DP, validate and keep the best state;
    ``batch``: the key giving its records per step — ``batch-size`` for a private phase,
    whose sampling rate the DP plan calibrates σ for.
    """

    adapters: tuple[str, ...]
    trains: tuple[str, ...]
    steps: str
    lr: str
    private: bool
    early_stopping: bool = False
    batch: str = "batch-size"

    def __post_init__(self) -> None:
        if self.private and self.batch != "batch-size":
            raise ValueError(f"a private phase draws batch-size records per step (the DP plan's sampling rate), "
                             f"not {self.batch}")

    def num_steps(self, cfg: object) -> int:
        return int(getattr(cfg, self.steps.replace("-", "_")))

    def batch_size(self, cfg: object) -> int:
        """Records per step; ``personal-batch-size = 0`` means the run's ``batch-size``."""
        return int(getattr(cfg, self.batch.replace("-", "_"))) or int(getattr(cfg, "batch_size"))

    def learning_rate(self, cfg: object) -> float:
        return float(getattr(cfg, self.lr.replace("-", "_")))


# The phases the presets are made of (docs/privacy.md, "What DP covers": patterns a and b)
SHARED_ALONE = Phase(adapters=(SHARED,), trains=(SHARED,), steps="local-steps", lr="lr", private=True)
SHARED_OVER_PERSONAL = Phase(adapters=(SHARED, PERSONAL), trains=(SHARED,), steps="local-steps", lr="lr",
                             private=True)
BOTH_JOINTLY = Phase(adapters=(SHARED, PERSONAL), trains=(SHARED, PERSONAL), steps="local-steps", lr="lr",
                     private=True)
PERSONAL_AFTER = Phase(adapters=(SHARED, PERSONAL), trains=(PERSONAL,), steps="personal-max-steps",
                       lr="personal-lr", private=False, early_stopping=True, batch="personal-batch-size")
PERSONAL_FIRST = Phase(adapters=(SHARED, PERSONAL), trains=(PERSONAL,), steps="personal-max-steps",
                       lr="personal-lr", private=True, early_stopping=True)
# Fitting the personal part to a final shared base (never private: nothing of it is sent)
PERSONALIZE = PERSONAL_AFTER


@dataclasses.dataclass(frozen=True)
class Preset:
    """A personalization scheme expressed as name patterns and a schedule."""

    name: str
    personal_targets: tuple[str, ...]  # the task's target groups of the personal adapter; () = none
    send: str
    keep: str
    frozen: str
    schedule: tuple[Phase, ...]
    shared_targets: tuple[str, ...] = ("shared",)  # the task's target groups the shared adapter covers
    shared_bias: bool = False  # the shared LoRA's B carries a bias (PEFT's lora_bias): an additive output term
    personal_bias: bool = False  # the personal LoRA's B carries a bias, likewise

    def private_steps(self, cfg: object) -> int:
        """DP-SGD steps of one round under record-level DP: what the plan calibrates σ for."""
        return sum(p.num_steps(cfg) for p in self.schedule if p.private)

    def personal_in_shared_forward(self) -> bool:
        """Pattern (b): the personal part sits in the forward pass that produces the shared gradients."""
        return any(PERSONAL in p.adapters for p in self.schedule if SHARED in p.trains)

    def check_pattern(self) -> None:
        """Refuse a schedule whose shared delta would depend on non-DP personal training.

        Under record-level DP everything that influences the shared delta must itself be an
        output of a DP mechanism: a personal part trained without DP inside the shared
        forward pass makes the delta depend on every record through it, voiding the guarantee.
        """
        if self.personal_in_shared_forward() and any(PERSONAL in p.trains and not p.private for p in self.schedule):
            raise ValueError(f"preset {self.name}: the personal part sits in the shared forward pass and would "
                             "train without DP; that voids the record-level guarantee (docs/privacy.md, pattern b)")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # shared LoRA (A and B) on attention, personal LoRA on the MLP; pattern (a): the personal
        # adapter is switched off while the shared one trains, then fitted without DP
        Preset(name="fedavg-lora", personal_targets=("mlp",), send=r"\.lora_[AB]\.shared\.",
               keep=r"\.lora_[AB]\.personal\.", frozen=r"$^", schedule=(SHARED_ALONE, PERSONAL_AFTER)),
        # FedAvg-LoRA over the output head too: the shared LoRA on attention and the output head,
        # the personal part a second low-rank LoRA on the output head, fitted after without DP.
        # What many users share (the items' popularity) and what one user re-consumes (favourites)
        # are both biases on the output logits; whatever attention does, the behavior model's
        # logits stay in the span of its head's 64 columns (400 items): a LoRA on the head moves
        # that span (measured: README, "Does federation pay off under DP").
        Preset(name="fedavg-lora-head", personal_targets=("head",), send=r"\.lora_[AB]\.shared\.",
               keep=r"\.lora_[AB]\.personal\.", frozen=r"$^", schedule=(SHARED_ALONE, PERSONAL_AFTER),
               shared_targets=("shared", "head")),
        # The same shared LoRA, and a personal LoRA on every group (attention, MLP and the output
        # head): the personal part can learn as much of the user as a local-only model trained
        # from the base, on top of what the population shares (measured: README, "Does
        # federation pay off under DP"). Pattern (a) as above: the personal part is off while
        # the shared one trains, then fitted after without DP.
        Preset(name="fedavg-lora-deep", personal_targets=("shared", "mlp", "head"), send=r"\.lora_[AB]\.shared\.",
               keep=r"\.lora_[AB]\.personal\.", frozen=r"$^", schedule=(SHARED_ALONE, PERSONAL_AFTER),
               shared_targets=("shared", "head")),
        # The shared part is one vector: a bias on the output head's logits (the shared LoRA on
        # the head with its A and B frozen at their seeded init, B = 0, so only the bias of B
        # trains and is sent); the personal part a LoRA on every group, as above. What a
        # population shares in the behavior story is the items' popularity, an additive term on
        # the logits; under user-level DP the noise on the mean grows with the square root of
        # the dimension sent, here the catalog's size instead of every attention LoRA.
        Preset(name="fedavg-bias-deep", personal_targets=("shared", "mlp", "head"),
               send=r"\.lora_B\.shared\.bias$", keep=r"\.lora_[AB]\.personal\.",
               frozen=r"\.lora_[AB]\.shared\.weight$", schedule=(SHARED_ALONE, PERSONAL_AFTER),
               shared_targets=("head",), shared_bias=True),
        # Both parts one vector each: the shared bias on the output logits as above, and a personal
        # bias on the same logits (the personal LoRA on the head with its A and B frozen at their
        # seeded init, B = 0, so only the bias of B trains and stays on the device). The
        # population's popularity and a user's own taste over items, each an additive term
        # (measured: README, "Does federation pay off under DP").
        Preset(name="fedavg-bias-bias", personal_targets=("head",), send=r"\.lora_B\.shared\.bias$",
               keep=r"\.lora_B\.personal\.bias$", frozen=r"\.lora_[AB]\.(shared|personal)\.weight$",
               schedule=(SHARED_ALONE, PERSONAL_AFTER), shared_targets=("head",), shared_bias=True,
               personal_bias=True),
        # FFA-LoRA: shared A frozen at a common seeded init, only B trained and shared
        Preset(name="ffa-lora", personal_targets=("mlp",), send=r"\.lora_B\.shared\.",
               keep=r"\.lora_[AB]\.personal\.", frozen=r"\.lora_A\.shared\.",
               schedule=(SHARED_ALONE, PERSONAL_AFTER)),
        # FFA-LoRA shared, a deep personal part: the shared B on attention as above (A frozen), the
        # personal part a LoRA on every group (attention, MLP and the output head), so that it can
        # learn as much of the user as local-only, which trains the same schedule from the base
        # (its attention LoRA included), on top of the shared base. Measured on the text cohort
        # under user-level DP (README, "Does federation pay off under DP").
        Preset(name="ffa-lora-deep", personal_targets=("shared", "mlp", "head"), send=r"\.lora_B\.shared\.",
               keep=r"\.lora_[AB]\.personal\.", frozen=r"\.lora_A\.shared\.",
               schedule=(SHARED_ALONE, PERSONAL_AFTER)),
        # FedSA-LoRA: A shared, B personal (the same LoRA), one DP optimizer over both (pattern b)
        Preset(name="fedsa-lora", personal_targets=(), send=r"\.lora_A\.shared\.", keep=r"\.lora_B\.shared\.",
               frozen=r"$^", schedule=(BOTH_JOINTLY,)),
        # FedRep: a personal low-rank output head first, then the shared body over it, both under DP
        Preset(name="fedrep", personal_targets=("head",), send=r"\.lora_[AB]\.shared\.",
               keep=r"\.lora_[AB]\.personal\.", frozen=r"$^", schedule=(PERSONAL_FIRST, SHARED_OVER_PERSONAL)),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
