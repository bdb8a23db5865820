"""behavior logs -> next items: personalized recommendation as generation over item ids.

The model is a small causal transformer over the catalog's item ids (a ``transformers``
Llama built from a config, ``pad_token_id=None`` so no embedding has a ``padding_idx``:
docs/privacy.md, "Exact per-record gradients"), pre-trained by the project on a *public*
synthetic population whose popularity differs from the federated users'. A record is a
row pair ``[2, T]``: token ids ``[profile tokens, BOS, items...]`` and a mask of the
positions whose next token is scored. Training records are disjoint chunks of
``seq-len`` consecutive events (each event is scored in exactly one record, so
record-level DP protects every chunk of ``seq-len`` events); validation and held-out
records score one event each, the user's *last* events in time, with up to
``seq-len - 1`` earlier events as context.

Profile attributes (``profile.json``) condition the model through hashed profile tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fedpgen.shared.data import synthetic_behavior as synth
from fedpgen.shared.data.behavior_log import CATALOG_FILE, read_catalog, read_log, write_catalog, write_log
from fedpgen.shared.data.safe_read import UserBudget
from fedpgen.shared.data.user_folder import read_profile
from fedpgen.shared.tasks.base import NoUsableDataError, Task, UserData
from fedpgen.shared.tasks.cache import MARKER, ensure_built
from fedpgen.shared.tasks.pretraining import pretrain_loop

if TYPE_CHECKING:
    from fedpgen.shared.config import RunConfig

log = logging.getLogger(__name__)

LAYOUT_FILE = "fedpgen_behavior.json"
ARCH = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}
PROFILE_SLOTS, PROFILE_BUCKETS = 4, 64
PUBLIC_USERS, PUBLIC_EVENTS = 400, (150, 300)
PRETRAIN_BATCH, PRETRAIN_LR = 32, 3e-3
TOP_K = 10
EVAL_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Layout:
    """Token ids: PAD (masked, never scored), BOS, hashed profile buckets, then the catalog's items."""

    num_items: int
    seq_len: int
    pad: int = 0
    bos: int = 1
    profile_base: int = 2
    profile_buckets: int = PROFILE_BUCKETS
    profile_slots: int = PROFILE_SLOTS

    @property
    def item_base(self) -> int:
        return self.profile_base + self.profile_buckets

    @property
    def vocab_size(self) -> int:
        return self.item_base + self.num_items

    @property
    def length(self) -> int:
        """Tokens per record: profile slots, BOS, up to ``seq_len`` items."""
        return self.profile_slots + 1 + self.seq_len

    def prefix(self, profile: dict[str, str]) -> list[int]:
        """Left-padded hashed profile tokens, then BOS (always ``profile_slots + 1`` tokens)."""
        tokens = []
        for key, value in sorted(profile.items())[: self.profile_slots]:
            digest = hashlib.sha256(f"{key}={value}".encode()).digest()
            tokens.append(self.profile_base + int.from_bytes(digest[:4], "little") % self.profile_buckets)
        return [self.pad] * (self.profile_slots - len(tokens)) + tokens + [self.bos]

    def record(self, prefix: list[int], items: list[int], scored: range) -> list[list[int]]:
        """One record: ids and the mask of positions whose *next* token (an item) is scored."""
        ids = prefix + [self.item_base + i for i in items]
        ids += [self.pad] * (self.length - len(ids))
        mask = [0] * self.length
        for j in scored:  # item j sits at position len(prefix) + j, predicted from the position before
            mask[len(prefix) + j - 1] = 1
        return [ids, mask]


def item_counts(items: list[int], num_items: int) -> torch.Tensor:
    """How often each catalog item occurs among ``items`` (a user's training events), as floats."""
    return torch.bincount(torch.tensor(items, dtype=torch.long), minlength=num_items).float()


def split_sizes(n: int, heldout_fraction: float, val_fraction: float) -> tuple[int, int, int]:
    """(training, validation, held-out) events of a log of ``n``, in time order: the held-out
    events are the last, at least one."""
    n_held = max(1, round(n * heldout_fraction))
    n_val = round((n - n_held) * val_fraction)
    return n - n_held - n_val, n_val, n_held


