"""Flower's Simulation Engine, with its message poll and its node registry made independent of the
registered population's size in time and memory per node.

Flower 1.42's engine (``flwr/server/superlink/fleet/vce/vce_api.py``, ``add_messages_to_queue``)
polls every 0.1 s for each *registered* node: ``state.get_message_ins(node_id, limit=1)``, which
scans every pending message under the state's lock. A sweep costs nodes × pending messages:
at 100,000 registered users and 100 sampled, 10⁷ checks per sweep, and the rounds of the same
100 devices took 3.5× longer than at 10,000 users (docs/scale.md). :func:`add_messages_to_queue`
is a sweep that reads which nodes have undelivered messages in one pass and asks the
state only for those: the same calls into Flower's state for the nodes that matter, each
message still delivered once, by Flower's own ``get_message_ins``.

Only the in-memory state of Flower's simulation keeps its messages in ``message_ins_store``;
with any other state the original sweep runs unchanged.

Registering the virtual nodes (``_register_node_info_stores``): Flower fuses ``pyproject.toml``
with the run's overrides again for every node, and keeps two copies of the result in each
node's store (its initial config and its Context's ``run_config``): 8.7 KB and 1.1 ms per node
measured here (tracemalloc), 0.8 GB and about 2 minutes at 100,000 users, for one config that is the same
for every node of the run. :func:`register_node_info_stores` fuses it once, with Flower's own
``register_context`` for the first node, and gives every other node that one dict. Nothing in
the engine's process writes to a pre-registered Context's ``run_config``: the ClientApp runs
in a worker with its own copy, and Flower's ``update_context`` replaces a node's Context with
the one the worker returned, after checking that its ``run_config`` equals the initial one.

Two per-message costs of that process, which every message of a run passes through: Flower's
Ray backend ships its ClientApp to an actor with every message, cloudpickled by value each
time (:class:`PickledOnce` pickles it once per run), and each sweep's ``get_message_ins`` per
pending node re-validated every message stored before that node's (:func:`deliver_pending`
validates each undelivered message once).

Where: Flower's simulation process (``flwr-simulation``, started by the SuperLink for
``fedpgen simulate`` and ``flwr run``) loads the ClientApp (``fedpgen.client.app``) in its main
thread before it starts the engine's poll thread; importing that module there installs the
sweep (:func:`install_population_independent_poll`), for the rest of that process, which
runs one simulation. The engine registers its nodes before it loads the ClientApp, so the
registry is installed by the ServerApp module instead (``fedpgen.server.app``), which Flower
imports in a thread it starts just before the engine: it wins that race against registering a
large population (registering 100,000 nodes in Flower's state alone takes seconds); when it
loses (a small population), Flower's own registration runs, and only the memory differs. Its
DEBUG line in ``<run-dir>/flower.log`` says when FedPGen's registry ran.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from queue import Queue
from typing import Any

from ray import cloudpickle as ray_cloudpickle

from flwr.app import Context, RecordDict
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore, RunInfo
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.supercore import log
from flwr.supercore.date import now

FLOWER_REGISTER_NODE_INFO_STORES = vce_api._register_node_info_stores  # noqa: SLF001 (Flower's, kept for comparison)


def pending_nodes(state: Any) -> set[int] | None:
    """Destination nodes with an undelivered message (one pass), or None if ``state`` cannot say."""
    store = getattr(state, "message_ins_store", None)
    if not isinstance(store, dict):
        return None
    with state.lock:
        messages = list(store.values())
    return {m.metadata.dst_node_id for m in messages if m.metadata.delivered_at == ""}


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int],
                          f_stop: threading.Event) -> None:
    """Flower's sweep (one message per node per sweep, every 0.1 s), over the pending nodes only."""
    while not f_stop.is_set():
        if not deliver_pending(state, queue, nodes_mapping):
            pending = pending_nodes(state)
            nodes = nodes_mapping.keys() if pending is None else [n for n in pending if n in nodes_mapping]
            for node_id in nodes:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
        f_stop.wait(0.1)


