"""Issue 12, finding 1: DP noise and Poisson sampling cannot be reproduced from public values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpgen.client.device import Device
from fedpgen.shared.population import ensure_population


def _delta(cfg, user: Path, state: Path) -> list[np.ndarray]:
    d = Device(cfg, user_dir=user, state_dir=state)
    delta, _, _ = d.fit(d.init_send, server_round=1)
    return delta


def test_finding1_same_folder_data_and_seed_give_different_noised_deltas(make_cfg, tmp_path: Path) -> None:
    # Prepare: one user folder (same name, same data), the run seed public and fixed
    cfg = make_cfg(local_steps=2, personal_max_steps=0)
    user = ensure_population(cfg)[0]
    # Execute: two devices (two keys, two state-dirs) train the same round on the same folder
    a, b = _delta(cfg, user, tmp_path / "a"), _delta(cfg, user, tmp_path / "b")
    # Assert: anyone who knows the seed, the folder name and the data cannot recompute the noise
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_finding1_dp_randomness_comes_only_from_os_entropy(make_cfg, tmp_path: Path, monkeypatch) -> None:
    # Prepare: two devices whose seeded stream differs (the round seeds torch's global RNG, the
    # old source of the noise, together with the run seed and folder name); OS entropy is pinned
    cfg = make_cfg(local_steps=2, personal_max_steps=0)
    user = ensure_population(cfg)[0]
    monkeypatch.setattr("fedpgen.shared.privacy.mechanism.os.urandom", lambda n: b"\x2a" * n)
    a = Device(cfg, user_dir=user, state_dir=tmp_path / "a")
    b = Device(cfg, user_dir=user, state_dir=tmp_path / "b")
    # Execute: both train from the same shared base
    delta_a, _, _ = a.fit(a.init_send, server_round=1)
    delta_b, _, _ = b.fit(a.init_send, server_round=2)
    # Assert: the same noise and batches: nothing public feeds DP's randomness, only os.urandom
    for x, y in zip(delta_a, delta_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(np.abs(x).max() > 0 for x in delta_a)
