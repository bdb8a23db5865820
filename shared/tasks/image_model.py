"""The image task's networks: a small conditional UNet (diffusers) and the identity encoder.

``FaceUNet`` wraps a ``diffusers.UNet2DConditionModel``. Its cross-attention context is
the prompt-like attribute tokens plus one **subject token** per slot (slot 0: the user's
face, slots 1..: the user's subjects), produced by ``slot_proj`` from a one-hot slot. The
personal LoRA adapter targets ``slot_proj`` (DreamBooth's rare identifier, learned as a
low-rank update) and the transformer feed-forward layers; the shared adapter targets
attention. No embedding has a ``padding_idx`` (docs/privacy.md, "Exact per-record gradients").

``IdentityEncoder`` is a small CNN trained by the project on public procedural identities
with colour and lighting augmentation (a Face-Sim / DINO analogue available offline), with
attribute heads used for the prompt-alignment check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from fedpgen.shared.data.procedural_faces import HAIR, SIZE

CONTEXT_DIM = 32
NUM_SLOTS = 4
CLASS_SLOT = -1  # a record of "a person", not of the user: the class token, never a slot's (prior preservation)
ATTR_VOCAB = ([f"hair={h}" for h in HAIR] + ["glasses=yes", "glasses=no", "beard=yes", "beard=no"])
ATTR_KEYS = ("hair", "glasses", "beard")  # one token each, in this order; 0 = not given
HEADS = {"hair": list(HAIR), "glasses": ["yes", "no"], "beard": ["yes", "no"]}
UNET = {"sample_size": SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),  # attention at 8x8 only:
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),  # half the step time of 16x16 too
        "cross_attention_dim": CONTEXT_DIM, "attention_head_dim": 8, "norm_num_groups": 8,
        "use_linear_projection": True}


def attribute_tokens(profile: dict[str, str]) -> list[int]:
    """One token per key of ``ATTR_KEYS`` (1-based index into ``ATTR_VOCAB``; 0 when not given)."""
    return [ATTR_VOCAB.index(f"{k}={profile[k]}") + 1 if f"{k}={profile.get(k)}" in ATTR_VOCAB else 0
            for k in ATTR_KEYS]


class FaceUNet(nn.Module):
    def __init__(self, unet: UNet2DConditionModel | None = None) -> None:
        super().__init__()
        self.unet = unet or UNet2DConditionModel(**UNET)
        dim = self.unet.config.cross_attention_dim
        self.attr_embed = nn.Embedding(len(ATTR_VOCAB) + 1, dim)  # padding_idx=None: token 0 is a learned "none"
        self.slot_proj = nn.Linear(NUM_SLOTS, dim, bias=False)

    def class_token(self) -> torch.Tensor:
        """The frozen base's slot-0 token, whatever the adapters do to ``slot_proj``: every slot
        starts as the average public identity, "a person" (DreamBooth's class noun)."""
        layer = getattr(self.slot_proj, "base_layer", self.slot_proj)  # under PEFT: the frozen weight
        return layer.weight[:, 0]

    def context(self, attrs: torch.Tensor, slot: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        """Attribute tokens, then the subject token: ``identity``, else slot ``slot``'s, else for
        ``slot == CLASS_SLOT`` the class token (prior-preservation records)."""
        if identity is not None:
            token = identity
        else:
            token = self.slot_proj(F.one_hot(slot.clamp_min(0), NUM_SLOTS).float())
            if bool((slot == CLASS_SLOT).any()):
                token = torch.where((slot == CLASS_SLOT)[:, None], self.class_token().to(token.dtype), token)
        return torch.cat([self.attr_embed(attrs), token.unsqueeze(1)], dim=1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, attrs: torch.Tensor, slot: torch.Tensor,
                identity: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise. ``identity`` replaces the slot token (pre-training on public identities)."""
        return self.unet(noisy, timesteps, encoder_hidden_states=self.context(attrs, slot, identity)).sample


class IdentityEncoder(nn.Module):
    """Photo -> unit-norm identity embedding, plus attribute logits."""

    def __init__(self, num_ids: int, dim: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(64 * (SIZE // 8) ** 2, 128),
            nn.GELU(), nn.Linear(128, dim))
        self.classes = nn.Parameter(torch.randn(num_ids, dim) * 0.1)  # cosine classifier over public identities
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in HEADS.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [-1, 1], ``[B, 3, H, W]`` -> ``[B, dim]``, unit norm."""
        return F.normalize(self.features(images), dim=-1)

    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.features(images)
        return {k: head(z) for k, head in self.heads.items()}
