"""``flower-supernode`` whose SuperLink poll waits less right after a message.

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) pulls a message,
waits for the ClientApp's reply polling its own state every 0.5 s, pushes it, and pulls
again; a pull that brings nothing is followed by ``time.sleep(3)``. In a SecAgg+ round
every stage's message is pushed by the server only after the last device's reply of the
stage before, so the device that replied last has always just found nothing and slept
3 s: each of a round's five exchanges (four SecAgg+ stages and the evaluation) waited about
3 s on the SuperNode, on top of the ClientApp's work.

This module runs Flower's own ``flower-supernode`` entry point with two of that loop's
waits changed, nothing else:

- after a pull that brought nothing, it waits 0.1 s, then half again as long after each
  further empty pull, up to Flower's 3 s; a pulled message starts the waits from 0.1 s
  again (:class:`IdleBackoff`). After a message a SuperNode pulls 9 times in the next
  7.5 s where Flower's pulls 2–3 times, then every 3 s as before;
- the 0.5 s polls of its own in-memory state (is the reply there yet, is an object stored
  yet) become 0.1 s.

If the Flower installed lacks either name patched (another version), it runs Flower's
SuperNode unchanged and says so. ``client/resident.py`` starts the SuperNode through it
(``fedpgen deploy supernode``; ``--per-message-process`` keeps Flower's own, unchanged).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fedpgen.supernode_poll")

FLOWER_IDLE_SECONDS = 3.0  # flwr.supernode.start_client_internal: time.sleep(3) after an empty pull
FLOWER_LOCAL_SECONDS = 0.5  # ... and time.sleep(0.5) while waiting for a reply or an object in its state
FIRST_WAIT = 0.1
GROWTH = 1.5
LOCAL_WAIT = 0.1


class IdleBackoff:
    """The waits after empty pulls: ``FIRST_WAIT``, growing by ``GROWTH`` up to Flower's own."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self._sleep = sleep
        self.wait: float | None = None  # None: the next empty pull waits FIRST_WAIT

    def message_pulled(self) -> None:
        self.wait = None

    def idle(self, ceiling: float) -> None:
        self.wait = min(FIRST_WAIT if self.wait is None else self.wait * GROWTH, ceiling)
        self._sleep(self.wait)


class _Clock:
    """What the SuperNode loop's module sees as ``time``: its ``sleep`` goes through the backoff."""

    def __init__(self, backoff: IdleBackoff, sleep: Callable[[float], None] = time.sleep) -> None:
        self._backoff, self._real_sleep = backoff, sleep

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SECONDS:
            self._backoff.idle(seconds)
        elif seconds == FLOWER_LOCAL_SECONDS:
            self._real_sleep(LOCAL_WAIT)
        else:
            self._real_sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(module: Any = None, *, sleep: Callable[[float], None] = time.sleep) -> IdleBackoff | None:
    """Patch the SuperNode loop's module (Flower's, by default); None if it is not the shape
    this module knows, in which case nothing is changed."""
    if module is None:
        from flwr.supernode import start_client_internal as module
    pull = getattr(module, "_pull_and_store_message", None)
    if not callable(pull) or getattr(module, "time", None) is not time:
        log.warning("this Flower's SuperNode loop is not the one fedpgen knows: its poll is left as it is")
        return None
    backoff = IdleBackoff(sleep)

    def pull_and_note(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            backoff.message_pulled()
        return run_id

    module._pull_and_store_message = pull_and_note
    module.time = _Clock(backoff, sleep)
    return backoff


def main(argv: list[str]) -> None:
    """``python -m fedpgen.client.supernode_poll <flower-supernode args>``."""
    install()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
