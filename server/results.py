"""The run folder: resolved config, per-round metrics, per-client metrics, bytes on the wire."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from fedpgen.shared.config import RunConfig


class RunRecorder:
    """Appends what the server legitimately sees (aggregates and listed plaintext metadata)."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(cfg.to_toml_dict(), indent=2, sort_keys=True))

    def _append_jsonl(self, name: str, row: dict[str, Any]) -> None:
        with (self.dir / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def round(self, row: dict[str, Any]) -> None:
        self._append_jsonl("rounds.jsonl", row)

    def client_round(self, row: dict[str, Any]) -> None:
        self._append_jsonl("client_rounds.jsonl", row)

    def final_clients(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        keys = sorted({k for r in rows for k in r})
        with (self.dir / "clients.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: r.get("client-index", -1)))


def read_config(run_dir: Path) -> RunConfig:
    """The validated configuration a run folder was written with (``config.json``).

    Raises ``FileNotFoundError`` without one and ``ValueError`` naming the file when it does
    not parse or no longer validates (an old or hand-edited ``config.json``).
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.json)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise TypeError(f"a JSON object of config keys expected, got {type(values).__name__}")
        return RunConfig.from_mapping(values)
    except (TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a valid run configuration: {exc}") from exc


def read_jsonl(path: Path, *, skip_torn: bool = False) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] without one). ``skip_torn``: a line that does not parse
    (torn by a crash mid-append) is skipped with a warning instead of raising."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if line.strip():
                rows.append(json.loads(line))
        except ValueError:
            if not skip_torn:
                raise
            logging.getLogger(__name__).warning("%s: an unreadable line skipped: %.80s", path, line)
    return rows


def read_clients(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "clients.csv"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _num(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value
