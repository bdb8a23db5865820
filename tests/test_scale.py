"""Issue 14: sampling the whole population from round 1, a message poll independent of it, the
GPU share and Ray-cluster keys. (The resident runtime: tests/test_runtime.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from queue import Queue
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import Proxy
from flwr.server.client_manager import SimpleClientManager

from fedpgen.server.aggregation import RoundFailedError
from fedpgen.server.results import RunRecorder
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.simulate import federation_config, simulation_env
from fedpgen.simulation_engine import add_messages_to_queue, register_node_info_stores

NAMES = ("w",)


def _strategy(cfg, tmp_path: Path) -> SharedDeltaStrategy:
    return SharedDeltaStrategy(cfg=cfg, names=NAMES, theta=[np.zeros(2, np.float32)], completed=0, opt_state={},
                               recorder=RunRecorder(tmp_path / "run", cfg))


def _register_slowly(manager: SimpleClientManager, count: int, every: float) -> threading.Thread:
    """Nodes registering one by one while the server already runs (Flower's simulation does so)."""
    def run() -> None:
        for i in range(count):
            manager.register(Proxy(i))
            time.sleep(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_round_one_samples_the_configured_share_of_the_whole_population(make_cfg, tmp_path: Path) -> None:
    # Prepare: 200 devices that register over ~1 s; 10% sampled per round; the population known
    cfg = make_cfg(fraction_fit=0.1, min_fit_clients=2, min_available_clients=200)
    strategy, manager = _strategy(cfg, tmp_path), SimpleClientManager()
    thread = _register_slowly(manager, 200, 0.005)
    # Execute: round 1 is configured while devices still register, round 2 after
    round1 = strategy.configure_fit(1, None, manager)
    thread.join()
    round2 = strategy.configure_fit(2, None, manager)
    # Assert: round 1 samples as many devices as round 2, and its sampling rate is of all 200
    assert len(round1) == len(round2) == 20
    assert strategy._population == 200


def test_registration_that_never_completes_fails_after_round_timeout(make_cfg, tmp_path: Path) -> None:
    # Prepare: 5 devices registered of the 50 the run expects, a 1 s timeout
    cfg = make_cfg(min_available_clients=50, round_timeout=1.0)
    manager = SimpleClientManager()
    for i in range(5):
        manager.register(Proxy(i))
    # Execute / Assert: a clear failure with the counts, not a silently small round
    with pytest.raises(RoundFailedError, match="only 5 of 50 devices registered"):
        _strategy(cfg, tmp_path).wait_for_population(manager, poll=0.05)


class _State:
    """What the poll reads of Flower's in-memory LinkState: its message store, lock and getter."""

    def __init__(self, pending: dict[str, int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for mid, node in pending.items()}
        self.asked: list[int] = []

    def get_message_ins(self, *, node_id: int, limit: int) -> list[object]:
        self.asked.append(node_id)
        with self.lock:
            for mid, msg in self.message_ins_store.items():
                if msg.metadata.dst_node_id == node_id and msg.metadata.delivered_at == "":
                    msg.metadata.delivered_at = "now"
                    return [mid]
        return []


def test_the_message_poll_asks_only_for_nodes_that_have_messages() -> None:
    # Prepare: 100,000 registered nodes, messages pending for three of them (one has two)
    state = _State({"m1": 7, "m2": 99_999, "m3": 7, "m4": 512})
    nodes = {node: i for i, node in enumerate(range(100_000))}
    queue: Queue[object] = Queue()
    stop = threading.Event()
    # Execute: Flower's poll loop, replaced, runs for a few sweeps
    thread = threading.Thread(target=add_messages_to_queue, args=(state, queue, nodes, stop))
    thread.start()
    time.sleep(0.5)
    stop.set()
    thread.join()
    # Assert: every message delivered exactly once; the state was asked only about those nodes
    assert sorted(queue.queue) == ["m1", "m2", "m3", "m4"]
    assert set(state.asked) == {7, 99_999, 512}


class _ValidatingState(_State):
    """The in-memory state's parts the sweep reads, with Flower's per-message validation
    (``_check_stored_messages``): counted, and deleting the messages that expired."""

    def __init__(self, pending: dict[str, int], expired: set[str]) -> None:
        super().__init__(pending)
        self.expired, self.checked = expired, 0

    def _check_stored_messages(self, message_ids: set[str]) -> None:
        with self.lock:
            self.checked += len(message_ids)
            for mid in message_ids & self.expired:
                self.message_ins_store.pop(mid, None)


def test_a_sweep_validates_each_pending_message_once_and_delivers_one_per_node() -> None:
    """Flower's ``get_message_ins`` per pending node re-validates every message stored before
    that node's: 1,000 pending messages cost ~500,000 validations a sweep. One pass validates
    each undelivered message once and delivers what Flower would: each node's first valid
    message, one per node and sweep, never an expired one."""
    from fedpgen.simulation_engine import deliver_pending

    # Prepare: 1,000 nodes with one message each, node 3 with a second, node 5's expired
    pending = {f"m{n}": n for n in range(1_000)} | {"m3b": 3}
    state = _ValidatingState(pending, expired={"m5"})
    queue: Queue[object] = Queue()
    nodes = {n: n for n in range(1_000)}
    # Execute: two sweeps
    assert deliver_pending(state, queue, nodes)
    first = [m.metadata.dst_node_id for m in queue.queue]
    assert deliver_pending(state, queue, nodes)
    # Assert
    assert state.checked == 1_000 + 1  # the first sweep: each node's first message (m5 too); the second: m3b
    assert first == [n for n in range(1_000) if n != 5]  # store order, one per node
    assert len(queue.queue) == 1_000 and queue.queue[-1] is state.message_ins_store["m3b"]
    assert "m5" not in state.message_ins_store
    assert all(m.metadata.delivered_at != "" for m in queue.queue)
    assert not deliver_pending(SimpleNamespace(message_ins_store={}), queue, nodes)  # not Flower's in-memory state


def _replaced_by_importing(app_module: str, flower_name: str, ours: str, also: str = "") -> dict[str, list[bool]]:
    """Whether importing ``app_module`` replaced ``vce_api.<flower_name>`` with FedPGen's ``ours`` (and
    what the lines of the script ``also`` print), in a fresh process that runs Flower's engine
    (flwr-simulation: ``flwr.simulation.app``) and in one that does not (a deployment's ClientApp
    or ServerApp process)."""
    check = (f"{{before}}import {app_module}\n"
             "from flwr.server.superlink.fleet.vce import vce_api\n"
             f"from fedpgen.simulation_engine import {ours}\n"
             f"print(vce_api.{flower_name} is {ours})\n{also}")
    return {name: [line == "True" for line in subprocess.run(
                [sys.executable, "-c", check.format(before=before)], capture_output=True, text=True,
                check=True).stdout.split()]
            for name, before in (("engine", "import flwr.simulation.app\n"), ("deployment", ""))}


def test_the_clientapp_installs_the_poll_and_the_pickled_once_app_in_flowers_simulation_process_only() -> None:
    # Flower's simulation process loads the ClientApp before its engine starts polling and builds
    # its Ray backend; a deployed device's ClientApp process never loads the engine.
    also = "from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend\n" \
           "print(getattr(RayBackend.build, 'fedpgen_pickled_once', False))"
    assert _replaced_by_importing("fedpgen.client.app", "add_messages_to_queue", "add_messages_to_queue", also) \
        == {"engine": [True, True], "deployment": [False, False]}


class _CountedPickles:
    """Counts how often it is pickled; unpickles to a new instance."""

    pickled = 0

    def __reduce__(self) -> tuple[type, tuple[()]]:
        type(self).pickled += 1
        return type(self), ()


def test_the_clientapp_is_pickled_once_per_run_and_unpickled_fresh_per_message() -> None:
    """Flower hands its Ray actors ``app_fn`` with every message; Ray pickles closures by value,
    which costs the simulation process ≈ 2 ms a message (docs/scale.md). Wrapped, the closure is
    pickled once; each message's actor still unpickles a fresh ClientApp, as with Flower's own."""
    from ray import cloudpickle

    from fedpgen.simulation_engine import PickledOnce, _build_with_app_pickled_once

    # Prepare: a closure over an object, as Flower's ``_load_client_app`` closes over the ClientApp
    def start_vce() -> Callable[[], _CountedPickles]:
        client_app = _CountedPickles()

        def _load_client_app() -> _CountedPickles:
            return client_app

        return _load_client_app

    app_fn = start_vce()
    built: list[object] = []
    build = _build_with_app_pickled_once(lambda backend, fn: built.append(fn))
    _CountedPickles.pickled = 0
    # Execute: the backend is built, then three messages ship app_fn to an actor
    build(None, app_fn)
    shipped = [cloudpickle.dumps(built[0]) for _ in range(3)]
    # Assert
    assert isinstance(built[0], PickledOnce) and built[0]() is app_fn()
    assert _CountedPickles.pickled == 1  # once, when the backend was built; Flower's: once per message
    apps = [cloudpickle.loads(b)() for b in shipped]
    assert all(isinstance(a, _CountedPickles) for a in apps) and len({id(a) for a in apps}) == 3
    build(None, built[0])  # built twice: wrapped once
    assert built[1] is built[0]


def _registered(register, nodes: int, run, app_dir: str) -> tuple[dict, float]:  # type: ignore[no-untyped-def]
    """The node stores ``register`` builds for ``nodes`` nodes, and the bytes it kept per node."""
    tracemalloc.start()
    try:
        stores = register({node: i for i, node in enumerate(range(1, nodes + 1))}, run, app_dir=app_dir)
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return stores, kept / nodes


def test_the_node_registry_holds_one_run_config_for_all_nodes_as_flower_would_fuse_it() -> None:
    # Prepare: a run with overrides, registered by Flower's own registry and by FedPGen's
    from flwr.supercore.run import Run

    from fedpgen.simulation_engine import FLOWER_REGISTER_NODE_INFO_STORES as flower

    assert flower is not register_node_info_stores and flower.__module__.startswith("flwr.")
    root = str(Path(__file__).resolve().parents[1])
    run = replace(Run.create_empty(run_id=42), override_config={"num-users": 123, "task": "behavior"})
    # Execute
    theirs, their_bytes = _registered(flower, 400, run, root)
    ours, our_bytes = _registered(register_node_info_stores, 400, run, root)
    # Assert: the same stores (node config, run config as Flower fuses it), one config dict shared
    assert theirs.keys() == ours.keys()
    for node in ours:
        mine, flowers = ours[node].retrieve_context(42), theirs[node].retrieve_context(42)
        assert (mine.run_id, mine.node_id, mine.node_config) == (flowers.run_id, flowers.node_id, flowers.node_config)
        assert mine.run_config == flowers.run_config
        assert mine.run_config["num-users"] == 123 and mine.run_config["task"] == "behavior"
    assert len({id(store.retrieve_context(42).run_config) for store in list(ours.values())[1:]}) == 1
    assert our_bytes < their_bytes / 3, (our_bytes, their_bytes)
    # A worker's returned Context (its own copy of the config) replaces the node's, as in Flower;
    # a changed run config is still refused by Flower's check
    store = ours[7]
    returned = store.retrieve_context(42)
    returned = type(returned)(run_id=42, node_id=7, node_config=returned.node_config, state=returned.state,
                              run_config=dict(returned.run_config))
    store.update_context(42, returned)
    assert store.retrieve_context(42) is returned
    returned.run_config["task"] = "image"
    with pytest.raises(ValueError, match="cannot be"):
        store.update_context(42, returned)
    assert ours[8].retrieve_context(42).run_config["task"] == "behavior"


def test_the_serverapp_installs_the_registry_in_flowers_simulation_process_only() -> None:
    # Flower's simulation process imports the ServerApp in a thread it starts just before the engine
    # registers its nodes; the SuperLink's ServerApp process in a deployment never loads the engine
    assert _replaced_by_importing("fedpgen.server.app", "_register_node_info_stores", "register_node_info_stores") \
        == {"engine": [True], "deployment": [False]}


def test_gpu_share_and_ray_address_reach_flowers_federation_config(make_cfg) -> None:
    # Prepare / Execute: the default, a GPU share on a cluster, an existing cluster
    default = federation_config(make_cfg(), 7)
    gpu = federation_config(make_cfg(client_gpus=0.25, client_cpus=2.0, ray_address="auto"), 7)
    cluster = make_cfg(ray_address="127.0.0.1:6379")
    # Assert: one SuperNode per user, CPU only by default, Ray on this machine's CPUs; the shares
    # per virtual device; an address alone joins a cluster (Ray reads RAY_ADDRESS; it brings its CPUs)
    assert default == {"num-supernodes": 7, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.0,
                       "init-args-num-cpus": os.cpu_count()}
    assert gpu == {"num-supernodes": 7, "client-resources-num-cpus": 2, "client-resources-num-gpus": 0.25}
    assert simulation_env(cluster, None)["RAY_ADDRESS"] == "127.0.0.1:6379"
    assert "RAY_ADDRESS" not in simulation_env(make_cfg(), None)
    with pytest.raises(ValueError, match="client-gpus"):
        make_cfg(client_gpus=-1.0)
    with pytest.raises(ValueError, match="client-cpus.*whole number"):
        make_cfg(client_cpus=0.5)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_a_gpu_share_without_a_gpu_is_a_clear_error_before_ray_starts(make_cfg) -> None:
    # Flower itself would stop with "ActorPool is empty" and leave the ServerApp waiting
    with pytest.raises(ValueError, match="client-gpus.*no GPU"):
        federation_config(make_cfg(client_gpus=0.5), 3)


def test_a_device_finds_its_folder_without_listing_the_population_per_message(make_cfg, monkeypatch) -> None:
    # Prepare: a materialized population; count the listings of its folder
    from fedpgen.client import node
    from fedpgen.shared.population import ensure_population, population_dir

    cfg = make_cfg(num_users=3)
    users = ensure_population(cfg)
    node._POPULATION.clear()
    calls = []
    original = node.list_user_dirs
    monkeypatch.setattr(node, "list_user_dirs", lambda folder: calls.append(folder) or original(folder))
    # Execute: six messages to three virtual devices, then a user folder added, then one more message
    found = [node.node_settings({"partition-id": i % 3}, cfg).user_dir for i in range(6)]
    time.sleep(0.01)
    (population_dir(cfg) / "zz-new-user").mkdir()
    after = node.node_settings({"partition-id": 3}, cfg).user_dir
    # Assert: the right folders, one listing for the six (it grew with the registered population
    # on every message before), listed again once the folder's entries changed
    assert found == [users[i % 3] for i in range(6)]
    assert after.name == "zz-new-user" and len(calls) == 2


def test_the_behavior_population_is_written_one_user_at_a_time(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """100,000 users with hundreds of events each are gigabytes as Python objects: the folder of
    each user is on disk before the next user is generated, and the users are those of ``users``."""
    from fedpgen.shared.data import synthetic_behavior as synth
    from fedpgen.shared.tasks.behavior import BehaviorTask

    # Prepare
    cfg = make_cfg(task="behavior", num_users=6, seq_len=8, min_records=10)
    dest = tmp_path / "users"
    dest.mkdir()
    original = synth.iter_users
    on_disk_before: list[bool] = []

    def watched(**kwargs):  # type: ignore[no-untyped-def]
        previous = None
        for name, user in original(**kwargs):
            on_disk_before.append(previous is None or (dest / previous / "profile.json").is_file())
            previous = name
            yield name, user

    monkeypatch.setattr(synth, "iter_users", watched)
    # Execute
    written = BehaviorTask().materialize_users(cfg, dest)
    # Assert
    assert on_disk_before == [True] * 6 and len(written) == 6
    expected = dict(original(num_users=6, events_per_user=(80, 120), seed=cfg.seed))  # as synth.users gives
    assert sorted(p.name for p in written) == sorted(expected)
    first = sorted(expected)[0]
    assert json.loads((dest / first / "profile.json").read_text()) == expected[first][1]


def test_the_launcher_prepares_in_a_child_and_waits_through_the_run_without_torch(make_cfg, tmp_path: Path) -> None:
    """``fedpgen simulate``'s process holds no torch and no base model while the run goes on
    (470 MiB of the process tree's peak RSS): the population and the base are built in a
    spawned process that has ended; its lines and its errors reach the launcher."""
    good = make_cfg(num_users=2)
    bad = make_cfg(data="dir", data_dir=str(tmp_path / "nowhere"))
    script = (
        "import json, sys\n"
        "from fedpgen.shared.config import RunConfig\n"
        "from fedpgen.simulate import prepare\n"
        "said = []\n"
        f"cfg, users = prepare(RunConfig.from_mapping({good.to_toml_dict()!r}), fresh=True, share='s', "
        "say=said.append)\n"
        "out = {'torch': 'torch' in sys.modules, 'users': [u.name for u in users], 'said': said,\n"
        "       'min_available': cfg.min_available_clients}\n"
        "try:\n"
        f"    prepare(RunConfig.from_mapping({bad.to_toml_dict()!r}), fresh=True, share='s', say=said.append)\n"
        "except FileNotFoundError as exc:\n"
        "    out['error'] = str(exc)\n"
        "out['torch_after_error'] = 'torch' in sys.modules\n"
        "print(json.dumps(out))\n")
    # Execute
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False and out["torch_after_error"] is False
    assert len(out["users"]) == 2 and out["min_available"] == 2, "the prepared config comes back"
    assert any("2 users" in line for line in out["said"]) and any("base model:" in line for line in out["said"])
    assert "nowhere" in out.get("error", ""), "the child's error is raised in the launcher, with its type"
