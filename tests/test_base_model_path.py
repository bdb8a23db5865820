"""``--base-model PATH``: any local Hugging Face checkpoint loads through the same path (here GPT-2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from fedpgen.client.device import Device
from fedpgen.shared.population import ensure_population
from fedpgen.shared.tasks.text_tokenizer import ByteTokenizer


def test_a_local_gpt2_checkpoint_trains_with_the_same_machinery(make_cfg, tmp_path: Path) -> None:
    ckpt = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(ckpt)
    ByteTokenizer().save(ckpt)
    cfg = make_cfg(base_model=str(ckpt))
    users = ensure_population(cfg)
    d = Device(cfg, user_dir=users[0], state_dir=tmp_path / "state")
    assert any("c_attn.lora_A.shared" in n for n in d.sets.send)
    delta, _, _ = d.fit(d.init_send, server_round=1)
    assert max(float(np.abs(x).max()) for x in delta) > 0


def test_a_missing_checkpoint_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(base_model=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no Hugging Face checkpoint"):
        Device(cfg, user_dir=tmp_path, state_dir=tmp_path / "s")
