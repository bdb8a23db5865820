"""documents -> text: personalized writing in the user's style with a causal LM.

Records are fixed-length windows of a user's documents (``seq-len`` tokens, the last
window of a document padded with ``pad_id``, which the loss masks), each starting with the
user's profile line, cut to a quarter of the record (``profile_prefix``; generation starts
with the same prefix). The split is done on the device, deterministically per user:
held-out first, then validation for early stopping of the personal part; held-out records
are never trained on.

With ``retrieval-k = K > 0`` a record also holds, after the profile, the first tokens of
the user's K most similar other documents (``shared/tasks/retrieval.py``; a quarter of the
record): they condition the model and are never scored, and only training text is ever
retrieved. Generation retrieves the same way from the user's documents, by the prompt.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fedpgen.shared.data import shakespeare, synthetic_text
from fedpgen.shared.data.safe_read import UserBudget
from fedpgen.shared.data.user_folder import read_documents, read_profile, write_user
from fedpgen.shared.tasks.base import NoUsableDataError, Task, UserData
from fedpgen.shared.tasks.retrieval import History, context_ids
from fedpgen.shared.tasks.text_base import ensure_base
from fedpgen.shared.tasks.text_tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from fedpgen.shared.config import RunConfig

_MIN_RECORD_TOKENS = 8
EVAL_BATCH = 64
PROFILE_SHARE = 4  # the profile prefix takes at most 1/PROFILE_SHARE of a record's tokens
RETRIEVAL_SHARE = 4  # with retrieval-k > 0, the retrieved context takes 1/RETRIEVAL_SHARE of a record
# A retrieved token is stored in a record as its id + CONTEXT_OFFSET: the model reads it as its id,
# the loss never scores it (the record stays one row of ids; no tokenizer has 2^30 tokens).
CONTEXT_OFFSET = 1 << 30


def context_budget(seq_len: int, k: int) -> int:
    """Tokens of a record reserved for retrieved context: 0 without retrieval."""
    return seq_len // RETRIEVAL_SHARE if k > 0 else 0


def split_records(records: torch.Tensor, *, key: str, heldout: float, val: float) -> tuple[torch.Tensor, ...]:
    """Deterministic per-user shuffle, then held-out / validation / train."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    order = torch.randperm(records.shape[0], generator=torch.Generator().manual_seed(seed))
    records = records[order]
    n_held = max(1, round(records.shape[0] * heldout))
    held, rest = records[:n_held], records[n_held:]
    n_val = round(rest.shape[0] * val)
    return rest[n_val:], rest[:n_val], held