def deliver_pending(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int]) -> bool:
    """One sweep in one pass over the in-memory state's messages: what Flower's
    ``get_message_ins(node_id, limit=1)`` delivers, for every node with an undelivered message.

    Flower's ``get_message_ins`` walks the stored messages from the first, validating each
    (``_check_stored_messages``: expiry, both nodes in the federation), until it finds one for
    its node; asked once per pending node, a stage's first sweep at 1,000 devices validates
    about 500,000 messages under the state's lock (≈ 1.4 s of the simulation process a stage,
    measured with py-spy). Here each undelivered message is validated once, as Flower validates
    it, and the first valid one of each node is marked delivered and queued. False (nothing
    done) where the state is not Flower's in-memory one."""
    store = getattr(state, "message_ins_store", None)
    check = getattr(state, "_check_stored_messages", None)
    if not isinstance(store, dict) or check is None:
        return False
    found: dict[int, Any] = {}
    with state.lock:
        for msg_id, msg in list(store.items()):
            node = msg.metadata.dst_node_id
            if msg.metadata.delivered_at != "" or node in found or node not in nodes_mapping:
                continue
            check({msg_id})  # deletes it if expired or outside the federation
            if (msg := store.get(msg_id)) is not None:
                found[node] = msg
    delivered_at = now().isoformat()
    for msg in found.values():
        msg.metadata.delivered_at = delivered_at
        queue.put(msg)
    return True


def install_population_independent_poll() -> None:
    """From now on, this process's Flower Simulation Engine polls only nodes that have messages,
    and hands its Ray actors a ClientApp pickled once (:class:`PickledOnce`)."""
    vce_api.add_messages_to_queue = add_messages_to_queue
    if not getattr(RayBackend.build, "fedpgen_pickled_once", False):
        RayBackend.build = _build_with_app_pickled_once(RayBackend.build)


class PickledOnce:
    """Flower's ``app_fn`` for the Ray actors, serialized once per run instead of once per message.

    Flower's ``RayBackend.process_message`` passes its ``app_fn`` — a closure over the loaded
    ClientApp, whose ``client_fn`` and mods are closures too — as an argument of every actor
    call. Ray pickles closures by value with cloudpickle, which walks each function's globals
    and ``sys.modules`` (``_find_imported_submodules``): measured with py-spy, about a quarter
    of the simulation process's CPU in a SecAgg+ round of 1,000 devices, in the one process
    that every message passes through (docs/scale.md). Here ``app_fn`` is pickled once, with
    Ray's own cloudpickle; each call ships those bytes, and the actor unpickles them as before
    (a fresh ClientApp per message, as with Flower's own)."""

    def __init__(self, app_fn: Callable[[], Any]) -> None:
        self.app_fn = app_fn
        self.blob = ray_cloudpickle.dumps(app_fn)

    def __reduce__(self) -> tuple[Callable[[bytes], Any], tuple[bytes]]:
        return ray_cloudpickle.loads, (self.blob,)

    def __call__(self) -> Any:
        return self.app_fn()


def _build_with_app_pickled_once(build: Callable[..., None]) -> Callable[..., None]:
    def patched(self: RayBackend, app_fn: Callable[[], Any]) -> None:
        build(self, app_fn if isinstance(app_fn, PickledOnce) else PickledOnce(app_fn))

    patched.fedpgen_pickled_once = True  # type: ignore[attr-defined]
    return patched


def register_node_info_stores(nodes_mapping: Mapping[int, int], run: Any,
                              app_dir: str | None = None) -> dict[int, DeprecatedRunInfoStore]:
    """Flower's ``_register_node_info_stores``, with the run config fused once and shared by every node."""
    stores: dict[int, DeprecatedRunInfoStore] = {}
    num_partitions = len(set(nodes_mapping.values()))
    shared: dict[str, Any] | None = None
    for node_id, partition_id in nodes_mapping.items():
        store = DeprecatedRunInfoStore(node_id=node_id, node_config={PARTITION_ID_KEY: partition_id,
                                                                     NUM_PARTITIONS_KEY: num_partitions})
        if shared is None:  # Flower's own reading and fusing, once
            store.register_context(run_id=run.run_id, run=run, app_dir=app_dir)
            shared = store.run_infos[run.run_id].initial_run_config
        else:
            context = Context(run_id=run.run_id, node_id=node_id, node_config=store.node_config, state=RecordDict(),
                              run_config=shared)
            store.run_infos[run.run_id] = RunInfo(context=context, initial_run_config=shared)
        stores[node_id] = store
    log(logging.DEBUG, "FedPGen: %d virtual nodes registered with one shared run config", len(stores))
    return stores


def install_shared_run_config() -> None:
    """From now on, this process's Simulation Engine registers its nodes with one shared run config."""
    vce_api._register_node_info_stores = register_node_info_stores  # noqa: SLF001 (Flower's module function)
