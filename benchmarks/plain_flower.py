"""The plain-Flower reference of benchmarks/scale.py: a minimal Flower app, the same work.

A ClientApp and ServerApp as Flower's own tutorials write them (Message API, Flower's
``FedAvg``), training FedPGen's model — the same base, adapters and users' records — for
the same steps per round (``local-steps`` on the shared adapter, then
``personal-max-steps`` on the personal one: the preset's phases, with their adapters in the
forward pass; AdamW, the same batch size), with no DP, no
SecAgg+, no ledger, no sealed state, no checks. The model is built once per worker process,
as any sensible Flower app would. Round time is measured the way FedPGen's strategy does
(from configuring the round to aggregating it).

Run by ``python benchmarks/scale.py --plain`` (same population, same settings, one invocation).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.server import Grid
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedpgen.shared.adapters import active, get_arrays, set_arrays
from fedpgen.shared.config import RunConfig
from fedpgen.shared.model import build_model
from fedpgen.shared.presets import PERSONAL, SHARED

_MODEL: dict[str, object] = {}


def _built(cfg: RunConfig):
    if "built" not in _MODEL:
        _MODEL["built"] = build_model(cfg)
    return _MODEL["built"]


def _steps(model, params, records, cfg: RunConfig, task, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = records[torch.randint(0, records.shape[0], (min(cfg.batch_size, records.shape[0]),), generator=gen)]
        opt.zero_grad(set_to_none=True)
        task.per_record_loss(model, batch).mean().backward()
        opt.step()
    model.eval()


def client_app(cfg: RunConfig, users: list[Path]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(cfg.threads_per_client)
        built = _built(cfg)
        model, sets, task = built.model, built.sets, built.task
        theta = [a.numpy() for a in msg.content["arrays"].to_torch_state_dict().values()]
        set_arrays(model, sets.send, theta)
        data = task.read_user(users[int(context.node_config["partition-id"])], cfg, base_path=built.base_path)
        started = time.perf_counter()
        trainable = {SHARED: sets.shared_trainable, PERSONAL: sets.personal_trainable}
        for phase in built.preset.schedule:  # the preset's phases: the same adapters, steps and rates
            names = tuple(n for part in phase.trains for n in trainable[part])
            with active(model, list(phase.adapters), names) as params:
                _steps(model, params, data.train, cfg, task, phase.num_steps(cfg), phase.learning_rate(cfg))
        seconds = time.perf_counter() - started
        delta = [new - old for new, old in zip(get_arrays(model, sets.send), theta, strict=True)]
        arrays = ArrayRecord({n: torch.from_numpy(d) for n, d in zip(sets.send, delta, strict=True)})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
            {"num-examples": int(data.train.shape[0]), "train-seconds": seconds})}), reply_to=msg)

    return app


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, each round's seconds and summed training seconds recorded."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.rounds: list[dict[str, float]] = []
        self._started = 0.0

    def configure_train(self, server_round, arrays, config, grid):
        self._started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        train = sum(float(r.content["metrics"]["train-seconds"]) for r in replies if r.has_content())
        self.rounds.append({"round": server_round, "seconds": time.perf_counter() - self._started,
                            "clients": len(replies), "train-seconds": train})
        return out


def server_app(cfg: RunConfig, registered: int, sampled: int, out: list[dict[str, float]]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        built = _built(cfg)
        theta = get_arrays(built.model, built.sets.send)
        strategy = TimedFedAvg(fraction_train=sampled / registered, fraction_evaluate=0.0, min_train_nodes=sampled,
                               min_available_nodes=registered)
        strategy.start(grid=grid, initial_arrays=ArrayRecord({n: torch.from_numpy(a) for n, a in
                                                              zip(built.sets.send, theta, strict=True)}),
                       num_rounds=cfg.num_server_rounds, train_config=ConfigRecord({}))
        out.extend(strategy.rounds)

    return app


def run(cfg: RunConfig, users: list[Path], registered: int, sampled: int) -> list[dict[str, float]]:
    from flwr.simulation import run_simulation

    rounds: list[dict[str, float]] = []
    backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}
    run_simulation(server_app=server_app(cfg, registered, sampled, rounds), client_app=client_app(cfg, users),
                   num_supernodes=registered, backend_config=backend)
    return rounds

