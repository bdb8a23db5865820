"""Where the users' device folders are: a built-in population materialized once, or a data dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedpgen.shared.config import RunConfig
from fedpgen.shared.data.user_folder import list_user_dirs
from fedpgen.shared.tasks import get_task

MANIFEST = "population.json"


def population_dir(cfg: RunConfig) -> Path:
    """The folder holding one device folder per user."""
    if cfg.data == "dir":
        return Path(cfg.data_dir).expanduser()
    return Path(cfg.run_dir) / "users"


def ensure_population(cfg: RunConfig) -> list[Path]:
    """Materialize the built-in population (once per run dir) and list the user folders."""
    dest = population_dir(cfg)
    if cfg.data != "dir":
        wanted = {"task": cfg.task, "data": cfg.data, "num-users": cfg.num_users,
                  "min-records": cfg.min_records, "seq-len": cfg.seq_len, "seed": cfg.seed}
        manifest = dest / MANIFEST
        if not manifest.is_file() or json.loads(manifest.read_text()) != wanted:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            get_task(cfg.task).materialize_users(cfg, dest)
            manifest.write_text(json.dumps(wanted))
    return list_user_dirs(dest)


def state_dir(cfg: RunConfig, user_dir: Path) -> Path:
    """A simulated device's own state-dir."""
    return Path(cfg.run_dir) / "devices" / user_dir.name
