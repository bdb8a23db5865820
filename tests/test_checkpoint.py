"""Checkpoints of the shared base: a resumed run continues exactly; another configuration's is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedpgen.server import checkpoint
from fedpgen.server.federation import make_strategy
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.shared.wire import keys_digest

from conftest import Proxy

NAMES = ("a.lora_A.shared.weight", "a.lora_B.shared.weight")
WEIGHTS = (3, 5)  # two devices, unequal weights: every round's mean is a real weighted mean


def run_round(strategy: SharedDeltaStrategy, server_round: int, absolute_round: int) -> None:
    """One round of two devices whose deltas depend only on the absolute round."""
    rng = np.random.default_rng(absolute_round)
    results = []
    for i, weight in enumerate(WEIGHTS):
        delta = [rng.uniform(-0.02, 0.02, shape).astype(np.float32) for shape in strategy.shapes]
        results.append((Proxy(i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), weight,
                                         {"keys-digest": keys_digest(strategy.names)})))
    strategy.aggregate_fit(server_round, results, [])  # type: ignore[arg-type]


def test_a_fedadam_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(make_cfg, tmp_path: Path) -> None:
    # Prepare: FedAdam, whose step depends on its moments m and v, not only on θ
    settings = {"server_optimizer": "fedadam", "server_lr": 0.01, "secure_aggregation": False, "min_fit_clients": 2,
                "num_server_rounds": 3}
    whole_cfg = make_cfg(run_dir=str(tmp_path / "whole"), **settings)
    split_cfg = make_cfg(run_dir=str(tmp_path / "split"), **settings)
    # Execute: three rounds in one go; and two rounds, then a new server resumed from the run folder
    whole = make_strategy(whole_cfg)
    for r in (1, 2, 3):
        run_round(whole, r, r)
    first = make_strategy(split_cfg)
    for r in (1, 2):
        run_round(first, r, r)
    resumed = make_strategy(split_cfg)
    assert resumed.completed == 2
    run_round(resumed, 1, 3)
    # Assert: the moments were saved and reloaded (not restarted from zeros): the same base
    saved = checkpoint.latest(Path(split_cfg.run_dir) / "checkpoints", config_hash=split_cfg.model_hash(),
                              names=resumed.names)
    assert saved is not None and saved.round == 3 and set(saved.opt_state) == {"m", "v"}
    for a, b in zip(whole.theta, resumed.theta, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(whole.theta, first.theta, strict=True)), "round 3 moved θ"


def test_a_checkpoint_written_by_another_configuration_is_refused(make_cfg, tmp_path: Path) -> None:
    # Prepare: a round-2 checkpoint of one configuration
    written = make_cfg(lora_alpha=16, num_server_rounds=2)
    other = make_cfg(lora_alpha=32, num_server_rounds=2)  # same layout, another meaning
    longer = make_cfg(lora_alpha=16, num_server_rounds=5)  # only more rounds: a resumable change
    theta = [np.full((2, 3), 0.5, np.float32), np.arange(3, dtype=np.float32)]
    checkpoint.save(tmp_path, server_round=2, config_hash=written.model_hash(), names=NAMES, theta=theta,
                    opt_state={})
    # Execute, Assert: another hash or another layout is refused, naming the run-dir as the fix
    with pytest.raises(ValueError, match="different configuration.*use another run-dir"):
        checkpoint.latest(tmp_path, config_hash=other.model_hash(), names=NAMES)
    with pytest.raises(ValueError, match="different configuration"):
        checkpoint.latest(tmp_path, config_hash=written.model_hash(), names=(*NAMES, "a.lora_A.extra.weight"))
    resumed = checkpoint.latest(tmp_path, config_hash=longer.model_hash(), names=NAMES)
    assert resumed is not None and resumed.round == 2
    for a, b in zip(resumed.theta, theta, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_server_refuses_to_resume_a_run_folder_of_another_configuration(make_cfg, tmp_path: Path) -> None:
    # Prepare: one round of a run in a folder
    cfg = make_cfg(secure_aggregation=False, min_fit_clients=2, run_dir=str(tmp_path / "run"))
    run_round(make_strategy(cfg), 1, 1)
    # Execute, Assert: the same folder with another setting that changes what the base means
    with pytest.raises(ValueError, match="different configuration"):
        make_strategy(make_cfg(secure_aggregation=False, min_fit_clients=2, run_dir=str(tmp_path / "run"),
                               lora_alpha=32))
