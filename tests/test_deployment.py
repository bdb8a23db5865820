"""A real federation on loopback: Flower's Deployment Engine with TLS and SuperNode authentication.

One SuperLink (TLS, node authentication, SQLite state, no runtime installs) and three
SuperNodes, each a user's device with its own folder and sealed state-dir, run the text
task for 3 rounds with DP and SecAgg+ through ``flwr run``. One SuperNode is killed
(SIGKILL) after round 1 and restarted: the run finishes and that device's personal part and
ε ledger continue. Refusals: an unregistered key, a node without the CA. Every process the
test starts is stopped by the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from fedpgen.cli import cli
from fedpgen.deploy import (CONNECTION, InsecureDeploymentError, flower_env, flwr_home, make_certificates,
                            register_node, run_app, superlink_command, supernode_command)
from fedpgen.server.results import read_clients, read_jsonl
from fedpgen.shared.adapters import get_arrays
from fedpgen.shared.config import RunConfig
from fedpgen.shared.data import synthetic_text
from fedpgen.shared.data.user_folder import write_user
from fedpgen.shared.model import build_model
from fedpgen.shared.privacy.ledger import PrivacyLedger
from fedpgen.shared.store import DeviceStore

from conftest import TINY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
NODES = 3
ROUNDS = 3
# docs/scale.md: each SuperNode with its resident ClientApp process (the default); set
# FEDPGEN_DEPLOY_PER_MESSAGE=1 to measure Flower's process per message (printed with -s).
RESIDENT = os.environ.get("FEDPGEN_DEPLOY_PER_MESSAGE") != "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A background process in its own session (its children die with it); output to a log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self._fh = log.open("ab")
        self.p = subprocess.Popen(cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return
            if self.p.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.p.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"{self.name}: no {pattern!r} in {timeout}s:\n{self.text()[-3000:]}")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        try:
            os.killpg(self.p.pid, signal.SIGKILL)  # leftovers of its group (flwr-clientapp, superexec)
        except ProcessLookupError:
            pass
        self._fh.close()


def wait_healthy(port: int, ca: Path, timeout: float = 90) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("SuperLink never became healthy")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("federation")
    certs = root / "certs"
    make_certificates(certs, nodes=[f"node{i}" for i in range(NODES)] + ["rogue"], hosts=["localhost", "127.0.0.1"])
    run_dir = root / "server-run"
    run_config = {k: v for k, v in TINY.items() if k not in {"data", "num-users", "min-records"}}
    # min-available-clients: each round waits until all three are registered, so the killed
    # device, once the SuperLink noticed and it rejoined, trains again in a later round
    run_config.update({"num-server-rounds": ROUNDS, "min-fit-clients": 2, "min-available-clients": NODES,
                       "run-dir": str(run_dir),
                       "round-timeout": 120.0, "dp": "sigma", "dp-noise-multiplier": 1.0, "dp-epsilon": 1000.0,
                       "wire-transcript": True})
    cfg = RunConfig.from_mapping(run_config)
    initial = get_arrays(build_model(cfg).model, build_model(cfg).sets.send)  # also builds the cached base
    users = synthetic_text.users(num_users=NODES, docs_per_user=30, seed=7)
    port = free_port()
    superlink_addr = f"127.0.0.1:{port}"
    procs: list[Proc] = []
    superlink = Proc("superlink", superlink_command(certs=certs, database=root / "state.db", port=port),
                     flower_env(root / "home-superlink"), root / "superlink.log")
    procs.append(superlink)
    nodes: list[Proc] = []
    try:
        wait_healthy(port, certs / "ca.pem")
        cli_env = flwr_home(root / "home-cli", superlink=superlink_addr, ca=certs / "ca.pem")
        node_ids = [register_node(certs / f"node{i}.pub", env=cli_env) for i in range(NODES)]

        def start(i: int, key: str | None = None, log: str = "") -> Proc:
            user = write_user(root / "users", f"user{i}", users[list(users)[i]]) if key is None else root / "users"
            cmd = supernode_command(superlink=superlink_addr, ca=certs / "ca.pem", key=certs / (key or f"node{i}"),
                                    data_dir=user, state_dir=root / "states" / f"user{i}", port=free_port(),
                                    device="cpu", resident=RESIDENT)
            proc = Proc(f"supernode{i}", cmd, flower_env(root / f"home-node{i}"), root / (log or f"node{i}.log"))
            procs.append(proc)
            return proc

        for i in range(NODES):
            nodes.append(start(i))
        for i, node in enumerate(nodes):
            node.wait_for(rf"SuperNode ID: {node_ids[i]}\b", timeout=90)
        yield {"root": root, "certs": certs, "cli_env": cli_env, "node_ids": node_ids, "nodes": nodes,
               "start": start, "run_config": run_config, "run_dir": run_dir, "initial": initial, "cfg": cfg,
               "superlink": superlink_addr}
    finally:
        for proc in reversed(procs):  # signal every process first, then wait: their shutdowns overlap
            if proc.p.poll() is None:
                proc.p.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            proc.kill()


@pytest.mark.long  # about 3 min; CI keeps test_an_unregistered_key_and_a_node_without_the_ca_are_refused
def test_a_tls_federation_survives_a_killed_supernode(federation) -> None:  # type: ignore[no-untyped-def]
    f = federation
    state0 = f["root"] / "states" / "user0"
    # Execute: the run in the background; kill node 0 once round 1 is aggregated
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=_catch(lambda: run_app(ROOT, env=f["cli_env"], run_config=f["run_config"], timeout=1200))))
    runner.start()
    deadline = time.monotonic() + 600
    while not any(r.get("round") == 1 for r in read_jsonl(f["run_dir"] / "rounds.jsonl")):
        assert time.monotonic() < deadline and runner.is_alive(), f"round 1 never finished: {outcome}"
        time.sleep(1)
    f["nodes"][0].kill(signal.SIGKILL)  # a crash: no goodbye to the SuperLink
    before = PrivacyLedger(state0).events()
    meta_before = DeviceStore(state0).load_meta()
    personal_before = (state0 / "personal.safetensors.sealed").read_bytes()
    # Restart with the same key: refused while the SuperLink still counts the old one as online
    for attempt in range(40):
        node = f["start"](0, log=f"node0-restart{attempt}.log")
        try:
            node.wait_for(rf"SuperNode ID: {f['node_ids'][0]}\b", timeout=30)
            break
        except AssertionError:
            node.kill()
            time.sleep(3)
    else:
        pytest.fail("node 0 never rejoined")
    runner.join(1200)
    assert not runner.is_alive()
    result = outcome["result"]
    assert not isinstance(result, BaseException), result
    # Assert: the run completed and the shared base changed
    rows = [r for r in read_jsonl(f["run_dir"] / "rounds.jsonl") if "clients" in r]
    print(f"\ndeployment rounds (resident ClientApp process: {RESIDENT}):",
          [f"round {r['round']}: {r['seconds']:.1f} s" for r in rows])
    rounds = [r["round"] for r in rows]
    assert rounds == list(range(1, ROUNDS + 1))
    final = load_file(str(f["run_dir"] / "checkpoints" / f"round_{ROUNDS:04d}.safetensors"))
    names = build_model(f["cfg"]).sets.send
    assert any(not np.array_equal(final[f"theta/{n}"], a) for n, a in zip(names, f["initial"], strict=True)), \
        "the shared base did not change"
    assert len(read_clients(f["run_dir"])) == NODES, "every device, the restarted one included, evaluated"
    # Node 0 continued: the same ledger chain, ε growing, the personal part trained after the restart
    after = PrivacyLedger(state0).events()
    assert after[: len(before)] == before and len(after) > len(before)
    assert [e.round for e in after] == sorted({e.round for e in after}) and after[-1].round > before[-1].round
    assert all(b.epsilon < a.epsilon for b, a in zip(after, after[1:], strict=False))
    assert DeviceStore(state0).load_meta()["rounds_trained"] == meta_before["rounds_trained"] + len(after) - len(before)
    assert (state0 / "personal.safetensors.sealed").read_bytes() != personal_before
    # Every state-dir holds a sealed personal part whose plaintext tensors are not in the file
    for i in range(NODES):
        state = f["root"] / "states" / f"user{i}"
        personal = DeviceStore(state).load_personal()
        sealed = (state / "personal.safetensors.sealed").read_bytes()
        assert personal and not (state / "personal.safetensors").exists()
        for tensor in personal.values():
            assert tensor.numpy().tobytes()[:64] not in sealed
    # The auditor, given the server's run folder, the devices' state-dirs (each recorded what it
    # sent and received) and their folders: every device's raw context and personal part is
    # searched for in every message, on both sides, and nothing is found
    states = [f["root"] / "states" / f"user{i}" for i in range(NODES)]
    out = CliRunner().invoke(cli, ["audit", str(f["run_dir"]), "--attacks", "wire", "--users", str(f["root"] / "users"),
                                   *[a for s in states for a in ("--devices", str(s))]])
    assert out.exit_code == 0, out.output
    wire = json.loads((f["run_dir"] / "audit" / "audit.json").read_text())
    checks = {(c["name"], c["subject"]): c["status"] for c in wire["checks"]}
    assert all(checks[("wire raw-context", f"user{i}")] == "pass" for i in range(NODES))
    assert all(checks[("wire personal-part", f"user{i}")] == "pass" for i in range(NODES))
    assert {r["side"] for r in wire["wire"]["bytes-per-round"]} == {"server", "device"}


def test_an_unregistered_key_and_a_node_without_the_ca_are_refused(federation) -> None:  # type: ignore[no-untyped-def]
    f = federation
    rogue = f["start"](NODES, key="rogue", log="rogue.log")
    assert rogue.p.wait(90) != 0
    assert "Failed to activate SuperNode" in rogue.text()
    rogue.kill()
    with pytest.raises(InsecureDeploymentError, match="CA certificate not found"):
        supernode_command(superlink=f["superlink"], ca=None, key=f["certs"] / "node1", data_dir=f["root"],
                          state_dir=f["root"] / "x")
    cmd = supernode_command(superlink=f["superlink"], ca=f["certs"] / "ca.pem", key=f["certs"] / "node1",
                            data_dir=f["root"], state_dir=f["root"] / "x", port=free_port())
    cmd = [c for i, c in enumerate(cmd) if c != "--root-certificates" and cmd[i - 1] != "--root-certificates"]
    no_ca = Proc("no-ca", cmd, flower_env(f["root"] / "home-no-ca"), f["root"] / "no-ca.log")
    try:
        assert no_ca.p.wait(90) != 0
    finally:
        no_ca.kill()
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.text()


def test_fedpgen_refuses_a_deployment_without_tls_unless_told(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedpgen.cli import cli

    out = CliRunner().invoke(cli, ["deploy", "superlink", "--state", str(tmp_path / "sl")])
    assert isinstance(out.exception, InsecureDeploymentError) and "clear text" in str(out.exception)
    cmd = superlink_command(certs=None, database=tmp_path / "db", insecure=True)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert CONNECTION == "fedpgen"


def _catch(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001  (reported by the test thread)
        return exc

