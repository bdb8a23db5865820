"""FedPGen ClientApp: unpack the message, call the device, pack the reply. Logic: client/device.py."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.client import Client
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Status,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.device import Device, check_usable, verify_state
from client.node import node_settings
from client.secure_aggregation import secagg_when_asked
from shared.wire_transcript import transcript_mod
from shared.config import RunConfig
from shared.locking import exclusive
from shared.privacy.ledger import PrivacyLedger
from shared.privacy.plan import BudgetExhaustedError, check_stored_budget
from shared.sealing import TamperedStateError
from shared.store import DeviceStore, device_sealer
from shared.tasks import NoUsableDataError, get_task
from shared.wire import BUDGET_EXHAUSTED, NO_USABLE_DATA, STATE_TAMPERED


log = logging.getLogger(__name__)

class DeviceClient(Client):
    def __init__(self, device_factory: Callable[[], Device], primary: str) -> None:
        self._factory = device_factory
        self._primary = primary

    def fit(self, ins: FitIns) -> FitRes:
        try:
            delta, n, metrics = self._factory().fit(parameters_to_ndarrays(ins.parameters),
                                                    server_round=int(ins.config["server-round"]),
                                                    sampled_clients=int(ins.config["sampled-clients"]))
        except BudgetExhaustedError as exc:  # a clear refusal, not a crash
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, f"{BUDGET_EXHAUSTED}: {exc}"), Parameters([], ""), 0, {})
        except (NoUsableDataError, TamperedStateError) as exc:  # never train on (or send from) garbage
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, refusal(exc)), Parameters([], ""), 0, {})
        return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(delta), n, metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        try:
            metrics = self._factory().evaluate(parameters_to_ndarrays(ins.parameters))
        except (NoUsableDataError, TamperedStateError) as exc:
            return EvaluateRes(Status(Code.EVALUATE_NOT_IMPLEMENTED, refusal(exc)), 0.0, 0, {})
        loss = float(metrics[f"personal-{self._primary}"])  # the task's primary held-out metric
        return EvaluateRes(Status(Code.OK, "ok"), loss, int(metrics["num-heldout"]), metrics)


def refusal(exc: NoUsableDataError | TamperedStateError, node: int | None = None) -> str:
    """The refusal text sent to the server: the reason code (and node id) only. The details name
    the user's folder, local paths and what was skipped: they go to the device's log, not the wire."""
    reason = NO_USABLE_DATA if isinstance(exc, NoUsableDataError) else STATE_TAMPERED
    log.error("refusing (%s): %s", reason, exc)
    return f"{reason} node={node}: details in the device's log" if node is not None else \
        f"{reason}: details in the device's log"


def device_for(context: Context, cfg: RunConfig) -> Device:
    node = node_settings(context.node_config, cfg)
    return Device(cfg, user_dir=node.user_dir, state_dir=node.state_dir, client_index=node.client_index,
                  key_file=node.key_file, device=node.device, micro_batch=node.micro_batch)


def budget_gate(cfg: RunConfig) -> Mod:
    """Refuse at SecAgg+'s setup stage when the device's sealed state fails authentication,
    its ε budget is spent or it has no usable data, naming this node.

    Inside SecAgg+ a refusal can only be a failed message; refusing before any key is
    exchanged, with the node id in the error, lets the server stop sampling this device.
    """

    def gate(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            settings = node_settings(ctxt.node_config, cfg)
            node = msg.metadata.dst_node_id
            try:
                sealer = device_sealer(settings.state_dir, settings.key_file)  # one key load for all checks
                store, ledger = DeviceStore(settings.state_dir, sealer), PrivacyLedger(settings.state_dir, sealer)
                with exclusive(settings.state_dir, what="device state-dir"):  # never read half an append
                    verify_state(store, ledger)
                    check_stored_budget(cfg, ledger)
                    check_usable(cfg, settings.user_dir, store)
            except BudgetExhaustedError as exc:  # ε figures only: the documented budget reply
                raise BudgetExhaustedError(f"{BUDGET_EXHAUSTED} node={node}: {exc}") from None
            except NoUsableDataError as exc:
                raise NoUsableDataError(refusal(exc, node)) from None
            except TamperedStateError as exc:
                raise TamperedStateError(refusal(exc, node)) from None
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
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        torch.set_num_threads(cfg.threads_per_client)
        return DeviceClient(lambda: device_for(context, cfg), primary=get_task(cfg.task).primary)

    def gate(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        logging.getLogger("flwr").setLevel(logging.INFO)  # SecAgg+ logs every stage at DEBUG on each device
        cfg = RunConfig.from_mapping({**dict(ctxt.run_config), **dict(overrides or {})})
        return budget_gate(cfg)(msg, ctxt, call_next)

    return ClientApp(client_fn=client_fn, mods=[transcript_mod(overrides), *(mods or []), gate, secagg_when_asked,
                                                *(inner_mods or [])])


app = build_app()