class TextTask(Task, task="text"):
    pad_id = -1  # set by load_base from the checkpoint's tokenizer
    seq_len = 0  # set by read_user: generation cuts the profile prefix as the records did
    retrieval_k = 0  # set by read_user: generation retrieves from the user's history as the records did

    def base_model_path(self, cfg: RunConfig) -> Path:
        if cfg.base_model:
            path = Path(cfg.base_model).expanduser()
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"base-model: no Hugging Face checkpoint (config.json) at {path}")
            return path
        population = cfg.data if cfg.data in shakespeare.POPULATIONS else "shakespeare"
        return ensure_base(steps=cfg.pretrain_steps, seq_len=cfg.seq_len, seed=cfg.seed, population=population)

    def load_base(self, path: Path) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        self.pad_id = load_tokenizer(path).pad_id
        model.requires_grad_(False)
        return model.eval()

    def materialize_users(self, cfg: RunConfig, dest: Path) -> list[Path]:
        if cfg.data in shakespeare.POPULATIONS:
            population = shakespeare.users(num_users=cfg.num_users, min_bytes=cfg.min_records * cfg.seq_len,
                                           population=cfg.data)
        else:
            population = synthetic_text.users(num_users=cfg.num_users, docs_per_user=cfg.min_records, seed=cfg.seed)
        if len(population) < cfg.num_users:
            raise ValueError(f"num-users: only {len(population)} users have >= {cfg.min_records} records")
        return [write_user(dest, name, docs) for name, docs in population.items()]

    def read_user(self, user_dir: Path, cfg: RunConfig, *, base_path: Path,
                  bindings: dict[str, Any] | None = None) -> UserData:
        budget = UserBudget()  # one cap for all of this user's files, the profile read first
        profile, skipped = read_profile(user_dir, budget=budget)
        texts, doc_skipped = read_documents(user_dir, budget=budget)
        counts = Counter(skipped) + Counter(doc_skipped)
        tok = load_tokenizer(base_path)
        self.seq_len, self.retrieval_k = cfg.seq_len, cfg.retrieval_k
        prefix, cut = profile_prefix(tok, profile, cfg.seq_len)
        if cut:
            counts["truncated-profile"] += 1
        budget = context_budget(cfg.seq_len, cfg.retrieval_k)
        text_len = cfg.seq_len - len(prefix) - budget  # >= 1/2 of the record: prefix and context are cut to fit
        docs = [tok.encode(text) for text in texts]
        chunks = [(d, start) for d, ids in enumerate(docs) for start in range(0, len(ids), text_len)
                  if len(ids[start : start + text_len]) >= _MIN_RECORD_TOKENS]
        if len(chunks) < 3:
            raise NoUsableDataError(f"user {user_dir.name}: {len(chunks)} usable records (need >= 3); "
                                    f"skipped {dict(counts) or 'nothing'}")
        # The split is of chunk indices (the same per-user shuffle as of the records themselves):
        # the retrieval pool is then built from training chunks only, so held-out text is never context.
        train_i, val_i, held_i = split_records(torch.arange(len(chunks)), key=user_dir.name,
                                               heldout=cfg.heldout_fraction, val=cfg.val_fraction)
        contexts = self._contexts(tok, docs, chunks, torch.cat([train_i, val_i]).tolist(), text_len=text_len,
                                  budget=budget, k=cfg.retrieval_k)

        def record(i: int) -> list[int]:
            d, start = chunks[i]
            ids = prefix + [t + CONTEXT_OFFSET for t in contexts[i]] + docs[d][start : start + text_len]
            return ids + [tok.pad_id] * (cfg.seq_len - len(ids))

        train, val, held = (torch.tensor([record(i) for i in part.tolist()], dtype=torch.long).view(-1, cfg.seq_len)
                            for part in (train_i, val_i, held_i))
        return UserData(train=train, val=val, heldout=held, skipped=dict(counts))

    @staticmethod
    def _contexts(tok: Tokenizer, docs: list[list[int]], chunks: list[tuple[int, int]], pool: list[int], *,
                  text_len: int, budget: int, k: int) -> list[list[int]]:
        """Per chunk, the retrieved context's token ids ([] without retrieval).

        The pool is the text of the chunks in ``pool`` (training and validation ones), per
        document; a chunk's query is the text before it in its own document (what the user
        had written so far), and its own document is never retrieved."""
        if k <= 0:
            return [[] for _ in chunks]
        pooled: list[list[int]] = [[] for _ in docs]
        for i in sorted(pool, key=lambda i: chunks[i]):
            d, start = chunks[i]
            pooled[d] += docs[d][start : start + text_len]
        history = History([tok.decode(ids) for ids in pooled])
        sep = tok.encode("\n")
        out = []
        for d, start in chunks:
            chosen = history.top_k(tok.decode(docs[d][:start]), k, exclude=d)
            out.append(context_ids([pooled[j] for j in chosen], budget=budget, sep=sep))
        return out

    def _token_losses(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stored = batch[:, 1:]
        mask = ((stored != self.pad_id) & (stored < CONTEXT_OFFSET)).float()  # retrieved context: not scored
        ids = torch.where(batch >= CONTEXT_OFFSET, batch - CONTEXT_OFFSET, batch)
        logits = model(input_ids=ids).logits[:, :-1]
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                              reduction="none").view_as(mask)
        return nll * mask, mask, logits

    def per_record_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # Mean over a record's own tokens: no record's loss depends on another (DP-SGD needs this).
        nll, mask, _ = self._token_losses(model, batch)
        return nll.sum(1) / mask.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def metrics(self, model: torch.nn.Module, records: torch.Tensor) -> dict[str, float]:
        total_nll = total_tokens = correct = 0.0
        for start in range(0, records.shape[0], EVAL_BATCH):
            batch = records[start : start + EVAL_BATCH]
            nll, mask, logits = self._token_losses(model, batch)
            targets = torch.where(batch >= CONTEXT_OFFSET, batch - CONTEXT_OFFSET, batch)[:, 1:]
            correct += float(((logits.argmax(-1) == targets).float() * mask).sum())
            total_nll += float(nll.sum())
            total_tokens += float(mask.sum())
        return {"ppl": math.exp(total_nll / max(total_tokens, 1.0)), "acc": correct / max(total_tokens, 1.0)}

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, base_path: Path, prompt: str, **kwargs: Any) -> str:
        """Continue ``prompt``, conditioned like training on the user's profile (``kwargs['profile']``,
        cut to the records' prefix budget: ``kwargs['seq_len']``, else the seq-len ``read_user`` used)."""
        tok = load_tokenizer(base_path)
        if not prompt:
            raise ValueError("text generation needs a prompt: the start of the text to continue")
        seq_len = int(kwargs.get("seq_len") or self.seq_len)
        if seq_len <= 0:
            raise ValueError("text generation needs the run's seq-len (read the user first, or pass seq_len)")
        prefix, _ = profile_prefix(tok, kwargs.get("profile") or {}, seq_len)  # tokenized apart, as in the records
        k = int(kwargs.get("retrieval_k", self.retrieval_k))
        history = list(kwargs.get("history") or [])  # the user's documents, read on the device
        context = []
        if k > 0 and history:
            docs = [tok.encode(text) for text in history]
            chosen = History(history).top_k(prompt, k)
            context = context_ids([docs[j] for j in chosen], budget=context_budget(seq_len, k), sep=tok.encode("\n"))
        ids = torch.tensor([prefix + context + tok.encode(prompt)], dtype=torch.long,
                           device=next(model.parameters()).device)
        out = model.generate(input_ids=ids, max_new_tokens=int(kwargs.get("max_new_tokens", 64)),
                             do_sample=True, top_k=int(kwargs.get("top_k", 20)), pad_token_id=tok.pad_id)
        return tok.decode(out[0, ids.shape[1]:].tolist())


def profile_line(profile: dict[str, str]) -> str:
    """The profile as one line: ``k=v ...`` and a newline; "" if none."""
    return " ".join(f"{k}={v}" for k, v in sorted(profile.items())) + "\n" if profile else ""


def profile_prefix(tok: Tokenizer, profile: dict[str, str], seq_len: int) -> tuple[list[int], bool]:
    """The tokens every record and every generation prompt start with, and whether they were cut.

    Parameters
    ----------
    tok
        The base model's tokenizer; the line is tokenized apart from the text that follows.
    profile
        The user's profile attributes.
    seq_len
        Tokens per record. The prefix takes at most ``seq_len // PROFILE_SHARE`` of them, so
        a long profile never crowds out the user's text: a longer line is cut and still ends
        with its newline (the boundary between profile and text the model learns).

    Returns
    -------
    tuple
        ``(token ids, cut)``.
    """
    ids = tok.encode(profile_line(profile))
    budget = seq_len // PROFILE_SHARE
    if len(ids) <= budget:
        return ids, False
    newline = tok.encode("\n")
    keep = budget - len(newline)
    return (ids[:keep] + newline if keep > 0 else []), True
