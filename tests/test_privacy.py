"""Record-level DP: clipping, what a DP step touches, accounting across restarts, budgets, config."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager

from fedpgen.server.results import RunRecorder
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.shared.adapters import active, get_tensors
from fedpgen.shared.config import RunConfig
from fedpgen.shared.presets import PRESETS
from fedpgen.shared.privacy.accounting import epsilon, poisson_sample_rate
from fedpgen.shared.privacy.mechanism import RecordDP
from fedpgen.shared.privacy.per_sample import OutputGradHooks
from fedpgen.shared.privacy.plan import BudgetExhaustedError
from fedpgen.shared.wire import BUDGET_EXHAUSTED, keys_digest

from conftest import TASK_CASES, Proxy, device


def _autograd_nodes(tensor: torch.Tensor, kind: str) -> int:
    """How many nodes of the autograd graph behind ``tensor`` have ``kind`` in their name."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return sum(kind in type(node).__name__ for node in seen)


def test_per_sample_gradients_are_exact_and_clipped_to_c(make_cfg, task_case) -> None:
    # Prepare: a hand-made batch of 4 records, σ = 0 so the step is exactly the clipped mean
    d = device(make_cfg(dp="sigma", dp_noise_multiplier=0.0, **task_case))
    batch = d.data.train[:4]
    clip = 0.05
    with active(d.model, ["shared"], d.sets.shared_trainable) as params:
        # Reference: a per-sample loop with plain autograd
        reference = []
        for i in range(4):
            grads = torch.autograd.grad(d.task.per_record_loss(d.model, batch[i : i + 1]).sum(), params)
            reference.append([g.detach() for g in grads])
        mech = RecordDP(noise_multiplier=0.0, clip=clip, accountant="prv", history=[])
        d.model.train()
        session = mech.open(d.model, params, batch, batch_size=4, lr=1e-3, gen=torch.Generator())
        session.optimizer.zero_grad(set_to_none=True)
        loss = d.task.per_record_loss(d.model, batch).mean()
        hook_nodes = _autograd_nodes(loss, "BackwardHookFunction")
        loss.backward()
        per_sample = [p.grad_sample.detach().clone() for p in params]
        session.optimizer.step()
        grads = [p.grad.detach().clone() for p in params]
        session.close()
    # Assert: no full backward hook in the graph (about a quarter of DP-SGD's extra step time:
    # shared/privacy/per_sample.py); Opacus' per-sample gradients equal the loop; each clipped one
    # has norm <= C
    assert hook_nodes == 0
    for j in range(len(params)):
        for i in range(4):
            torch.testing.assert_close(per_sample[j][i], reference[i][j], atol=1e-6, rtol=1e-4)
    norms = torch.stack([torch.sqrt(sum((r[j] ** 2).sum() for j in range(len(params)))) for r in reference])
    assert (norms > clip).all(), "the test needs gradients above C to exercise clipping"
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    for i in range(4):
        clipped_norm = torch.sqrt(sum(((factors[i] * r) ** 2).sum() for r in reference[i]))
        assert clipped_norm <= clip + 1e-6
    for j in range(len(params)):
        expected = sum(factors[i] * reference[i][j] for i in range(4)) / 4
        torch.testing.assert_close(grads[j], expected, atol=1e-7, rtol=1e-4)
    assert mech.history == [(0.0, 1.0, 1)]


