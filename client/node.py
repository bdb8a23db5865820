"""A SuperNode's own settings (Flower's ``--node-config``), parsed and validated once.

Deployment: ``data-dir`` (the user's device folder), ``state-dir`` (the sealed on-device
store), optionally ``key-file`` (the device key, default ``<state-dir>/device.key``),
``device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, default ``auto``) and
``micro-batch`` (records per forward/backward, a memory cap; 0 = whole batches).
Simulation: Flower's ``partition-id`` picks a user folder of the materialized population.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpgen.shared.config import RunConfig
from fedpgen.shared.data.user_folder import list_user_dirs
from fedpgen.shared.population import population_dir, state_dir

DEPLOYMENT_KEYS = frozenset({"data-dir", "state-dir", "key-file", "device", "micro-batch"})
SIMULATION_KEYS = frozenset({"partition-id", "num-partitions"})


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    user_dir: Path
    state_dir: Path
    client_index: int = -1
    key_file: Path | None = None
    device: str = "auto"
    micro_batch: int = 0


def node_settings(node_config: Mapping[str, Any], cfg: RunConfig) -> NodeSettings:
    """Parse a node config; an unknown or missing key is an error naming it."""
    node = dict(node_config)
    unknown = set(node) - DEPLOYMENT_KEYS - SIMULATION_KEYS
    if unknown:
        raise ValueError(f"node config: unknown keys {sorted(unknown)}; valid: {', '.join(sorted(DEPLOYMENT_KEYS))}")
    try:
        micro_batch = int(node.get("micro-batch", 0))
    except (TypeError, ValueError):
        raise ValueError(f"node config 'micro-batch': {node.get('micro-batch')!r} is not an integer") from None
    if micro_batch < 0:
        raise ValueError(f"node config 'micro-batch': {micro_batch} must be >= 0 (0 = whole batches)")
    if "data-dir" in node:
        if not node.get("state-dir"):
            raise ValueError("node config: 'data-dir' needs a 'state-dir' (where the sealed device state lives)")
        key = Path(str(node["key-file"])).expanduser() if node.get("key-file") else None
        return NodeSettings(user_dir=Path(str(node["data-dir"])).expanduser(),
                            state_dir=Path(str(node["state-dir"])).expanduser(), key_file=key,
                            device=str(node.get("device", "auto")), micro_batch=micro_batch)
    if "partition-id" not in node:
        raise ValueError("node config: a SuperNode needs data-dir=... and state-dir=... (see README, Deployment)")
    index = int(node["partition-id"])
    users = population(population_dir(cfg))  # materialized by `fedpgen simulate` before the run
    if index >= len(users):
        raise ValueError(f"partition-id {index} but only {len(users)} user folders")
    # A virtual device uses a GPU only when Ray gave it a share (client-gpus); micro-batch may still be set.
    return NodeSettings(user_dir=users[index], state_dir=state_dir(cfg, users[index]), client_index=index,
                        device="auto" if cfg.client_gpus > 0 else "cpu", micro_batch=micro_batch)


_POPULATION: dict[Path, tuple[int, list[Path]]] = {}


def population(folder: Path) -> list[Path]:
    """The population's user folders, listed once per process while the folder's entries stay
    the same (its mtime): listing 100,000 folders for every message made each device's round
    cost grow with the registered population (docs/scale.md)."""
    key = folder.resolve()
    stamp = key.stat().st_mtime_ns if key.is_dir() else -1
    cached = _POPULATION.get(key)
    if cached is None or cached[0] != stamp:
        cached = _POPULATION[key] = (stamp, list_user_dirs(folder))
    return cached[1]
