"""The behavior task: log reading and its bad inputs, records, HR@10 / NDCG@10, the item model."""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from fedpgen.client.device import Device
from fedpgen.shared.data.behavior_log import CATALOG_FILE, read_catalog, read_log, write_catalog
from fedpgen.shared.data.safe_read import LOG_MAX_BYTES
from fedpgen.shared.model import build_model
from fedpgen.shared.tasks import NoUsableDataError, get_task
from fedpgen.shared.tasks.behavior import LAYOUT_FILE, BehaviorTask, Layout

from conftest import task_kwargs

BEHAVIOR = task_kwargs("behavior")


def write_lines(user: Path, lines: list[str]) -> None:
    user.mkdir(parents=True, exist_ok=True)
    (user / "behavior.jsonl").write_text("\n".join(lines) + "\n")


def event(item: str, ts: float, kind: str = "play") -> str:
    return json.dumps({"item": item, "ts": ts, "event": kind})


def test_bad_log_lines_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    # Prepare: 5 good events, 2 malformed, 1 unknown item, 1 out of order
    index = {"a": 0, "b": 1, "c": 2}
    lines = [event("a", 10), "{not json", event("b", 20), json.dumps({"ts": 25}), event("zzz", 30),
             event("c", 40), event("a", 35), event("b", 50), "", event("c", 60, "purchase")]
    write_lines(tmp_path / "u", lines)
    # Execute
    items, skipped = read_log(tmp_path / "u", index)
    # Assert
    assert items == [0, 1, 2, 1, 2]
    assert skipped == {"malformed-line": 2, "unknown-item": 1, "out-of-order": 1}


def test_empty_missing_and_undecodable_logs_are_counted(tmp_path: Path) -> None:
    write_lines(tmp_path / "empty", [])
    assert read_log(tmp_path / "empty", {"a": 0}) == ([], {"empty-log": 1})
    (tmp_path / "none").mkdir()
    assert read_log(tmp_path / "none", {"a": 0}) == ([], {"empty-log": 1})
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "behavior.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    assert read_log(tmp_path / "bin", {"a": 0}) == ([], {"unreadable-file": 1, "empty-log": 1})


def test_an_infinite_timestamp_does_not_mark_every_later_event_out_of_order(tmp_path: Path) -> None:
    # Prepare: one event stamped with the string "Infinity" between good ones
    lines = [event("a", 10), json.dumps({"item": "b", "ts": "Infinity"}), event("b", 20), event("c", 30)]
    write_lines(tmp_path / "u", lines)
    # Execute
    items, skipped = read_log(tmp_path / "u", {"a": 0, "b": 1, "c": 2})
    # Assert
    assert (items, skipped) == ([0, 1, 2], {"malformed-line": 1})


def test_timestamps_must_be_finite_json_numbers_and_items_strings(tmp_path: Path) -> None:
    # Prepare: a numeric string, the NaN / Infinity literals, an overflowing float, a bool, a null
    # timestamp, an int item id; between two good events
    bad = ['{"item": "a", "ts": "1700000000"}', '{"item": "a", "ts": Infinity}', '{"item": "a", "ts": NaN}',
           '{"item": "a", "ts": 1e400}', '{"item": "a", "ts": true}', '{"item": "a", "ts": null}',
           '{"item": 7, "ts": 15}', '{"item": "a", "ts": 1' + "0" * 400 + "}"]
    write_lines(tmp_path / "u", [event("a", 10), *bad, event("b", 20)])
    # Execute
    items, skipped = read_log(tmp_path / "u", {"a": 0, "b": 1, "7": 2})
    # Assert
    assert (items, skipped) == ([0, 1], {"malformed-line": len(bad)})


def test_a_deeply_nested_log_line_is_malformed_not_a_crash(tmp_path: Path) -> None:
    # Prepare
    write_lines(tmp_path / "u", [event("a", 10), "[" * 100_000 + "]" * 100_000, event("b", 20)])
    # Execute
    items, skipped = read_log(tmp_path / "u", {"a": 0, "b": 1})
    # Assert
    assert (items, skipped) == ([0, 1], {"malformed-line": 1})


