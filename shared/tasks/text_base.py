"""The text task's built-in base: a byte-level Llama pre-trained by the project.

Pre-trained on public text that no simulated user is drawn from (the plays outside the
``shakespeare`` population's, or the poems for ``shakespeare-all``), deterministic for a
seed, cached on first use under ``$FEDPGEN_CACHE`` (default ``~/.cache/fedpgen``) by a
hash of its settings. Never committed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedpgen.shared.data import shakespeare
from fedpgen.shared.tasks.cache import MARKER, ensure_built
from fedpgen.shared.tasks.pretraining import pretrain_loop
from fedpgen.shared.tasks.text_tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

ARCH = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}
PRETRAIN_BATCH = 32
PRETRAIN_LR = 3e-3


def model_config(seq_len: int) -> LlamaConfig:
    tok = ByteTokenizer()
    return LlamaConfig(vocab_size=tok.vocab_size, max_position_embeddings=seq_len,
                       tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=None,
                       pad_token_id=None, **ARCH)


def ensure_base(*, steps: int, seq_len: int, seed: int, population: str = "shakespeare") -> Path:
    """Return the cached base checkpoint folder, pre-training it first if absent: on the public
    text of the Shakespeare ``population`` (``shakespeare.public_text``)."""
    key = {"arch": ARCH, "steps": steps, "seq_len": seq_len, "seed": seed, "batch": PRETRAIN_BATCH,
           "lr": PRETRAIN_LR, "v": 1}
    if population != "shakespeare":  # the default's key unchanged: its cached bases stay valid
        key["public"] = population
    return ensure_built("text", key, lambda dest: pretrain(dest, steps=steps, seq_len=seq_len, seed=seed,
                                                           population=population))


def _windows(data: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seq_len, (n,), generator=gen)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def pretrain(dest: Path, *, steps: int, seq_len: int, seed: int, population: str = "shakespeare") -> None:
    """Pre-train the byte-level base on the public text of ``population`` and save it (HF
    format) to ``dest``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = ByteTokenizer()
    data = torch.tensor(tok.encode(shakespeare.public_text(population)), dtype=torch.long)
    split = int(data.numel() * 0.95)
    train, held = data[:split], data[split:]
    model = LlamaForCausalLM(model_config(seq_len))
    start = time.perf_counter()
    model.train()

    def loss() -> torch.Tensor:
        batch = _windows(train, PRETRAIN_BATCH, seq_len, gen)
        return model(input_ids=batch, labels=batch).loss

    pretrain_loop(list(model.parameters()), loss, steps=steps, lr=PRETRAIN_LR,
                  description="pre-training the byte-level base")
    model.eval()
    with torch.no_grad():
        eval_batch = _windows(held, 64, seq_len, torch.Generator().manual_seed(seed + 1))
        held_ppl = math.exp(float(model(input_ids=eval_batch, labels=eval_batch).loss))
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save(dest)
    meta = {"steps": steps, "seq_len": seq_len, "seed": seed, "public_heldout_ppl": held_ppl,
            "seconds": time.perf_counter() - start, "parameters": sum(p.numel() for p in model.parameters()),
            "text_bytes": int(data.numel()), "public": population}
    (dest / MARKER).write_text(json.dumps(meta, indent=2))
    log.info("pre-trained base: %d steps, public held-out byte perplexity %.3f", steps, held_ppl)