@pytest.mark.parametrize("task", ["text", "behavior", "image"])
def test_output_grad_hooks_give_opacus_hooks_modes_per_sample_gradients(make_cfg, task: str) -> None:
    """The tensor-hook capture (``OutputGradHooks``) against Opacus' own ``GradSampleHooks`` (full
    backward hooks) on the same batch and the same random draws, every task's shared layers,
    the image UNet's attention LoRA included (its loss is stochastic, so no per-record loop)."""
    # Prepare
    overrides = {**TASK_CASES.get(task, {})} if task != "image" else {
        "task": "image", "min_records": 12, "heldout_fraction": 0.25, "val_fraction": 0.0}
    d = device(make_cfg(**overrides))
    batch = d.data.train[:4]
    got = {}
    with active(d.model, ["shared"], d.sets.shared_trainable) as params:
        with torch.no_grad():  # LoRA starts with B = 0, hence zero gradients for A: move every weight
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        d.model.train()
        for hooks_class in (GradSampleHooks, OutputGradHooks):
            # Execute
            hooks = hooks_class(d.model, batch_first=True, loss_reduction="mean")
            torch.manual_seed(7)
            d.task.per_record_loss(d.model, batch).mean().backward()
            got[hooks_class] = [p.grad_sample.detach().clone() for p in params]
            hooks.cleanup()
            for p in params:
                p.grad = None
    # Assert: one per-sample gradient per record and parameter, equal in both
    assert len(got[OutputGradHooks]) == len(params) > 0
    for ours, opacus in zip(got[OutputGradHooks], got[GradSampleHooks], strict=True):
        assert ours.shape[0] == 4 and float(opacus.abs().max()) > 0
        torch.testing.assert_close(ours, opacus, atol=1e-7, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus' hooks, on inputs without grad
def test_output_grad_hooks_sum_a_layer_used_twice_and_keep_each_record_apart() -> None:
    """A layer called twice in one forward (tied weights) gets the sum of both calls' per-sample
    gradients, as in Opacus' hooks mode and a per-record autograd loop; a second backward pass
    without an optimizer step is refused under Poisson sampling."""
    # Prepare
    torch.manual_seed(0)
    tied, head = torch.nn.Linear(5, 5), torch.nn.Linear(5, 1)
    head.requires_grad_(False)
    model = torch.nn.Sequential(tied, torch.nn.Tanh(), tied, head)
    x = torch.randn(6, 5)
    got = {}
    for hooks_class in (GradSampleHooks, OutputGradHooks):
        hooks = hooks_class(model, batch_first=True, loss_reduction="mean")
        # Execute
        model(x).pow(2).mean().backward()
        got[hooks_class] = (tied.weight.grad_sample.clone(), tied.bias.grad_sample.clone())
        hooks.cleanup()
        tied.zero_grad(set_to_none=True)
    reference = []
    for i in range(6):
        weight, bias = torch.autograd.grad(model(x[i : i + 1]).pow(2).sum(), (tied.weight, tied.bias))
        reference.append((weight, bias))
    # Assert
    for k in range(2):
        torch.testing.assert_close(got[OutputGradHooks][k], got[GradSampleHooks][k], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(got[OutputGradHooks][k], torch.stack([r[k] for r in reference]),
                                   atol=1e-6, rtol=1e-4)
    hooks = OutputGradHooks(model, batch_first=True, loss_reduction="mean")
    hooks.forbid_grad_accumulation()
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match="one backward pass per optimizer step"):
        model(x).pow(2).mean().backward()
    hooks.cleanup()


def test_a_dp_round_changes_only_what_it_trains(make_cfg) -> None:
    d = device(make_cfg(local_steps=1, personal_max_steps=0))
    before = get_tensors(d.model, tuple(n for n, _ in d.model.named_parameters()))
    d.fit(d.init_send, server_round=1)
    after = get_tensors(d.model, tuple(before))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(d.sets.shared_trainable)
    for n in changed:  # one Adam step moves each weight by about lr, never by much more
        assert 0 < float((after[n] - before[n]).abs().max()) <= 1.5 * d.cfg.lr


def test_under_pattern_a_the_shared_delta_does_not_depend_on_the_personal_part(make_cfg, tmp_path: Path,
                                                                              monkeypatch) -> None:
    # The DP noise is secret (OS entropy): fix it here so the two deltas can be compared.
    monkeypatch.setattr("fedpgen.shared.privacy.mechanism.os.urandom", lambda n: b"\x07" * n)
    cfg = make_cfg(preset="fedavg-lora")
    a = device(cfg, state=tmp_path / "a")
    b = device(cfg, state=tmp_path / "b")
    b.store.save_personal({k: torch.randn_like(v) for k, v in b.init_keep.items()})
    delta_a, _, _ = a.fit(a.init_send, server_round=1)
    delta_b, _, _ = b.fit(b.init_send, server_round=1)
    for x, y in zip(delta_a, delta_b):
        np.testing.assert_array_equal(x, y)
    assert any(np.abs(x).max() > 0 for x in delta_a)


def test_a_personal_head_in_the_shared_forward_pass_without_dp_is_refused() -> None:
    for preset in PRESETS.values():
        preset.check_pattern()  # every shipped schedule keeps the guarantee
    fedrep, fedsa = PRESETS["fedrep"], PRESETS["fedsa-lora"]
    head_without_dp = dataclasses.replace(fedrep, schedule=(dataclasses.replace(fedrep.schedule[0], private=False),
                                                            fedrep.schedule[1]))
    with pytest.raises(ValueError, match="voids the record-level guarantee"):
        head_without_dp.check_pattern()
    joint_without_dp = dataclasses.replace(fedsa, schedule=(dataclasses.replace(fedsa.schedule[0], private=False),))
    with pytest.raises(ValueError, match="voids"):
        joint_without_dp.check_pattern()


def test_resumed_accountant_equals_one_accountant_and_agrees_with_pld(make_cfg) -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    cfg = make_cfg(local_steps=4, num_server_rounds=3)
    rounds = []
    for r in (1, 2, 3):  # a fresh Device object each round: nothing carried in memory
        d = device(cfg)
        _, _, metrics = d.fit(d.init_send, server_round=r)
        rounds.append(metrics)
    sigma, q = rounds[0]["dp-sigma"], rounds[0]["dp-sample-rate"]
    assert [m["dp-steps"] for m in rounds] == [4, 4, 4]
    one = epsilon([(sigma, q, 12)], delta=cfg.dp_delta, accountant="prv")
    assert abs(rounds[-1]["dp-epsilon"] - one) < 1e-9
    assert rounds[-1]["dp-epsilon"] <= cfg.dp_epsilon * 1.0001  # σ was planned for the whole run
    assert [e.round for e in device(cfg).ledger.events()] == [1, 2, 3]
    # An independent accountant: Google's dp-accounting PLD. PRV and PLD are both near-exact for
    # the subsampled Gaussian (docs/privacy.md, "Accountants compared"); 3% covers their discretizations.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 12)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event)
    assert one == pytest.approx(pld.get_epsilon(cfg.dp_delta), rel=0.03)


def test_a_device_at_its_budget_refuses_and_the_server_stops_sampling_it(make_cfg, tmp_path: Path) -> None:
    probe = device(make_cfg())
    q = poisson_sample_rate(probe.data.num_train, probe.cfg.batch_size)
    two, three = (epsilon([(1.0, q, 3 * k)], delta=1e-5, accountant="prv") for k in (2, 3))
    cfg = make_cfg(dp="sigma", dp_noise_multiplier=1.0, dp_epsilon=(two + three) / 2, local_steps=3)
    d = device(cfg)
    spent = []
    with pytest.raises(BudgetExhaustedError, match="budget exhausted"):
        for r in range(1, 50):
            _, _, m = d.fit(d.init_send, server_round=r)
            spent.append(m["dp-epsilon"])
    assert len(spent) == 2 and spent[-1] == pytest.approx(two) and len(d.ledger.events()) == 2
    # Server side: the refusal is recognized and the node is never sampled again.
    names = ("a.lora_A.shared.weight",)
    strategy = SharedDeltaStrategy(cfg=make_cfg(min_fit_clients=1, num_server_rounds=10), names=names,
                                   theta=[np.zeros(2, np.float32)],
                                   completed=0, opt_state={}, recorder=RunRecorder(tmp_path / "run", cfg))

    manager = SimpleClientManager()
    proxies = [Proxy(i) for i in range(3)]
    for p in proxies:
        manager.register(p)  # type: ignore[arg-type]
    ok = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(2, np.float32)]), 5,
                {"keys-digest": keys_digest(names)})
    refused = FitRes(Status(Code.FIT_NOT_IMPLEMENTED, f"{BUDGET_EXHAUSTED}: spent"), Parameters([], ""), 0, {})
    strategy.aggregate_fit(1, [(proxies[0], ok), (proxies[1], ok)], [(proxies[2], refused)])
    assert strategy.refused == {2: BUDGET_EXHAUSTED}
    for r in range(2, 6):
        sampled = {c.node_id for c, _ in strategy.configure_fit(r, None, manager)}  # type: ignore[arg-type]
        assert sampled == {0, 1}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dp-clip": 0.0}, "'dp-clip'"),
        ({"dp-noise-multiplier": -0.5}, "'dp-noise-multiplier'"),
        ({"dp-delta": 0.0}, "'dp-delta'"),
        ({"dp-delta": 1.5}, "'dp-delta'"),
        ({"dp-epsilon": 0.0}, "'dp-epsilon'"),
        ({"dp-accountant": "moments"}, "'dp-accountant'"),
        ({"user-dp": "local"}, "'user-dp'"),
    ],
)
def test_invalid_privacy_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RunConfig.from_mapping(overrides)


