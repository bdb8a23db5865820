"""Flower's Simulation Engine, with its message poll made independent of the registered population.

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

Where: Flower's simulation process (``flwr-simulation``, started by the SuperLink for
``fedpgen simulate`` and ``flwr run``) loads the ClientApp (``fedpgen.client.app``) in its main
thread before it starts the engine's poll thread; importing that module there installs the
sweep (:func:`install_population_independent_poll`), for the rest of that process, which
runs one simulation.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from queue import Queue
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api


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
        pending = pending_nodes(state)
        nodes = nodes_mapping.keys() if pending is None else [n for n in pending if n in nodes_mapping]
        for node_id in nodes:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.1)


def install_population_independent_poll() -> None:
    """From now on, this process's Flower Simulation Engine polls only nodes that have messages."""
    vce_api.add_messages_to_queue = add_messages_to_queue