def load_layout(path: Path) -> Layout:
    file = path / LAYOUT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"behavior base-model {path}: no {LAYOUT_FILE} (token layout) next to config.json; "
                                f"a behavior checkpoint needs config.json, {LAYOUT_FILE} and {CATALOG_FILE}")
    return Layout(**json.loads(file.read_text()))


class BehaviorTask(Task, task="behavior"):
    layout: Layout | None = None  # set by load_base
    history_mix = 0.0  # set by read_user (history-mix): the weight of the user's item frequencies

    # -- base model -------------------------------------------------------------------------
    def base_model_path(self, cfg: RunConfig) -> Path:
        if cfg.base_model:
            path = Path(cfg.base_model).expanduser()
            for name in ("config.json", LAYOUT_FILE, CATALOG_FILE):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"base-model: no {name} at {path} (a behavior checkpoint needs "
                                            f"config.json, {LAYOUT_FILE} and {CATALOG_FILE})")
            return path
        key = {"arch": ARCH, "world": dataclasses.asdict(synth.World()), "steps": cfg.pretrain_steps,
               "seq_len": cfg.seq_len, "seed": cfg.seed, "public": [PUBLIC_USERS, *PUBLIC_EVENTS],
               "batch": PRETRAIN_BATCH, "lr": PRETRAIN_LR, "v": 1}
        return ensure_built("behavior", key, lambda dest: pretrain(dest, steps=cfg.pretrain_steps,
                                                                   seq_len=cfg.seq_len, seed=cfg.seed))

    def load_base(self, path: Path) -> torch.nn.Module:
        self.layout = load_layout(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        if model.get_input_embeddings().padding_idx is not None:  # docs/privacy.md, "Exact per-record gradients"
            raise ValueError(f"{path}: the item embedding has padding_idx set; DP-SGD needs pad_token_id=None")
        model.requires_grad_(False)
        return model.eval()

    def _layout(self, base_path: Path) -> Layout:
        if self.layout is None:
            self.layout = load_layout(base_path)
        return self.layout

    # -- users ------------------------------------------------------------------------------
    def materialize_users(self, cfg: RunConfig, dest: Path) -> list[Path]:
        low = cfg.min_records * cfg.seq_len
        population = synth.iter_users(num_users=cfg.num_users, events_per_user=(low, low * 3 // 2), seed=cfg.seed)
        write_catalog(dest / CATALOG_FILE, synth.catalog(synth.World(), cfg.seed))  # public, for reference
        written = []
        for name, (events, profile) in population:  # written one user at a time: memory bounded by one user
            write_log(dest / name, events)
            (dest / name / "profile.json").write_text(json.dumps(profile), encoding="utf-8")
            written.append(dest / name)
        return written

    def read_user(self, user_dir: Path, cfg: RunConfig, *, base_path: Path,
                  bindings: dict[str, Any] | None = None) -> UserData:
        layout = self._layout(base_path)
        if layout.seq_len != cfg.seq_len:
            raise ValueError(f"config 'seq-len': {cfg.seq_len} but the behavior base was built for {layout.seq_len}")
        index = {item: i for i, item in enumerate(read_catalog(base_path / CATALOG_FILE))}
        budget = UserBudget()  # one cap for all of this user's files, the profile read first
        profile, skipped = read_profile(Path(user_dir), budget=budget)
        items, log_skipped = read_log(Path(user_dir), index, budget=budget)
        skipped = dict(Counter(skipped) + Counter(log_skipped))
        n_train, n_val, _ = split_sizes(len(items), cfg.heldout_fraction, cfg.val_fraction)
        if n_train < 2 * cfg.seq_len or len(items) < 4:
            raise NoUsableDataError(f"user {Path(user_dir).name}: {len(items)} usable events, {n_train} for "
                                    f"training (need >= {2 * cfg.seq_len}: two records of seq-len events); "
                                    f"skipped {skipped or 'nothing'}")
        prefix = layout.prefix(profile)
        train = [layout.record(prefix, items[s : s + cfg.seq_len], range(min(cfg.seq_len, n_train - s)))
                 for s in range(0, n_train, cfg.seq_len) if n_train - s >= 1]

        def one_target(t: int) -> list[list[int]]:  # event t scored, up to seq_len - 1 events before it
            start = max(0, t - cfg.seq_len + 1)
            return layout.record(prefix, items[start : t + 1], range(t - start, t - start + 1))

        val = [one_target(t) for t in range(n_train, n_train + n_val)]
        held = [one_target(t) for t in range(n_train + n_val, len(items))]

        def tensor(rows: list[list[list[int]]]) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 2, layout.length)

        self.history_mix = cfg.history_mix
        return UserData(train=tensor(train), val=tensor(val), heldout=tensor(held), skipped=skipped,
                        memory=item_counts(items[:n_train], layout.num_items) if cfg.history_mix else None)

    # -- loss and metrics -------------------------------------------------------------------
    def _scored_logits(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """Item logits ``[B, T, items]``, next-item targets ``[B, T]`` and the mask ``[B, T]``."""
        assert self.layout is not None
        ids, mask = batch[:, 0], batch[:, 1].float()
        logits = model(input_ids=ids).logits[..., self.layout.item_base :].float()
        targets = torch.roll(ids, -1, dims=1) - self.layout.item_base
        targets = torch.where(mask > 0, targets, torch.zeros_like(targets))
        return logits, targets, mask

    def per_record_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        # Mean next-item cross-entropy over a record's own scored positions (DP-SGD needs independence).
        logits, targets, mask = self._scored_logits(model, batch)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="none").view_as(mask)
        return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def with_memory(self, logits: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """Item logits, or with the user's item counts ``memory`` the log of the mixture
        (1 - history-mix) · softmax(logits) + history-mix · frequencies: a distribution, so the
        cross-entropy is its NLL and its top-k its recommendations. In log space: an item the
        model gives no float mass and the user never had keeps a finite log-probability."""
        if memory is None or not self.history_mix:
            return logits
        counts = memory.to(logits.device)
        return self._mixed(logits.log_softmax(-1), counts / counts.sum().clamp_min(1.0))

    def _mixed(self, model_logp: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """log((1 - history-mix) · exp(model_logp) + history-mix · share), finite where share is 0."""
        b = self.history_mix
        return torch.logaddexp(math.log1p(-b) + model_logp, math.log(b) + share.log())

    def fit_loss(self, model: torch.nn.Module, batch: torch.Tensor, memory: torch.Tensor | None, *,
                 counted: bool) -> torch.Tensor:
        """With ``history-mix-fit``: the NLL of the mixture ``with_memory`` scores, so the personal
        part learns what the user's counts do not already say. A training record's own event is
        left out of the counts (``counted``), as a held-out event is not in them: else the fit
        would learn to leave every event it trains on to its own count."""
        if memory is None or not self.history_mix:
            return self.per_record_loss(model, batch)
        logits, targets, mask = self._scored_logits(model, batch)
        own, counts = float(counted), memory.to(logits.device)
        share = (counts[targets] - own).clamp_min(0.0) / (counts.sum() - own).clamp_min(1.0)
        nll = -self._mixed(logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1), share)
        return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def evaluate(self, model: torch.nn.Module, records: torch.Tensor,
                 memory: torch.Tensor | None = None) -> tuple[dict[str, float], Any]:
        return self.metrics(model, records, memory), None

    @torch.no_grad()
    def metrics(self, model: torch.nn.Module, records: torch.Tensor,
                memory: torch.Tensor | None = None) -> dict[str, float]:
        """HR@10 and NDCG@10 of the scored event of each record; coverage: share of the catalog
        appearing in this user's top-10 lists; mean next-item negative log-likelihood. With
        ``memory`` (a personal variant, ``history-mix`` > 0), of the mixture (``with_memory``)."""
        assert self.layout is not None
        hits = ndcg = nll = 0.0
        count = 0
        recommended: set[int] = set()
        for start in range(0, records.shape[0], EVAL_BATCH):
            logits, targets, mask = self._scored_logits(model, records[start : start + EVAL_BATCH])
            rows, cols = mask.nonzero(as_tuple=True)
            scores, truth = self.with_memory(logits[rows, cols], memory), targets[rows, cols]
            top = scores.topk(TOP_K, dim=-1).indices
            recommended.update(top.flatten().tolist())
            match = top == truth[:, None]
            rank = match.float().argmax(-1)
            hit = match.any(-1)
            hits += float(hit.sum())
            nll += float(F.cross_entropy(scores, truth, reduction="sum"))
            ndcg += float((hit.float() / torch.log2(rank.float() + 2.0)).sum())
            count += int(hit.numel())
        count = max(count, 1)
        return {"hr10": hits / count, "ndcg10": ndcg / count, "cov10": len(recommended) / self.layout.num_items,
                "nll": nll / count}

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, base_path: Path, prompt: str, **kwargs: Any) -> str:
        """Continue a space-separated history of item ids with ``max_new_items`` sampled items."""
        layout = self._layout(base_path)
        catalog = read_catalog(base_path / CATALOG_FILE)
        index = {item: i for i, item in enumerate(catalog)}
        unknown = [w for w in prompt.split() if w not in index]
        if unknown:
            raise ValueError(f"unknown item ids in the prompt: {unknown[:5]}")
        history = [index[w] for w in prompt.split()]
        ids = layout.prefix(dict(kwargs.get("profile", {}))) + [layout.item_base + i for i in history]
        out: list[str] = []
        for _ in range(int(kwargs.get("max_new_items", 5))):
            window = torch.tensor([ids[-layout.length :]], dtype=torch.long, device=next(model.parameters()).device)
            logits = self.with_memory(model(input_ids=window).logits[0, -1, layout.item_base :].float(),
                                      kwargs.get("memory"))
            top = logits.topk(int(kwargs.get("top_k", TOP_K)))
            pick = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1)])
            ids.append(layout.item_base + pick)
            out.append(catalog[pick])
        return " ".join(out)


