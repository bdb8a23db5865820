"""Issue 14: ``fedpgen simulate`` on an existing multi-node Ray cluster (``ray-address``).

A head and a second node, started here on loopback as two ``ray start`` processes (one CPU
each), then a small run joins the cluster; every device records which node's worker trained
it. Both nodes are stopped by their own process (never ``ray stop``, which kills every Ray
process on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import TINY

BIN = Path(sys.executable).parent

DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from fedpgen.simulate import simulate
    from fedpgen.shared.config import RunConfig

    values, marks = json.loads(sys.argv[1]), Path(sys.argv[2])

    def mark_node(msg, ctxt, call_next):
        # which Ray node's worker runs this device (the nodes were started with a tag each)
        (marks / f"{os.environ.get('FEDPGEN_TEST_RAY_NODE', 'none')}-{os.getpid()}").touch()
        return call_next(msg, ctxt)

    simulate(RunConfig.from_mapping(values), fresh=True, client_mods=([], [mark_node]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(tag: str, args: list[str], temp: Path) -> subprocess.Popen:
    env = {**os.environ, "FEDPGEN_TEST_RAY_NODE": tag, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([str(BIN / "ray"), "start", *args, "--num-cpus=1", "--num-gpus=0",
                             f"--temp-dir={temp}", "--disable-usage-stats", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for_nodes(address: str, count: int, temp: Path, timeout: float = 90.0) -> None:
    probe = ("import ray, sys, time\n"
             f"ray.init(address={address!r}, logging_level='ERROR')\n"
             f"end = time.time() + {timeout}\n"
             f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.time() < end: time.sleep(0.5)\n"
             f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=timeout + 60, capture_output=True)


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM to a ``--block`` node: it stops its own raylet, GCS and workers."""
    if node.poll() is None:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


@pytest.mark.slow
def test_a_simulation_runs_across_a_two_node_ray_cluster(tmp_path: Path) -> None:
    # Prepare: a head and a second node on loopback (short temp path: Unix sockets live there)
    temp = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = _start_node("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                                "--include-dashboard=false"], temp)
    nodes = [head]
    try:
        _wait_for_nodes(address, 1, temp)
        nodes.append(_start_node("second", [f"--address={address}"], temp))
        _wait_for_nodes(address, 2, temp)
        marks = tmp_path / "marks"
        marks.mkdir()
        values = {**TINY, "num-users": 4, "num-server-rounds": 1, "min-fit-clients": 4, "local-steps": 2,
                  "personal-max-steps": 0, "secure-aggregation": False, "dp": "off", "evaluation": "device",
                  "run-dir": str(tmp_path / "run"), "ray-address": address}
        # Execute: the run joins the cluster (a subprocess: a failed Ray start must not hang the tests)
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(values), str(marks)], check=False,
                              cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        assert done.returncode == 0, done.stderr[-3000:]
        # Assert: the run finished its round, devices trained on both nodes, the cluster survived it
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["clients"] == 4
        assert {p.name.split("-")[0] for p in marks.iterdir()} == {"head", "second"}
        assert all(n.poll() is None for n in nodes), "the run stopped the cluster it joined"
    finally:
        for node in reversed(nodes):
            _stop(node)
        subprocess.run(["rm", "-rf", str(temp)], check=False)
