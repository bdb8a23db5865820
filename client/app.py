"""FedPGen ClientApp: unpack the message, call the device, pack the reply. Logic: client/device.py."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)

from fedpgen.client.device import REFUSING, Device, preflight, refusal_text
from fedpgen.client.node import NodeSettings, node_settings
from fedpgen.client.runtime import lease
from fedpgen.client.secure_aggregation import secagg_when_asked
from fedpgen.shared.accelerator import keep_freed_heap
from fedpgen.shared.config import RunConfig
from fedpgen.shared.tasks import TASKS
from fedpgen.shared.wire_transcript import transcript_mod

log = logging.getLogger(__name__)


def run_config(context: Context, overrides: Mapping[str, Any] | None) -> RunConfig:
    """The validated run config of this message: parsed once per distinct config, not per message."""
    return RunConfig.merged(dict(context.run_config), overrides)


class DeviceClient(Client):
    def __init__(self, cfg: RunConfig, node: NodeSettings) -> None:
        self.cfg, self.node = cfg, node

    @property
    def four_way(self) -> bool:
        """The four-way evaluation (client/evaluation.py) when asked, or by default in a simulation;
        a deployed device (no partition id) evaluates what it has."""
        return self.cfg.evaluation == "four-way" or (self.cfg.evaluation == "auto" and self.node.client_index >= 0)

    @contextlib.contextmanager
    def _device(self) -> Iterator[Device]:
        """This user's device on the process's resident model (``client/runtime.py``), reset for it."""
        node = self.node
        with lease(self.cfg, node.device) as runtime:
            yield Device(self.cfg, user_dir=node.user_dir, state_dir=node.state_dir, client_index=node.client_index,
                         key_file=node.key_file, micro_batch=node.micro_batch, runtime=runtime)

    def fit(self, ins: FitIns) -> FitRes:
        try:
            with self._device() as device:
                delta, n, metrics = device.fit(parameters_to_ndarrays(ins.parameters),
                                               server_round=int(ins.config["server-round"]),
                                               sampled_clients=int(ins.config["sampled-clients"]))
        except REFUSING as exc:  # a clear refusal, never a crash; never train on (or send from) garbage
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, refusal_text(exc)), Parameters([], ""), 0, {})
        return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(delta), n, metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        try:
            with self._device() as device:
                metrics = device.evaluate(parameters_to_ndarrays(ins.parameters), four_way=self.four_way)
        except REFUSING as exc:
            return EvaluateRes(Status(Code.EVALUATE_NOT_IMPLEMENTED, refusal_text(exc)), 0.0, 0, {})
        loss = float(metrics[f"personal-{TASKS[self.cfg.task].primary}"])  # the task's primary held-out metric
        return EvaluateRes(Status(Code.OK, "ok"), loss, int(metrics["num-heldout"]), metrics)


def refuse_at_setup(overrides: Mapping[str, Any] | None) -> Mod:
    """At SecAgg+'s setup stage, run the device's preflight; a refusal fails the message with
    the refusal text naming this node (inside SecAgg+ a refusal can only be a failed message;
    refusing before any key is exchanged lets the server stop sampling this device)."""

    def gate(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        logging.getLogger("flwr").setLevel(logging.INFO)  # SecAgg+ logs every stage at DEBUG on each device
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            cfg = run_config(ctxt, overrides)
            node = node_settings(ctxt.node_config, cfg)
            try:
                preflight(cfg, user_dir=node.user_dir, state_dir=node.state_dir, key_file=node.key_file)
            except REFUSING as exc:
                raise type(exc)(refusal_text(exc, msg.metadata.dst_node_id)) from None
        return call_next(msg, ctxt)

    return gate


def build_app(overrides: Mapping[str, Any] | None = None, mods: list[Mod] | None = None,
              inner_mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` (TOML keys) win over Flower's run config (used by ``fedpgen``).

    ``mods`` wrap the SecAgg+ mod, ``inner_mods`` sit between it and the app (tests use them
    to simulate dropouts and to record what a device computed). The wire transcript's mod
    (``wire-transcript``) wraps them all: it records what actually leaves the device.
    """

    def client_fn(context: Context) -> Client:
        cfg = run_config(context, overrides)
        torch.set_num_threads(cfg.threads_per_client)
        keep_freed_heap(cfg.cpu_heap_keep_mib)  # per message: cheap (0 leaves what the process has)
        return DeviceClient(cfg, node_settings(context.node_config, cfg))

    return ClientApp(client_fn=client_fn, mods=[transcript_mod(overrides), *(mods or []), refuse_at_setup(overrides),
                                                secagg_when_asked, *(inner_mods or [])])


SIMULATION_MODS_ENV = "FEDPGEN_SIMULATION_CLIENT_MODS"


def simulation_mods() -> tuple[list[Mod], list[Mod]]:
    """(outer, inner) mods that ``fedpgen.simulate.simulate(client_mods=...)`` hands the simulation
    it starts (fault injection and instrumentation in tests): a pickle whose path is in
    ``$FEDPGEN_SIMULATION_CLIENT_MODS``. Unset (always, on a deployed device): none. Whoever sets
    the variable runs code in this process, so only the process that starts the run sets it."""
    path = os.environ.get(SIMULATION_MODS_ENV)
    if not path:
        return [], []
    outer, inner = pickle.loads(Path(path).read_bytes())
    return list(outer), list(inner)


if "flwr.server.superlink.fleet.vce.vce_api" in sys.modules:  # Flower's Simulation Engine is loading this app:
    from fedpgen.simulation_engine import install_population_independent_poll

    install_population_independent_poll()  # before it starts polling (fedpgen/simulation_engine.py)
_outer, _inner = simulation_mods()
app = build_app(mods=_outer, inner_mods=_inner)
