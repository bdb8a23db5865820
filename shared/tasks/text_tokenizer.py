"""Tokenizers for the text task: the project's byte-level one, or a checkpoint's own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

BYTE_TOKENIZER_FILE = "fedpgen_tokenizer.json"


class Tokenizer(Protocol):
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; 256 = BOS, 257 = PAD (masked in the loss, never embedded with padding_idx)."""

    bos_id = 256
    pad_id = 257
    vocab_size = 264  # rounded up

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        (path / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "vocab_size": self.vocab_size}))


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local checkpoint folder."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self._tok.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        self.pad_id = int(pad)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(path: Path) -> Tokenizer:
    """The byte tokenizer when the checkpoint says so, else the checkpoint's HF tokenizer."""
    if (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    return HFTokenizer(path)
