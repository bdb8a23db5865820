"""Tiny real models (a byte-level Llama pre-trained for a few steps, synthetic users), and the
helpers several test files share: a strategy's client stand-in, a user's device, the
simulation's link tapped, SecAgg+'s aggregate computed and its error bounded. Import them:
``from conftest import ...``."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

# Each test session shares one tiny pre-trained base (cached by its settings).
os.environ.setdefault("FEDPGEN_CACHE", str(Path(__file__).resolve().parent.parent / ".fedpgen-cache"))
# Hypothesis caches constants of the code under test from collection on: keep it in that cache too.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(os.environ["FEDPGEN_CACHE"]) / "hypothesis"))

from fedpgen.shared.config import RunConfig

if TYPE_CHECKING:

    from fedpgen.client.device import Device

TINY = {
    "data": "synthetic", "num-users": 3, "min-records": 30, "pretrain-steps": 30, "seq-len": 64,
    "num-server-rounds": 2, "local-steps": 3, "batch-size": 8, "personal-max-steps": 4,
    "personal-eval-every": 2, "lora-rank": 4, "personal-rank": 4,
}

# Per-task overrides on top of TINY: tests that specify the shared machinery run on every task.
TASK_CASES = {
    "text": {},
    "behavior": {"task": "behavior", "seq-len": 8, "min-records": 10, "heldout-fraction": 0.1,
                 "val-fraction": 0.1},
}


def task_kwargs(name: str) -> dict[str, Any]:
    """TASK_CASES[name] as keyword overrides for ``make_cfg``."""
    return {k.replace("-", "_"): v for k, v in TASK_CASES[name].items()}


@pytest.fixture(params=sorted(TASK_CASES))
def task_case(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Overrides selecting one task (parametrizes a test over every registered task)."""
    return task_kwargs(request.param)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Any:
    def make(**overrides: Any) -> RunConfig:
        values: dict[str, Any] = {**TINY, "run-dir": str(tmp_path / "run")}
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        return RunConfig.from_mapping(values)

    return make


# -- Shared stand-ins and helpers ------------------------------------------------------------


class Proxy:
    """What the strategy and Flower's client manager read of a ``ClientProxy``: its ids."""

    def __init__(self, node_id: int) -> None:
        self.node_id, self.cid = node_id, str(node_id)


def simulation_script(name: str) -> ModuleType:
    """``simulations/<name>.py`` as a module (registered in ``sys.modules``: its dataclasses need it)."""
    path = Path(__file__).resolve().parent.parent / "simulations" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def device(cfg: RunConfig, index: int = 0, state: Path | None = None) -> Device:
    """The device of user ``index`` of ``cfg``'s population; its state-dir the run's, or ``state``."""
    from fedpgen.client.device import Device
    from fedpgen.shared.population import ensure_population, state_dir

    users = ensure_population(cfg)
    return Device(cfg, user_dir=users[index], state_dir=state or state_dir(cfg, users[index]), client_index=index)


def server_received(run_dir: Path) -> list:
    """Every reply with content that the server received, as its wire transcript recorded it
    (``wire-transcript = true``; the ServerApp runs in Flower's simulation process, not here)."""
    from fedpgen.shared.wire_transcript import RUN_TRANSCRIPT_DIR, SERVER_STEM, UPLINK, WireEntry, read_transcript

    entries = list(read_transcript(Path(run_dir) / RUN_TRANSCRIPT_DIR / f"{SERVER_STEM}.jsonl"))
    assert all(isinstance(e, WireEntry) for e in entries), [e for e in entries if not isinstance(e, WireEntry)]
    return [e for e in entries if e.direction == UPLINK and e.error is None]


def secagg_mean(deltas: list[list[np.ndarray]], weights: list[int], *, clipping_range: float,
                quantization_range: int, max_weight: float,
                tamper: tuple[int, list[np.ndarray]] | None = None, modulus: int = 2**32) -> list[np.ndarray]:
    """What Flower 1.42's SecAgg+ hands the strategy, computed with its own quantization: each
    device's weight level and quantized weighted delta, summed mod ``modulus``, dequantized.

    ``tamper = (i, extra)``: device ``i`` adds ``extra`` to its masked vector (what a malicious
    device controls; masks are additive, so it adds to the sum)."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from fedpgen.server.bounds import quantized_weight

    c, q = clipping_range, quantization_range
    vectors = []
    for d, w in zip(deltas, weights, strict=True):
        level = quantized_weight(w, max_weight=max_weight, quantization_range=q)
        vectors.append([np.array([level])] + quantize([x * (level / q) for x in d], c, q))
    if tamper is not None:
        i, extra = tamper
        vectors[i] = [v.astype(np.int64) + e for v, e in zip(vectors[i], extra, strict=True)]
    sums = [sum(v[k].astype(np.int64) for v in vectors) % modulus for k in range(len(vectors[0]))]
    total, rest = sums[0][0], sums[1:]
    mean = dequantize(rest, c, q)
    for a in mean:
        a += -(len(vectors) - 1) * c
        a *= q / total
    return mean


def error_bound(*, num_clients: int, weights: list[float], clipping_range: float, quantization_range: int,
                max_weight: float, max_abs_delta: float) -> float:
    """Bound on |secure aggregate − plain weighted mean| per element, the tests' oracle.

    Each device sends stochastic-rounded levels of (w_i/max_weight)·Δ_i (error < one level
    2C/Q each) with its weight itself rounded to 1/Q; the sum is divided by Σ w_i/max_weight.
    """
    total = sum(weights) / max_weight
    level = 2.0 * clipping_range / quantization_range
    return (num_clients * level + 2.0 * num_clients * max_abs_delta / quantization_range) / total
