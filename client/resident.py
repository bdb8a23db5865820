"""A long-running ClientApp process next to a SuperNode: the resident runtime in a deployment.

Flower 1.42's SuperNode, in its default ``subprocess`` isolation, has ``flower-superexec``
start a fresh ``flwr-clientapp`` for every message: each imports torch and transformers and
builds the model again (docs/scale.md). In ``--isolation process`` the SuperNode starts no
executor; whoever serves its Runtime API takes the tasks. This module is that server: one
process that acquires each ClientApp task from the SuperNode and runs it with FedPGen's
ClientApp, imported once, so the model built by ``client/runtime.py`` stays resident.

Per task it does what ``flwr-clientapp`` does (Flower's own functions: pull the message and
the context, run the app, push the reply, push the context back, which carries SecAgg+'s
per-node state between stages) without exiting afterwards. It does not install the FAB the
server sent: the device runs the FedPGen it has installed (what a device operator vetted),
and a FAB from a different FedPGen is refused by the run config's schema anyway.

``fedpgen deploy supernode`` starts it (``python -m client.resident -- <flower-supernode args>``):
it starts ``flower-supernode --isolation process`` as its child (through
``client/supernode_poll.py``: Flower's SuperNode, its SuperLink poll waiting less right
after a message), serves the child's Runtime
API until the child exits, and passes its exit status on. A signal stops both.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import MAX_RETRY_DELAY, ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

log = logging.getLogger("fedpgen.resident")

POLL_SECONDS = 0.2


def _retry(max_time: float | None) -> RetryInvoker:
    """Retry connection errors (the SuperNode is starting, or busy); never an HTTP status:
    Flower's own invoker answers a 401 by sending SIGINT to the whole process, which would end
    every later task too."""
    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
                        recoverable_exceptions=httpx.TransportError, max_tries=None, max_time=max_time)


def _client(address: str, *interceptors: object, max_time: float | None) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=list(interceptors), retry_invoker=_retry(max_time))


def run_task(address: str, token: str, app: ClientApp) -> str:
    """One ClientApp task, as ``flwr-clientapp`` runs it; returns the final sub-status."""
    client = _client(address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                     RuntimeTokenHttpInterceptor(token), max_time=120.0)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, _run, _fab = pull_task_input(client)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the task fails with a reply, as in flwr-clientapp; the process serves on
        log.exception("ClientApp raised an exception")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            log.exception("could not push the reply")
            status = SubStatus.FAILED
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
    return status


def serve(address: str, app: ClientApp, *, running: Callable[[], bool]) -> None:
    """Acquire and run ClientApp tasks from the SuperNode's Runtime API while ``running()``."""
    acquire = _client(address, RuntimeVersionHttpInterceptor(component_name="SuperExec"), max_time=None)
    try:
        while running():
            try:
                res = acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPError as exc:
                log.warning("acquiring a task failed: %s", exc)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                started = time.perf_counter()
                status = run_task(address, res.token, app)
                log.info("task %s %s in %.1f s", res.task.task_id, status, time.perf_counter() - started)
            else:
                time.sleep(POLL_SECONDS)
    finally:
        acquire.close()


def runtime_api_address(supernode_args: list[str]) -> str:
    """Where ``flower-supernode`` serves its Runtime API: ``--host`` (default 127.0.0.1) and ``--port`` (9094)."""
    def value(flag: str, default: str) -> str:
        return supernode_args[supernode_args.index(flag) + 1] if flag in supernode_args else default

    return f"{value('--host', '127.0.0.1')}:{value('--port', '9094')}"


def _die_with_parent() -> None:
    """Linux: the SuperNode gets SIGTERM when this process dies, even by SIGKILL (no orphan
    SuperNode holding the node's identity without anyone to run its tasks)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    """``python -m client.resident -- <flower-supernode args>``: the SuperNode and its resident ClientApp."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = argv[1:] if argv[:1] == ["--"] else argv
    if "--isolation" in args:
        raise SystemExit("fedpgen.client.resident sets --isolation process itself")
    from fedpgen.client.app import (
        app,  # imported once: the resident runtime lives in this process
    )

    # preexec_fn runs one prctl call in the child, before any thread of ours exists
    # Flower's flower-supernode, its SuperLink poll waiting less after a message (client/supernode_poll.py)
    supernode = subprocess.Popen([sys.executable, "-m", "fedpgen.client.supernode_poll", *args,  # noqa: PLW1509
                                  "--isolation", "process"], preexec_fn=_die_with_parent)

    def stop(signum: int, _frame: object) -> None:
        if supernode.poll() is None:
            supernode.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    worker = threading.Thread(target=serve, args=(runtime_api_address(args), app),
                              kwargs={"running": lambda: supernode.poll() is None}, daemon=True)
    worker.start()
    code = supernode.wait()
    worker.join(timeout=5)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