def test_a_symlinked_empty_or_oversized_log_is_counted_not_read(tmp_path: Path) -> None:
    # Prepare: a good log outside the user folders, linked in; a zero-byte log; a sparse log over the cap
    write_lines(tmp_path / "outside", [event("a", 10), event("b", 20)])
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "behavior.jsonl").symlink_to(tmp_path / "outside" / "behavior.jsonl")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "behavior.jsonl").write_bytes(b"")
    (tmp_path / "big").mkdir()
    with open(tmp_path / "big" / "behavior.jsonl", "wb") as f:
        f.truncate(LOG_MAX_BYTES + 1)
    index = {"a": 0, "b": 1}
    # Execute, Assert
    assert read_log(tmp_path / "link", index) == ([], {"symlink": 1, "empty-log": 1})
    assert read_log(tmp_path / "zero", index) == ([], {"empty-file": 1, "empty-log": 1})
    assert read_log(tmp_path / "big", index) == ([], {"too-large": 1, "empty-log": 1})


def test_an_empty_log_is_no_usable_data_and_bad_lines_reach_the_report(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), **BEHAVIOR)
    task = get_task("behavior")
    base = task.base_model_path(cfg)
    catalog = read_catalog(base / CATALOG_FILE)
    write_lines(tmp_path / "users" / "empty", [])
    with pytest.raises(NoUsableDataError, match="user empty: 0 usable events"):
        Device(cfg, user_dir=tmp_path / "users" / "empty", state_dir=tmp_path / "s1")
    good = [event(catalog[(7 * i) % 50], 1000 + i) for i in range(120)]
    write_lines(tmp_path / "users" / "messy", [*good, "garbage", event("no-such-item", 5000), event(catalog[1], 1)])
    (tmp_path / "users" / "messy" / "profile.json").write_text("[1, 2]")
    d = Device(cfg, user_dir=tmp_path / "users" / "messy", state_dir=tmp_path / "s2")
    _, _, metrics = d.fit(d.init_send, server_round=1)
    assert {k: v for k, v in metrics.items() if k.startswith("skipped-")} == {
        "skipped-malformed-line": 1, "skipped-unknown-item": 1, "skipped-out-of-order": 1,
        "skipped-malformed-profile": 1}


def test_records_score_disjoint_training_chunks_and_one_last_event_each(make_cfg) -> None:
    cfg = make_cfg(**BEHAVIOR)
    d = Device(cfg, user_dir=_first_user(cfg), state_dir=Path(cfg.run_dir) / "s")
    layout = d.task.layout
    train, val, held = d.data.train, d.data.val, d.data.heldout
    assert train.shape[1:] == (2, layout.length)
    # every training event is scored exactly once; validation / held-out records score one event each
    events = int(train[:, 1].sum()) + val.shape[0] + held.shape[0]
    log_len = sum(1 for _ in (_first_user(cfg) / "behavior.jsonl").open())
    assert events == log_len
    assert (val[:, 1].sum(1) == 1).all() and (held[:, 1].sum(1) == 1).all()
    # the held-out event of the last record is the log's last event
    last_item = json.loads((_first_user(cfg) / "behavior.jsonl").read_text().splitlines()[-1])["item"]
    catalog = read_catalog(d.base_path / CATALOG_FILE)
    pos = int(held[-1, 1].nonzero()[0]) + 1
    assert catalog[int(held[-1, 0, pos]) - layout.item_base] == last_item


def _first_user(cfg) -> Path:  # type: ignore[no-untyped-def]
    from fedpgen.shared.population import ensure_population

    return ensure_population(cfg)[0]