def test_delta_must_be_below_one_over_records(make_cfg) -> None:
    d = device(make_cfg(dp_delta=0.5))
    with pytest.raises(ValueError, match="'dp-delta'.*1/records"):
        d.fit(d.init_send, server_round=1)


def test_privacy_parameters_cannot_change_mid_run(make_cfg) -> None:
    d = device(make_cfg())
    d.fit(d.init_send, server_round=1)
    changed = device(make_cfg(dp_epsilon=50.0))
    with pytest.raises(ValueError, match="cannot change mid-run"):
        changed.fit(changed.init_send, server_round=2)


def test_sigma_zero_is_labelled_not_private(make_cfg) -> None:
    d = device(make_cfg(dp="sigma", dp_noise_multiplier=0.0))
    _, _, metrics = d.fit(d.init_send, server_round=1)
    assert math.isinf(metrics["dp-epsilon"]) and metrics["dp-accountant"] == "none"
    assert d.ledger.events()[-1].private is False


def test_a_participation_cap_plans_sigma_for_the_cap_and_the_device_refuses_past_it(make_cfg) -> None:
    # Prepare: 10 rounds, a device that may train in at most 2 of them (sampled rarely)
    cfg = make_cfg(local_steps=4, num_server_rounds=10, dp_max_participations=2)
    every_round = make_cfg(local_steps=4, num_server_rounds=10)
    d = device(cfg)
    q = poisson_sample_rate(d.data.num_train, cfg.batch_size)
    # Execute: train until the device refuses
    spent = []
    with pytest.raises(BudgetExhaustedError, match="participation cap reached: trained 2 of at most 2"):
        for r in (1, 5, 9):  # rounds it happens to be sampled in
            _, _, m = d.fit(d.init_send, server_round=r)
            spent.append(m)
    # Assert: σ is the one for 2 × 4 steps (not 10 × 4), its whole budget is spent in those 2, and
    # the uncapped device's σ is larger (it pays for 10 participations it may never make)
    sigma = spent[0]["dp-sigma"]
    assert [m["dp-steps"] for m in spent] == [4, 4] and len(d.ledger.events()) == 2
    assert epsilon([(sigma, q, 8)], delta=cfg.dp_delta, accountant="prv") == pytest.approx(cfg.dp_epsilon, rel=1e-2)
    assert spent[-1]["dp-epsilon"] <= cfg.dp_epsilon * 1.0001
    uncapped = device(every_round, state=d.store.dir.parent / "uncapped")
    _, _, m = uncapped.fit(uncapped.init_send, server_round=1)
    assert m["dp-sigma"] > sigma * 1.3
    # The cheap pre-round check refuses too, and the cap cannot change mid-run
    from fedpgen.client.device import preflight
    from fedpgen.shared.population import ensure_population
    with pytest.raises(BudgetExhaustedError, match="participation cap"):
        preflight(cfg, user_dir=ensure_population(cfg)[0], state_dir=d.store.dir)
    raised = device(make_cfg(local_steps=4, num_server_rounds=10, dp_max_participations=3))
    with pytest.raises(ValueError, match="'dp-max-participations'.*cannot change mid-run"):
        raised.fit(raised.init_send, server_round=10)


