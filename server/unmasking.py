"""The server's SecAgg+ unmasking: every device's secret reconstructed in parallel processes.

At the unmask stage Flower's workflow rebuilds one secret per device (a survivor's mask seed,
a dropped device's key) with ``combine_shares``, one after another in the ServerApp's
process: pycryptodome's Lagrange interpolation in pure Python, 0.011 CPU s per device at
threshold 19 (a 12-byte mask seed; 0.034 s for Flower's 32 bytes), 11 s of a 1,000-device
round on one core (docs/scale.md). The secrets are
independent, so :func:`combine_all` runs Flower's own ``combine_shares`` on them in a pool of
processes before Flower's loop reaches them, and Flower's loop picks each result up
(``server/secure_aggregation.py``). A list whose reconstruction fails here is left out, and
Flower's loop fails on it as it always did. This module imports nothing but Flower's Shamir
wrapper: it is what every worker process imports.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from flwr.common.secure_aggregation.crypto.shamir import combine_shares

log = logging.getLogger(__name__)

# combine_shares costs about this × shares² per 16-byte chunk of the secret (pycryptodome's
# Lagrange interpolation: 0.011 CPU s for 19 shares of a 12-byte seed, 0.002 s for 7; docs/scale.md)
SECONDS_PER_SHARE_PAIR = 3e-5
# below this much serial work one process is done before a pool of spawned processes has
# started (≈ 1.3 s here) and taken half of it: 100 devices at 11 shares, 0.2 s, stay serial
MIN_SERIAL_SECONDS = 3.0
MAX_WORKERS = 8


def serial_seconds(share_lists: Sequence[list[bytes]]) -> float:
    """Estimated CPU seconds of combining every list in one process."""
    return sum(SECONDS_PER_SHARE_PAIR * len(shares) ** 2 * max(1, (len(shares[0]) - 4) // 16)
               for shares in share_lists if shares)


def workers() -> int:
    """The CPUs this process may use, at most ``MAX_WORKERS``."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(usable, MAX_WORKERS))


def _combine(shares: list[bytes]) -> bytes | None:
    try:
        return combine_shares(shares)
    except Exception:  # noqa: BLE001  (Flower's own call then raises it, as before)
        return None


def combine_all(share_lists: Sequence[list[bytes]], *, processes: int | None = None) -> dict[tuple[bytes, ...], bytes]:
    """``combine_shares`` of each list, keyed by the list's shares; {} when a pool would not pay
    off (less than ``MIN_SERIAL_SECONDS`` of work, or one process)."""
    processes = workers() if processes is None else processes
    if processes < 2 or serial_seconds(share_lists) < MIN_SERIAL_SECONDS:
        return {}
    try:
        # spawn: the ServerApp's process runs threads (gRPC, Ray), which a fork would copy mid-state
        with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            secrets = pool.map(_combine, share_lists, chunksize=max(1, len(share_lists) // (4 * processes)))
            return {tuple(shares): secret for shares, secret in zip(share_lists, secrets) if secret is not None}
    except Exception as exc:  # noqa: BLE001  (no pool here, e.g. no /dev/shm: Flower's loop does it all)
        log.warning("SecAgg+ unmask: no process pool (%s: %s); the secrets are reconstructed one by one",
                    type(exc).__name__, exc)
        return {}