def test_hit_rate_and_ndcg_match_a_hand_computed_ranking() -> None:
    # Prepare: 3 records whose targets rank 0, 3 and 15 among 20 items
    layout = Layout(num_items=20, seq_len=2)
    task = BehaviorTask()
    task.layout = layout
    prefix = layout.prefix({})
    records = torch.tensor([layout.record(prefix, [5, t], range(1, 2)) for t in (0, 1, 2)])
    ranks = {0: 0, 1: 3, 2: 15}

    def forward(input_ids: torch.Tensor) -> types.SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, layout.vocab_size)
        for b in range(input_ids.shape[0]):
            target = int(input_ids[b, len(prefix) + 1]) - layout.item_base
            order = [i for i in range(20) if i != target]
            order.insert(ranks[target], target)
            for rank, item in enumerate(order):
                logits[b, :, layout.item_base + item] = 100.0 - rank
        return types.SimpleNamespace(logits=logits)

    # Execute
    out = task.metrics(forward, records)  # type: ignore[arg-type]
    # Assert
    assert out["hr10"] == pytest.approx(2 / 3)
    assert out["ndcg10"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)
    assert out["cov10"] == pytest.approx(11 / 20)  # top-10 lists: 0-9, 0-9, and 0-10 without 2
    assert out["nll"] == pytest.approx(float(sum(torch.logsumexp(100.0 - torch.arange(20.0), 0) - (100.0 - r)
                                                 for r in ranks.values())) / 3, rel=1e-5)


def test_the_item_model_has_no_padding_idx_and_one_is_refused(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(**BEHAVIOR)
    task = get_task("behavior")
    path = task.base_model_path(cfg)
    model = task.load_base(path)
    assert model.get_input_embeddings().padding_idx is None  # docs/privacy.md, "Exact per-record gradients"
    bad = tmp_path / "bad"
    model.config.pad_token_id = 0
    type(model)(model.config).save_pretrained(bad)
    for name in ("fedpgen_behavior.json", CATALOG_FILE):
        (bad / name).write_bytes((path / name).read_bytes())
    with pytest.raises(ValueError, match="padding_idx"):
        task.load_base(bad)


def test_a_local_behavior_checkpoint_is_loaded_and_an_incomplete_one_named(make_cfg, tmp_path: Path) -> None:
    # Prepare: a local checkpoint with the built base's architecture and other weights
    built = get_task("behavior").base_model_path(make_cfg(**BEHAVIOR))
    local = tmp_path / "local"
    torch.manual_seed(123)
    LlamaForCausalLM(AutoConfig.from_pretrained(built)).save_pretrained(local)
    for name in (LAYOUT_FILE, CATALOG_FILE):
        (local / name).write_bytes((built / name).read_bytes())
    # Execute: the model every device and the server build for that config
    b = build_model(make_cfg(base_model=str(local), **BEHAVIOR))
    # Assert: its base computes what the local checkpoint computes, not what the built base does
    ids = torch.tensor([b.task.layout.prefix({}) + [b.task.layout.item_base + i for i in (3, 1, 4, 1)]])
    with torch.no_grad(), b.model.disable_adapter():
        logits = b.model(input_ids=ids).logits
        want = AutoModelForCausalLM.from_pretrained(local)(input_ids=ids).logits
        other = AutoModelForCausalLM.from_pretrained(built)(input_ids=ids).logits
    assert b.base_path == local
    torch.testing.assert_close(logits, want)
    assert not torch.allclose(logits, other, atol=1e-3)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="fedpgen_behavior.json"):
        get_task("behavior").base_model_path(make_cfg(base_model=str(tmp_path / "half"), **BEHAVIOR))


class ScoredItems(torch.nn.Module):
    """An item model stand-in with known logits: after item i the items score ``scores(i)``; every
    other token scores far below. It records the windows it is given."""

    def __init__(self, layout: Layout, scores: Callable[[int], torch.Tensor]) -> None:
        super().__init__()
        self.layout, self.scores = layout, scores
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate reads the device off the parameters
        self.windows: list[list[int]] = []

    def forward(self, input_ids: torch.Tensor) -> types.SimpleNamespace:
        self.windows.append(input_ids[0].tolist())
        logits = torch.full((*input_ids.shape, self.layout.vocab_size), -1e4)
        logits[0, -1, self.layout.item_base :] = self.scores(int(input_ids[0, -1]) - self.layout.item_base)
        return types.SimpleNamespace(logits=logits)


@pytest.fixture
def catalog_dir(tmp_path: Path) -> tuple[BehaviorTask, Path, list[str]]:
    """A behavior task over a 20-item catalog (seq-len 4) and the folder holding the catalog."""
    task = BehaviorTask()
    task.layout = Layout(num_items=20, seq_len=4)
    catalog = [f"item-{j:02d}" for j in range(20)]
    write_catalog(tmp_path / CATALOG_FILE, [{"item": c} for c in catalog])
    return task, tmp_path, catalog


