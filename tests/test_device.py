"""The device round: per preset, only the allowlist moves on the wire; the personal part persists."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fedpgen.shared.adapters import active, get_tensors, set_arrays, set_tensors
from fedpgen.shared.presets import PRESETS
from fedpgen.shared.wire import FIT_METRICS, VARIANTS, eval_metrics

from conftest import device, task_kwargs


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fit_returns_a_delta_over_the_allowlist_only(make_cfg, task_case, preset: str) -> None:
    # Prepare
    d = device(make_cfg(preset=preset, **task_case))
    sets = d.sets
    before = get_tensors(d.model, tuple(n for n, _ in d.model.named_parameters()))
    # Execute
    delta, n, metrics = d.fit(d.init_send, server_round=1)
    after = get_tensors(d.model, tuple(before))
    # Assert: the allowlist and only it is sent, none of it personal
    assert len(delta) == len(sets.send) and n == d.data.num_train
    assert not any(".personal." in name for name in sets.send)
    assert not set(sets.send) & set(sets.keep)
    assert all(np.isfinite(x).all() for x in delta)
    trained = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_base = {k for k in before if ".lora_" not in k}
    assert not trained & frozen_base, "a frozen base weight changed"
    moved_sent = {name for name, x in zip(sets.send, delta) if np.abs(x).max() > 0}
    assert moved_sent == set(sets.shared_trainable), "every trainable shared weight moved, frozen ones did not"
    if preset.startswith("ffa-lora"):
        assert all(re.search(r"lora_B\.shared", s) for s in sets.send)
    if preset == "fedsa-lora":
        assert all(re.search(r"lora_A\.shared", s) for s in sets.send)
        assert all(re.search(r"lora_B\.shared", s) for s in sets.keep)
    assert set(metrics) <= FIT_METRICS
    assert not {"train-loss", "val-loss-before", "val-loss-after"} & set(metrics), "DP runs send no losses"
    assert metrics["dp-epsilon"] <= d.cfg.dp_epsilon


def test_personal_part_survives_rounds_and_a_restart(make_cfg) -> None:
    cfg = make_cfg(personal_max_steps=6, personal_eval_every=1)
    d = device(cfg)
    d.fit(d.init_send, server_round=1)
    stored = d.store.load_personal()
    assert stored is not None and set(stored) == set(d.sets.keep)
    assert any(not torch.equal(stored[k], d.init_keep[k]) for k in stored), "personal part never trained"
    # A restart: a new Device (new model object, nothing in memory) from the same state-dir.
    again = device(cfg)
    again.load_personal()
    for name, value in get_tensors(again.model, again.sets.keep).items():
        assert torch.equal(value, stored[name])
    again.fit(again.init_send, server_round=2)
    assert again.store.load_meta()["rounds_trained"] == 2


def test_personal_early_stopping_keeps_the_best_validation_state(make_cfg) -> None:
    cfg = make_cfg(personal_max_steps=8, personal_eval_every=2, personal_lr=0.5, dp="off")  # lr high enough to overfit
    d = device(cfg)
    _, _, metrics = d.fit(d.init_send, server_round=1)
    assert metrics["personal-best-step"] in {0, 2, 4, 6, 8}
    assert metrics["val-loss-after"] <= metrics["val-loss-before"] + 1e-6 or metrics["personal-best-step"] == 0


@pytest.mark.parametrize("refit", ["continue", "fresh"])
def test_the_final_fit_starts_where_personal_refit_says(make_cfg, monkeypatch, refit: str) -> None:
    # Prepare: a round stores a personal part that validation prefers to none at all (fitted on
    # top of that round's base and the device's own update of it)
    d = device(make_cfg(personal_max_steps=6, personal_eval_every=1, dp="off", personal_refit=refit))
    d.fit(d.init_send, server_round=1)
    stored = d.store.load_personal()
    assert any(not torch.equal(stored[k], d.init_keep[k]) for k in stored), "the round stored no personal fit"
    d.load_personal()
    with_stored = d._val_loss()
    set_tensors(d.model, d.init_keep)
    assert with_stored < d._val_loss(), "validation does not prefer the stored part: the test would not tell"
    calls = []  # observe the starting point only
    monkeypatch.setattr(d, "run_phase", lambda phase, gen, privacy, final=False: calls.append(final))
    # Execute
    d.personalize(torch.Generator().manual_seed(0))
    start = get_tensors(d.model, d.sets.keep)
    assert calls == [True], "personalize is the final fit (personal-folds applies to it)"
    # Assert: "continue" starts from the stored part (validation prefers it), "fresh" from the
    # fresh init (the final base its prior)
    expected = stored if refit == "continue" else d.init_keep
    assert all(torch.equal(start[k], expected[k]) for k in start)


def test_without_validation_records_the_final_fit_continues_from_the_stored_personal_part(make_cfg,
                                                                                           monkeypatch) -> None:
    # Prepare: no validation split (the image task's setting); one round trains the personal part
    d = device(make_cfg(val_fraction=0.0, personal_max_steps=4))
    assert d.data.val.shape[0] == 0
    d.fit(d.init_send, server_round=1)
    stored = d.store.load_personal()
    assert any(not torch.equal(stored[k], d.init_keep[k]) for k in stored)
    # observe the starting point only
    monkeypatch.setattr(d, "run_phase", lambda phase, gen, privacy, final=False: None)
    # Execute
    d.personalize(torch.Generator().manual_seed(0))
    # Assert: it starts from what the rounds trained, not from scratch
    for name, value in get_tensors(d.model, d.sets.keep).items():
        assert torch.equal(value, stored[name])


def test_final_evaluation_reports_the_four_variants(make_cfg, task_case) -> None:
    d = device(make_cfg(**task_case))
    delta, _, _ = d.fit(d.init_send, server_round=1)
    shared = [a + b for a, b in zip(d.init_send, delta)]
    out = d.evaluate(shared)
    assert set(out) <= eval_metrics(d.task.metric_names)
    for v in VARIANTS:
        if d.task.name == "text":
            assert out[f"{v}-ppl"] > 1.0 and 0.0 <= out[f"{v}-acc"] <= 1.0
        else:
            assert 0.0 <= out[f"{v}-ndcg10"] <= out[f"{v}-hr10"] <= 1.0 and 0.0 < out[f"{v}-cov10"] <= 1.0
    likelihood = {"text": "ppl", "behavior": "nll"}[d.task.name]  # continuous: any change shows
    assert out[f"shared-{likelihood}"] != out[f"base-{likelihood}"], "the shared delta changed nothing"


def test_a_device_only_evaluation_scores_what_the_device_has_and_trains_nothing(make_cfg) -> None:
    from fedpgen.server.summary import evaluated_variants

    d = device(make_cfg())
    delta, _, _ = d.fit(d.init_send, server_round=1)
    shared = [a + b for a, b in zip(d.init_send, delta)]
    stored = (d.store.dir / "personal.safetensors.sealed").read_bytes()
    meta = d.store.load_meta()
    out = d.evaluate(shared, four_way=False)
    # No local-only baseline, no re-fit: the personal part scored is the one the device stored
    assert not [k for k in out if k.startswith("local-")] and {"base-ppl", "shared-ppl", "personal-ppl"} <= set(out)
    assert (d.store.dir / "personal.safetensors.sealed").read_bytes() == stored and d.store.load_meta() == meta
    d.load_personal()
    with active(d.model, ["shared", "personal"], ()):
        assert out["personal-ppl"] == pytest.approx(d.task.metrics(d.model, d.data.heldout)["ppl"], rel=1e-6)
    assert out["personal-ppl"] != out["shared-ppl"]  # the stored personal part is in use
    # The summary reads either kind: the variants every client reported
    four = {**out, "local-ppl": 9.0}
    assert evaluated_variants([out], "ppl") == ["base", "shared", "personal"]
    assert evaluated_variants([out, four], "ppl") == ["base", "shared", "personal"]
    assert evaluated_variants([four], "ppl") == list(VARIANTS)


def test_text_generation_is_conditioned_like_training_on_the_profile(make_cfg) -> None:
    d = device(make_cfg())
    with pytest.raises(ValueError, match="needs a prompt"):
        d.task.generate(d.model, d.base_path, "")
    outs = []
    for profile in ({}, {"style": "pirate"}, {}):
        torch.manual_seed(7)
        outs.append(d.task.generate(d.model, d.base_path, "The ", profile=profile, max_new_tokens=24))
    assert outs[0] == outs[2] and outs[0] != outs[1], "the same seed differs only by the profile prefix"


def test_fedavg_lora_head_shares_and_keeps_a_low_rank_output_head(make_cfg) -> None:
    # Prepare: the behavior task, whose users' favourites are a bias on the output
    # (no validation records: the personal phase trains its fixed steps, no early stopping)
    behavior = task_kwargs("behavior")
    d = device(make_cfg(preset="fedavg-lora-head", **{**behavior, "val_fraction": 0.0}))
    # Execute
    delta, _, _ = d.fit(d.init_send, server_round=1)
    stored = d.store.load_personal()
    # Assert: the personal part is a LoRA on the output head and only it; the shared one sits on
    # attention and on the output head (a second adapter on the same module, never kept)
    assert d.sets.keep and all(".lm_head.lora_" in k and ".personal." in k for k in d.sets.keep)
    head = [k for k in d.sets.send if ".lm_head.lora_" in k]
    assert len(head) == 2 and all(".shared." in k for k in head)
    assert all(re.search(r"self_attn\.\w+_proj\.lora_[AB]\.shared\.", k) for k in d.sets.send if k not in head)
    assert any(np.abs(x).max() > 0 for k, x in zip(d.sets.send, delta, strict=True) if k in head)
    assert stored is not None and set(stored) == set(d.sets.keep)
    moved = {k for k in stored if not torch.equal(stored[k], d.init_keep[k])}
    assert any(".lora_B." in k for k in moved), "the personal head never trained"
    assert any(np.abs(x).max() > 0 for x in delta)


def test_fedavg_lora_deep_keeps_a_personal_lora_on_every_group_and_sends_what_the_head_preset_sends(
        make_cfg, tmp_path) -> None:
    # Prepare: one behavior user, without DP (both runs must be reproducible), under the preset
    # with a personal LoRA on the head only and under the one with it on every group
    behavior = task_kwargs("behavior")
    cfg = {**behavior, "val_fraction": 0.0, "dp": "off"}
    head = device(make_cfg(preset="fedavg-lora-head", **cfg), state=tmp_path / "head")
    deep = device(make_cfg(preset="fedavg-lora-deep", **cfg), state=tmp_path / "deep")
    # Execute
    head_delta, _, _ = head.fit(head.init_send, server_round=1)
    deep_delta, _, _ = deep.fit(deep.init_send, server_round=1)
    stored = deep.store.load_personal()
    # Assert: the kept part is personal LoRA on attention, MLP and the output head; what is sent
    # (names and values) is exactly what the head preset sends: the personal part is off while
    # the shared one trains (pattern a), so a deeper personal part cannot reach the wire
    assert all(".personal." in k for k in deep.sets.keep)
    for module in ("self_attn.q_proj", "mlp.down_proj", "lm_head"):
        assert any(f".{module}.lora_B.personal." in k for k in deep.sets.keep), module
    assert deep.sets.send == head.sets.send
    assert all(np.array_equal(a, b) for a, b in zip(deep_delta, head_delta, strict=True))
    assert any(np.abs(x).max() > 0 for x in deep_delta)
    moved = {k for k in stored if not torch.equal(stored[k], deep.init_keep[k])}
    assert any(".mlp." in k for k in moved) and any(".lm_head." in k for k in moved), "the personal part never trained"


def test_ffa_lora_deep_sends_what_ffa_lora_sends_and_keeps_a_personal_lora_on_every_group(make_cfg, tmp_path) -> None:
    # Prepare: one text user without DP (both runs reproducible), under FFA-LoRA with the
    # personal LoRA on the MLP and under the deep variant with it on every group
    cfg = {**task_kwargs("text"), "val_fraction": 0.0, "dp": "off"}
    ffa = device(make_cfg(preset="ffa-lora", **cfg), state=tmp_path / "ffa")
    deep = device(make_cfg(preset="ffa-lora-deep", **cfg), state=tmp_path / "deep")
    # Execute
    ffa_delta, _, _ = ffa.fit(ffa.init_send, server_round=1)
    deep_delta, _, _ = deep.fit(deep.init_send, server_round=1)
    stored = deep.store.load_personal()
    # Assert: only the shared B is sent, with FFA-LoRA's names and values (the personal part is
    # off while the shared one trains); the kept part is a personal LoRA on attention, MLP and head
    assert deep.sets.send == ffa.sets.send and all(".lora_B.shared." in k for k in deep.sets.send)
    assert all(np.array_equal(a, b) for a, b in zip(deep_delta, ffa_delta, strict=True))
    assert any(np.abs(x).max() > 0 for x in deep_delta)
    for module in ("self_attn.q_proj", "mlp.down_proj", "lm_head"):
        assert any(f".{module}.lora_B.personal." in k for k in deep.sets.keep), module
    assert not any(".self_attn." in k for k in ffa.sets.keep)
    moved = {k for k in stored if not torch.equal(stored[k], deep.init_keep[k])}
    for group in (".self_attn.", ".mlp.", ".lm_head."):
        assert any(group in k for k in moved), f"the personal LoRA on {group} never trained"


def test_fedavg_bias_deep_sends_one_vector_that_is_added_to_the_logits(make_cfg) -> None:
    # Prepare: one behavior user without DP, under the preset whose shared part is an output bias
    behavior = task_kwargs("behavior")
    d = device(make_cfg(preset="fedavg-bias-deep", **{**behavior, "val_fraction": 0.0, "dp": "off"}))
    weights = tuple(n for n, _ in d.model.named_parameters() if re.search(r"\.lora_[AB]\.shared\.weight$", n))
    before = get_tensors(d.model, weights)
    records = d.data.train[:4, 0]  # token ids (the second row of a record is its scoring mask)
    # Execute
    delta, _, _ = d.fit(d.init_send, server_round=1)
    set_arrays(d.model, d.sets.send, [np.linspace(-1.0, 1.0, delta[0].size, dtype=np.float32)])
    with torch.no_grad():
        with d.model.disable_adapter():
            base = d.model(input_ids=records).logits
        with active(d.model, ["shared"], ()):
            shared = d.model(input_ids=records).logits
    # Assert: one vector leaves the device, a bias over the vocabulary; the shared LoRA's own
    # weights never train (B stays zero), so the shared model is the base plus that bias, scaled
    # as PEFT scales a LoRA (alpha / rank)
    assert d.sets.send == ("base_model.model.lm_head.lora_B.shared.bias",)
    assert delta[0].shape == (d.model.get_output_embeddings().base_layer.out_features,) and np.abs(delta[0]).max() > 0
    assert all(torch.equal(before[n], t) for n, t in get_tensors(d.model, weights).items())
    scale = d.cfg.lora_alpha / d.cfg.lora_rank
    torch.testing.assert_close(shared - base, scale * torch.linspace(-1.0, 1.0, delta[0].size).expand_as(base),
                               rtol=0, atol=1e-5)
    assert all(".personal." in k for k in d.sets.keep) and any(".mlp." in k for k in d.sets.keep)


def test_fedavg_bias_bias_keeps_one_vector_and_sends_one_vector_both_added_to_the_logits(make_cfg) -> None:
    # Prepare: one behavior user without DP, under the preset whose shared and personal parts are
    # each an output bias
    behavior = task_kwargs("behavior")
    d = device(make_cfg(preset="fedavg-bias-bias", **{**behavior, "val_fraction": 0.0, "dp": "off"}))
    weights = tuple(n for n, _ in d.model.named_parameters() if re.search(r"\.lora_[AB]\.\w+\.weight$", n))
    before = get_tensors(d.model, weights)
    records = d.data.train[:4, 0]
    # Execute
    delta, _, _ = d.fit(d.init_send, server_round=1)
    stored = d.store.load_personal()
    with torch.no_grad():
        with active(d.model, ["shared"], ()):
            shared = d.model(input_ids=records).logits
        with active(d.model, ["shared", "personal"], ()):
            both = d.model(input_ids=records).logits
    # Assert: one vector leaves, one vector stays (the personal bias, trained, sealed); no LoRA
    # weight of either adapter trains; the personal model is the shared one plus that bias
    assert d.sets.send == ("base_model.model.lm_head.lora_B.shared.bias",) and np.abs(delta[0]).max() > 0
    assert d.sets.keep == d.sets.personal_trainable == ("base_model.model.lm_head.lora_B.personal.bias",)
    (name,) = d.sets.keep
    assert stored is not None and set(stored) == {name} and not torch.equal(stored[name], d.init_keep[name])
    assert all(torch.equal(before[n], t) for n, t in get_tensors(d.model, weights).items())
    scale = d.cfg.lora_alpha / d.cfg.personal_rank
    torch.testing.assert_close(both - shared, (scale * stored[name]).expand_as(both), rtol=0, atol=1e-5)