def pretrain(dest: Path, *, steps: int, seq_len: int, seed: int) -> None:
    """Pre-train the item model on a public population (other users, last season's popularity)."""
    torch.manual_seed(seed)
    world = synth.World()
    layout = Layout(num_items=world.num_items, seq_len=seq_len)
    public = synth.users(num_users=PUBLIC_USERS, events_per_user=PUBLIC_EVENTS, seed=seed, public=True)
    index = {item["item"]: i for i, item in enumerate(synth.catalog(world, seed))}
    seqs = [(layout.prefix(profile), [index[e["item"]] for e in events]) for events, profile in public.values()]
    gen = torch.Generator().manual_seed(seed)
    config = LlamaConfig(vocab_size=layout.vocab_size, max_position_embeddings=layout.length,
                         tie_word_embeddings=False, bos_token_id=layout.bos, eos_token_id=None,
                         pad_token_id=None, **ARCH)
    model = LlamaForCausalLM(config)
    task = BehaviorTask()
    task.layout = layout

    def batch(n: int, g: torch.Generator) -> torch.Tensor:
        rows = []
        for u in torch.randint(0, len(seqs), (n,), generator=g).tolist():
            prefix, items = seqs[u]
            s = int(torch.randint(0, len(items) - seq_len, (1,), generator=g))
            rows.append(layout.record(prefix, items[s : s + seq_len], range(seq_len)))
        return torch.tensor(rows, dtype=torch.long)

    started = time.perf_counter()
    model.train()
    pretrain_loop(list(model.parameters()), lambda: task.per_record_loss(model, batch(PRETRAIN_BATCH, gen)).mean(),
                  steps=steps, lr=PRETRAIN_LR, description="pre-training the item model")
    model.eval()
    held = batch(256, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        public_loss = float(task.per_record_loss(model, held).mean())
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    write_catalog(dest / CATALOG_FILE, synth.catalog(world, seed))
    (dest / LAYOUT_FILE).write_text(json.dumps(dataclasses.asdict(layout), indent=2))
    meta = {"steps": steps, "seq_len": seq_len, "seed": seed, "public_next_item_nll": public_loss,
            "seconds": time.perf_counter() - started, "parameters": sum(p.numel() for p in model.parameters())}
    (dest / MARKER).write_text(json.dumps(meta, indent=2))
    log.info("pre-trained item model: %d steps, public next-item NLL %.3f", steps, public_loss)
