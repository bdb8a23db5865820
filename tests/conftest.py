"""Tiny real models: a byte-level Llama pre-trained for a few steps, synthetic users."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Each test session shares one tiny pre-trained base (cached by its settings).
os.environ.setdefault("FEDPGEN_CACHE", str(Path(__file__).resolve().parent.parent / ".fedpgen-cache"))
# Hypothesis caches constants of the code under test from collection on: keep it in that cache too.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(os.environ["FEDPGEN_CACHE"]) / "hypothesis"))

from shared.config import RunConfig  # noqa: E402

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


@pytest.fixture(params=sorted(TASK_CASES))
def task_case(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Overrides selecting one task (parametrizes a test over every registered task)."""
    return {k.replace("-", "_"): v for k, v in TASK_CASES[request.param].items()}


@pytest.fixture
def make_cfg(tmp_path: Path) -> Any:
    def make(**overrides: Any) -> RunConfig:
        values: dict[str, Any] = {**TINY, "run-dir": str(tmp_path / "run")}
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        return RunConfig.from_mapping(values)

    return make