def test_generate_with_top_1_follows_the_models_argmax_from_the_history(
        catalog_dir: tuple[BehaviorTask, Path, list[str]]) -> None:
    # Prepare: after item i the model's best next item is i² + 1 (mod 20), the others further down
    task, path, catalog = catalog_dir
    layout = task.layout
    model = ScoredItems(layout, lambda i: -torch.abs(torch.arange(20.0) - (i * i + 1) % 20))
    # Execute
    out = task.generate(model, path, "item-01 item-02", top_k=1, max_new_items=6).split()
    # Assert: the chain from the last history item 2: 5, 6, 17, 10, 1, 2; the window slides
    chain = [5, 6, 17, 10, 1, 2]
    assert out == [catalog[i] for i in chain]
    tokens = layout.prefix({}) + [layout.item_base + i for i in [1, 2, *chain]]
    assert model.windows[0] == tokens[:7]  # profile prefix, BOS, the history
    assert model.windows[-1] == tokens[:-1][-layout.length :]  # at most the last record-length tokens
    with pytest.raises(ValueError, match="unknown item ids"):
        task.generate(model, path, "item-01 nope")


def test_generate_samples_only_the_top_k_by_their_softmax(catalog_dir: tuple[BehaviorTask, Path, list[str]]) -> None:
    # Prepare: items 4, 9, 13 score 2, 1, 0; item 15 scores -0.1, just outside the top 3; the rest -50
    task, path, catalog = catalog_dir
    scores = torch.full((20,), -50.0)
    scores[[4, 9, 13, 15]] = torch.tensor([2.0, 1.0, 0.0, -0.1])
    model = ScoredItems(task.layout, lambda i: scores)
    torch.manual_seed(0)
    # Execute
    out = task.generate(model, path, "item-00", top_k=3, max_new_items=400).split()
    # Assert: only the top 3, each at its softmax share of the three (to 5 standard errors)
    assert set(out) == {catalog[4], catalog[9], catalog[13]}
    shares = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0).tolist()
    for item, p in zip((4, 9, 13), shares, strict=True):
        assert abs(out.count(catalog[item]) / len(out) - p) < 5 * math.sqrt(p * (1 - p) / len(out))


def test_the_history_memory_mixes_the_users_item_frequencies_into_the_distribution() -> None:
    """With ``history-mix = b`` and the user's item frequencies h, the metrics are those of
    (1 - b) · softmax(logits) + b · h: its NLL, and its top-10 (an item the model ranks last but
    the user often had enters the list); without a memory, the model's own."""
    # Prepare: 3 records, targets 0, 1, 2 among 20 items; the model ranks item j at place j,
    # the user's training history is items 19 (three times) and 1 (once)
    layout = Layout(num_items=20, seq_len=2)
    task = BehaviorTask()
    task.layout, task.history_mix = layout, 0.5
    prefix = layout.prefix({})
    records = torch.tensor([layout.record(prefix, [5, t], range(1, 2)) for t in (0, 1, 19)])
    item_logits = 100.0 - torch.arange(20.0)

    def forward(input_ids: torch.Tensor) -> types.SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, layout.vocab_size)
        logits[..., layout.item_base :] = item_logits
        return types.SimpleNamespace(logits=logits)

    from fedpgen.shared.tasks.behavior import item_counts

    memory = item_counts([19, 19, 1, 19], 20)
    # Execute
    plain, mixed = task.metrics(forward, records), task.metrics(forward, records, memory)  # type: ignore[arg-type]
    # Assert
    assert memory.sum() == 4 and memory[19] == 3 and memory[1] == 1
    q = 0.5 * item_logits.softmax(0) + 0.5 * memory / 4
    assert mixed["nll"] == pytest.approx(float(-(q[0].log() + q[1].log() + q[19].log()) / 3), rel=1e-5)
    assert plain["nll"] == pytest.approx(float(-item_logits.log_softmax(0)[[0, 1, 19]].mean()), rel=1e-5)
    assert plain["hr10"] == pytest.approx(2 / 3) and mixed["hr10"] == pytest.approx(1.0)  # 19 enters the top 10
    # an item 200 logits below the best (no float32 mass in a softmax) that the user never had
    far = item_logits.clone()
    far[0] = -100.0
    mixed_far = task.with_memory(far, memory)
    assert torch.isfinite(mixed_far).all()
    assert float(mixed_far[0]) == pytest.approx(math.log(0.5) + float(far.log_softmax(0)[0]), rel=1e-6)
    task.history_mix = 0.0
    assert task.metrics(forward, records, memory) == plain  # type: ignore[arg-type]


