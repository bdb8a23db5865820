"""The ``fedpgen`` command. Flags map onto ``[tool.flwr.app.config]`` keys: no second config system."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from shared.config import RunConfig, load_override_file

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=120)


def _overrides(config: Optional[Path], sets: list[str], flags: dict[str, object]) -> dict[str, object]:
    values: dict[str, object] = dict(load_override_file(config)) if config else {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


@cli.command()
def simulate(
    config: Annotated[Optional[Path], typer.Option(help="override file, e.g. simulations/smoke.toml")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="key=value override of a run-config key")] = [],  # noqa: B006
    data_dir: Annotated[Optional[str], typer.Option(help="folder of user device folders (sets data=dir)")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="local Hugging Face checkpoint path")] = None,
    num_users: Annotated[Optional[int], typer.Option()] = None,
    rounds: Annotated[Optional[int], typer.Option(help="num-server-rounds")] = None,
    preset: Annotated[Optional[str], typer.Option()] = None,
    run_dir: Annotated[Optional[str], typer.Option()] = None,
    fresh: Annotated[bool, typer.Option(help="ignore checkpoints in run-dir and start over")] = False,
) -> None:
    """Simulate a federation on this machine and print the results table."""
    from fedpgen.simulate import simulate as run

    flags = {"data-dir": data_dir, "data": "dir" if data_dir else None, "base-model": base_model,
             "num-users": num_users, "num-server-rounds": rounds, "preset": preset, "run-dir": run_dir}
    cfg = RunConfig.from_mapping(_overrides(config, set_, flags))
    run(cfg, fresh=fresh, console=console)


@cli.command()
def summary(run_dir: Path) -> None:
    """Print the results table of a finished run folder."""
    from server.summary import print_summary

    print_summary(run_dir, console=console)


@cli.command()
def ledger(state_dir: Path,
           key_file: Annotated[Optional[Path], typer.Option(help="device key (default <state-dir>/device.key)")] = None,
           ) -> None:
    """Verify and print a device's privacy ledger (for auditors; needs the device key)."""
    from rich.table import Table

    from shared.privacy.ledger import PrivacyLedger
    from shared.store import device_sealer

    if not state_dir.is_dir():
        raise FileNotFoundError(f"state dir not found: {state_dir}")
    events = PrivacyLedger(state_dir, device_sealer(state_dir, key_file, create=False)).events()
    table = Table(title=f"Privacy ledger of {state_dir} ({len(events)} events, chain verified)")
    for col in ("round", "unit", "mechanism", "σ", "C", "q", "steps", "δ", "ε (cumulative)", "accountant"):
        table.add_column(col)
    for e in events:
        table.add_row(str(e.round), e.unit, e.mechanism, f"{e.noise_multiplier:.4g}", f"{e.clip:g}",
                      f"{e.sample_rate:.4g}", str(e.steps), f"{e.delta:g}",
                      f"{e.epsilon:.3f}" if e.private else "inf (NOT PRIVATE)", e.accountant)
    console.print(table)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=console)])
    for name in ("fedpgen", "server", "client", "shared"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # Flower prints with its own handler
    try:
        cli()
    except (ValueError, FileNotFoundError, RuntimeError, PermissionError) as exc:  # TamperedStateError included
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
