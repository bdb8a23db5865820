"""Issue 14: the resident device runtime (client/runtime.py) — one model per process, no leak between users."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedpgen.client import runtime
from fedpgen.client.device import Device
from fedpgen.client.runtime import Runtime, lease
from fedpgen.shared.population import ensure_population


def _pin_entropy(monkeypatch) -> None:
    """DP noise and Poisson sampling draw from os.urandom: pinned, two runs draw the same."""
    monkeypatch.setattr("fedpgen.shared.privacy.mechanism.os.urandom", lambda n: b"\x2a" * n)


def _fit(device: Device, theta: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, torch.Tensor]]:
    delta, _, _ = device.fit(theta, server_round=1)
    return delta, device.store.load_personal()


def _same(a: tuple, b: tuple) -> bool:
    deltas = all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    return deltas and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_two_users_in_sequence_on_one_runtime_equal_two_fresh_processes(make_cfg, task_case, tmp_path: Path,
                                                                          monkeypatch) -> None:
    # Prepare: DP-SGD on (its entropy pinned so that runs compare), two users, the initial base
    cfg = make_cfg(**task_case, dp="epsilon", personal_max_steps=4)
    _pin_entropy(monkeypatch)
    users = ensure_population(cfg)[:2]
    theta = Runtime(cfg).built  # the seeded initial shared base, as the server builds it
    theta = [p.detach().numpy().copy() for n, p in theta.model.named_parameters() if n in theta.sets.send]
    runtime.drop()
    # Execute: each user on a fresh build (a fresh process), then both on one resident runtime,
    # user 0 also running the four-way evaluation (which trains a local-only model) in between
    fresh = [_fit(Device(cfg, user_dir=u, state_dir=tmp_path / "fresh" / u.name), theta) for u in users]
    models, resident = [], []
    for i, user in enumerate(users):
        with lease(cfg) as rt:
            models.append(rt.built.model)
            d = Device(cfg, user_dir=user, state_dir=tmp_path / "resident" / user.name, runtime=rt)
            resident.append(_fit(d, theta))
        if i == 0:
            with lease(cfg) as rt:
                Device(cfg, user_dir=user, state_dir=tmp_path / "resident" / user.name,
                       runtime=rt).evaluate(theta, four_way=True)
    # Assert: one model object served every message, and each user's delta and personal part
    # are bit-identical to its fresh-process result: nothing of user 0 reached user 1
    assert models[0] is models[1]
    assert not _same(fresh[0], fresh[1])  # the users differ, so equality below means something
    assert _same(resident[0], fresh[0])
    assert _same(resident[1], fresh[1])


def test_a_reset_runtime_equals_a_fresh_build_after_dp_training(make_cfg, tmp_path: Path) -> None:
    # Prepare: a resident runtime that trained one DP round (Opacus hooks, per-sample gradients)
    cfg = make_cfg(dp="epsilon")
    user = ensure_population(cfg)[0]
    runtime.drop()
    with lease(cfg) as rt:
        d = Device(cfg, user_dir=user, state_dir=tmp_path / "s", runtime=rt)
        d.fit(d.init_send, server_round=1)
        trained = {n: p.detach().clone() for n, p in rt.built.model.named_parameters()}
    # Execute: the next lease resets it
    with lease(cfg) as rt:
        model = rt.built.model
        state = {k: v.clone() for k, v in model.state_dict().items()}
        leftovers = [(n, a) for n, p in model.named_parameters() for a in ("grad_sample", "_forward_counter",
                                                                          "summed_grad") if hasattr(p, a)]
        grads = [n for n, p in model.named_parameters() if p.grad is not None or p.requires_grad]
    fresh = Runtime(cfg).built.model.state_dict()
    # Assert: the round changed the model, and the reset model is a fresh build, tensor by
    # tensor, with no gradient, no trainable flag and no Opacus attribute left over
    assert any(not torch.equal(trained[n], fresh[n]) for n in trained if n in fresh)
    assert state.keys() == fresh.keys()
    assert [k for k in state if not torch.equal(state[k], fresh[k])] == []
    assert leftovers == [] and grads == []


def test_a_runtime_with_a_stray_hook_is_rebuilt_and_a_new_config_replaces_the_old(make_cfg) -> None:
    # Prepare: the resident runtime of a config, then a hook nobody removed
    cfg = make_cfg()
    runtime.drop()
    with lease(cfg) as rt:
        first = rt.built.model
        handle = first.register_forward_hook(lambda *a: None)
    # Execute: lease again; then lease with another run config
    with lease(cfg) as rt:
        rebuilt = rt.built.model
    with lease(make_cfg(lora_rank=2)) as rt:
        other = rt.built.model
    handle.remove()
    # Assert: never a model with a hook it was not built with; one resident model per config
    assert rebuilt is not first and other is not rebuilt
    runtime.drop()