def test_the_history_memory_is_the_training_events_and_only_personal_variants_use_it(make_cfg) -> None:
    """The memory counts the user's training events only (never a validation or held-out one);
    the four-way evaluation gives it to shared + personal and local-only, not to base or
    shared-only, and sends the same metric names as without it."""
    from fedpgen.client.evaluation import final_evaluation

    # Prepare: the same user and shared base, history-mix 0 and 0.5, no DP, a short fit
    metrics = {}
    for mix in (0.0, 0.5):
        cfg = make_cfg(**BEHAVIOR, dp="off", history_mix=mix, personal_max_steps=2, personal_eval_every=1,
                       run_dir=str(make_cfg(**BEHAVIOR).run_dir) + f"-{mix}")
        d = Device(cfg, user_dir=_first_user(cfg), state_dir=Path(cfg.run_dir) / "s", client_index=0)
        if mix:  # exactly the frequencies of the log's first n_train events (the training split)
            index = {item: i for i, item in enumerate(read_catalog(d.base_path / CATALOG_FILE))}
            items, _ = read_log(_first_user(cfg), index)
            n_train = int(d.data.train[:, 1].sum())
            want = torch.bincount(torch.tensor(items[:n_train]), minlength=len(index)).float()
            assert n_train < len(items) and torch.allclose(d.data.memory, want)
        else:
            assert d.data.memory is None
        # Execute
        metrics[mix] = final_evaluation(d, [a.copy() for a in d.init_send], four_way=True)
    # Assert
    off, on = metrics[0.0], metrics[0.5]
    assert set(on) == set(off)
    for variant in ("base", "shared"):
        assert on[f"{variant}-nll"] == pytest.approx(off[f"{variant}-nll"])
    for variant in ("personal", "local"):
        assert on[f"{variant}-nll"] != pytest.approx(off[f"{variant}-nll"])


def test_recommendations_of_the_personal_variant_follow_the_mixture(
        catalog_dir: tuple[BehaviorTask, Path, list[str]]) -> None:
    # Prepare: the model prefers item i + 1 after item i (by 2 logits over the rest); the user's
    # history is all item 7, mixed at 0.9
    from fedpgen.shared.tasks.behavior import item_counts

    task, path, catalog = catalog_dir
    model = ScoredItems(task.layout, lambda i: 2.0 * (torch.arange(20) == (i + 1) % 20).float())
    task.history_mix = 0.9
    memory = item_counts([7, 7, 7], 20)
    # Execute / Assert: with the memory the top item is 7; without (the shared variant) the model's
    assert task.generate(model, path, "item-01", top_k=1, max_new_items=2, memory=memory).split() == [catalog[7]] * 2
    assert task.generate(model, path, "item-01", top_k=1, max_new_items=2).split() == [catalog[2], catalog[3]]