def test_a_negative_participation_cap_names_the_field() -> None:
    with pytest.raises(ValueError, match="'dp-max-participations'"):
        RunConfig.from_mapping({"dp-max-participations": -1})


def test_the_server_never_samples_a_device_past_its_participation_cap(make_cfg, tmp_path: Path) -> None:
    # Prepare: 6 devices, 3 sampled per round, at most 2 participations each: 12 participations in all
    cfg = make_cfg(num_server_rounds=10, dp_max_participations=2, fraction_fit=0.5, min_fit_clients=3)
    strategy = SharedDeltaStrategy(cfg=cfg, names=("a.lora_A.shared.weight",), theta=[np.zeros(2, np.float32)],
                                   completed=0, opt_state={}, recorder=RunRecorder(tmp_path / "run", cfg))
    manager = SimpleClientManager()
    for i in range(6):
        manager.register(Proxy(i))  # type: ignore[arg-type]
    # Execute
    sampled = [[c.node_id for c, _ in strategy.configure_fit(r, None, manager)] for r in range(1, 11)]  # type: ignore[arg-type]
    # Assert: nobody past the cap (a refusal inside SecAgg+ is a dropout), then a loud stop
    counts = {i: sum(i in s for s in sampled) for i in range(6)}
    assert max(counts.values()) <= 2 and sum(counts.values()) >= 9
    assert sampled[-1] == [] and "reached dp-max-participations" in (strategy.stopped or "")
