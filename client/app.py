"""FedPGen ClientApp: unpack the message, call the device, pack the reply. Logic: client/device.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import (Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Status,
                         ndarrays_to_parameters, parameters_to_ndarrays)

from client.device import Device
from client.secure_aggregation import secagg_when_asked
from shared.config import RunConfig
from shared.privacy.plan import BudgetExhaustedError
from shared.wire import BUDGET_EXHAUSTED
from shared.data.user_folder import list_user_dirs
from shared.population import population_dir, state_dir


class DeviceClient(Client):
    def __init__(self, device_factory: Callable[[], Device]) -> None:
        self._factory = device_factory

    def fit(self, ins: FitIns) -> FitRes:
        try:
            delta, n, metrics = self._factory().fit(parameters_to_ndarrays(ins.parameters),
                                                    server_round=int(ins.config["server-round"]),
                                                    sampled_clients=int(ins.config["sampled-clients"]))
        except BudgetExhaustedError as exc:  # a clear refusal, not a crash
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, f"{BUDGET_EXHAUSTED}: {exc}"), Parameters([], ""), 0, {})
        return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(delta), n, metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        metrics = self._factory().evaluate(parameters_to_ndarrays(ins.parameters))
        loss = float(np.log(float(metrics["personal-ppl"])))
        return EvaluateRes(Status(Code.OK, "ok"), loss, int(metrics["num-heldout"]), metrics)


def device_for(context: Context, cfg: RunConfig) -> Device:
    """Deployment: node-config names ``data-dir`` and ``state-dir``; simulation: ``partition-id``."""
    node = dict(context.node_config)
    if "data-dir" in node:
        return Device(cfg, user_dir=Path(str(node["data-dir"])), state_dir=Path(str(node["state-dir"])))
    index = int(node["partition-id"])
    users = list_user_dirs(population_dir(cfg))  # materialized by `fedpgen simulate` before the run
    if index >= len(users):
        raise ValueError(f"partition-id {index} but only {len(users)} user folders")
    return Device(cfg, user_dir=users[index], state_dir=state_dir(cfg, users[index]), client_index=index)


def build_app(overrides: Mapping[str, Any] | None = None, mods: list[Mod] | None = None,
              inner_mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` (TOML keys) win over Flower's run config (used by ``fedpgen``).

    ``mods`` wrap the SecAgg+ mod, ``inner_mods`` sit between it and the app (tests use them
    to simulate dropouts and to record what a device computed).
    """

    def client_fn(context: Context) -> Client:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        torch.set_num_threads(cfg.threads_per_client)
        return DeviceClient(lambda: device_for(context, cfg))

    return ClientApp(client_fn=client_fn, mods=[*(mods or []), secagg_when_asked, *(inner_mods or [])])


app = build_app()