def test_the_fit_through_the_mixture_leaves_each_training_events_own_count_out() -> None:
    """``history-mix-fit``: the personal fit's loss is the mixture's NLL. A training record's
    target is left out of the counts (a held-out event is not in them either: else the fit
    would leave every event it trains on to its own count); a validation record's counts are
    the user's as they are. Without a memory, the model's own loss; the gradient stays finite
    where the left-out count is 0."""
    # Prepare: targets 19 (3 of the user's 4 training events) and 1 (once), mixed at 0.5
    from fedpgen.shared.tasks.behavior import item_counts

    layout = Layout(num_items=20, seq_len=2)
    task = BehaviorTask()
    task.layout, task.history_mix = layout, 0.5
    prefix = layout.prefix({})
    records = torch.tensor([layout.record(prefix, [5, t], range(1, 2)) for t in (19, 1)])
    item_logits = torch.nn.Parameter(-0.1 * torch.arange(20.0))

    def forward(input_ids: torch.Tensor) -> types.SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, layout.vocab_size)
        logits = torch.cat([logits[..., : layout.item_base], item_logits.expand(*input_ids.shape, 20)], -1)
        return types.SimpleNamespace(logits=logits)

    memory = item_counts([19, 19, 1, 19], 20)
    p = item_logits.detach().softmax(0)
    # Execute
    counted = task.fit_loss(forward, records, memory, counted=True)  # type: ignore[arg-type]
    val = task.fit_loss(forward, records, memory, counted=False)  # type: ignore[arg-type]
    # Assert
    assert counted.tolist() == pytest.approx([-math.log(0.5 * p[19] + 0.5 * 2 / 3), -math.log(0.5 * p[1])], rel=1e-5)
    assert val.tolist() == pytest.approx([-math.log(0.5 * p[19] + 0.5 * 3 / 4), -math.log(0.5 * p[1] + 0.5 / 4)],
                                         rel=1e-5)
    counted.sum().backward()
    assert item_logits.grad is not None and torch.isfinite(item_logits.grad).all() and item_logits.grad.abs().sum() > 0
    plain = task.per_record_loss(forward, records)  # type: ignore[arg-type]
    assert torch.equal(task.fit_loss(forward, records, None, counted=True), plain)  # type: ignore[arg-type]
    task.history_mix = 0.0
    assert torch.equal(task.fit_loss(forward, records, memory, counted=True), plain)  # type: ignore[arg-type]


def test_only_the_personal_fit_trains_through_the_mixture_never_dp_sgd(make_cfg, monkeypatch) -> None:
    """With ``history-mix-fit`` and record-level DP: the user's counts enter the loss only while
    the personal part alone trains (never the private phase's, which is DP-SGD over the shared
    part); the fitted personal part differs from the fit without it; the wire metrics are the same."""
    from fedpgen.client.evaluation import final_evaluation
    from fedpgen.shared.presets import PERSONAL, SHARED
    from fedpgen.shared.training import train

    with pytest.raises(ValueError, match="memory never enters DP-SGD"):
        from fedpgen.shared.privacy.mechanism import RecordDP

        train(torch.nn.Linear(1, 1), [torch.nn.Parameter(torch.zeros(1))], torch.zeros(2, 1), task=BehaviorTask(),
              steps=1, batch_size=1, lr=0.1, gen=torch.Generator(), memory=torch.ones(3),
              privacy=RecordDP(noise_multiplier=1.0, clip=1.0, accountant="rdp", history=[]))
    # Prepare: a spy on the fit's loss that notes which parts train when it is called
    calls: list[set[str]] = []
    fit_loss = BehaviorTask.fit_loss

    def spy(self, model, batch, memory, *, counted):  # type: ignore[no-untyped-def]
        if memory is not None:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            calls.append({part for part in (SHARED, PERSONAL) if any(f".{part}." in n for n in names)})
        return fit_loss(self, model, batch, memory, counted=counted)

    monkeypatch.setattr(BehaviorTask, "fit_loss", spy)
    personal, sent = {}, {}
    for fit in (False, True):
        cfg = make_cfg(**BEHAVIOR, dp="epsilon", dp_epsilon=8.0, history_mix=0.5, history_mix_fit=fit,
                       run_dir=str(make_cfg(**BEHAVIOR).run_dir) + f"-{fit}")
        d = Device(cfg, user_dir=_first_user(cfg), state_dir=Path(cfg.run_dir) / "s", client_index=0)
        # Execute: a private round, then the four-way evaluation's fits
        _, _, sent[fit] = d.fit(d.init_send, server_round=1)
        personal[fit] = final_evaluation(d, [a.copy() for a in d.init_send], four_way=True)["personal-nll"]
    # Assert
    assert calls and all(parts <= {PERSONAL} for parts in calls), calls  # training or validating the personal part
    assert any(parts == {PERSONAL} for parts in calls)
    assert personal[True] != pytest.approx(personal[False])
    assert set(sent[True]) == set(sent[False])
