"""The fedpgen command. Flags map onto the run-config keys (pyproject.toml, table
tool.flwr.app.config): no second config system."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedpgen.shared.config import RunConfig, load_override_file

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
    task: Annotated[Optional[str], typer.Option(help="text, behavior or image")] = None,
    run_dir: Annotated[Optional[str], typer.Option()] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="run on an existing Ray cluster: 'auto' or "
                                                       "HEAD_IP:PORT (docs/scale.md)")] = None,
    client_gpus: Annotated[Optional[float], typer.Option(help="GPU share per virtual device, e.g. 0.25")] = None,
    fresh: Annotated[bool, typer.Option(help="ignore checkpoints in run-dir and start over")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower's log lines instead of the "
                                          "progress display (docs/monitoring.md)")] = False,
) -> None:
    """Simulate a federation on this machine (or a Ray cluster) and print the results table."""
    from fedpgen.server.metrics_log import require_backend
    from fedpgen.server.progress import configure_logging
    from fedpgen.simulate import simulate as run

    flags = {"data-dir": data_dir, "data": "dir" if data_dir else None, "base-model": base_model,
             "num-users": num_users, "num-server-rounds": rounds, "preset": preset, "task": task, "run-dir": run_dir,
             "ray-address": ray_address, "client-gpus": client_gpus}
    cfg = RunConfig.from_mapping(_overrides(config, set_, flags))
    require_backend(cfg.metrics_log)  # a missing tracking library stops here, before any pre-training
    try:
        with configure_logging(verbose):
            summary = run(cfg, fresh=fresh, console=console, verbose=verbose)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run and what it started were stopped (docs/flwr-run.md)
        console.print(f"[red]interrupted[/]: the run and every process it started were stopped; its completed "
                      f"rounds are saved in {cfg.run_dir} and the same command resumes from them")
        raise typer.Exit(130) from None
    if summary["ended-short"] or summary["out-of-bounds-rounds"]:  # results exist, but not the run asked for
        raise typer.Exit(3)


@cli.command()
def prepare(
    config: Annotated[Optional[Path], typer.Option(help="override file, e.g. simulations/image.toml")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="key=value override of a run-config key")] = [],  # noqa: B006
) -> None:
    """Build and cache the base model (and the task's measuring instruments) for a run configuration.

    Run it once on each device before it joins a deployment: otherwise its first round
    pays the pre-training (minutes for the image task) and may miss the round timeout."""
    from fedpgen.shared.tasks import get_task

    cfg = RunConfig.from_mapping(_overrides(config, set_, {}))
    started = time.perf_counter()
    path = get_task(cfg.task).base_model_path(cfg)
    console.print(f"base model for task={cfg.task}: {path} (ready after {time.perf_counter() - started:.1f} s)")


@cli.command()
def audit(
    run_dir: Path,
    devices: Annotated[list[Path], typer.Option("--devices", help="a device state-dir to audit (repeat); "
                                                "default: <run-dir>/devices/* of a simulation")] = [],  # noqa: B006
    key_file: Annotated[Optional[Path], typer.Option(help="device key (default <state-dir>/device.key)")] = None,
    users: Annotated[Optional[Path], typer.Option(help="the users' device folders, named as the state-dirs (wire "
                                                  "audit; default: a simulation's population)")] = None,
    attacks: Annotated[str, typer.Option(help="comma-separated: accounting, whitebox, wire, membership, canaries")]
    = "accounting,whitebox,wire,membership,canaries",
    canaries: Annotated[int, typer.Option(help="white-box audit: gradient canaries", min=2)] = 1000,
) -> None:
    """Audit a run's privacy claims: recompute every ε, check the wire, bound ε empirically.

    Writes <run-dir>/audit/{audit.json,report.html}; exits 1 naming every failed check."""
    from fedpgen.audit.report import print_table, write_report
    from fedpgen.audit.runner import audit_run

    result = audit_run(run_dir, devices=devices or None, key_file=key_file, canaries=canaries, users_dir=users,
                       attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()))
    out = write_report(result)
    print_table(result, console)
    console.print(f"report: {out / 'report.html'}  machine-readable: {out / 'audit.json'}")
    if result.failed:
        console.print(f"[bold red]audit FAILED:[/] {', '.join(sorted({c.name for c in result.failed}))}")
        raise typer.Exit(1)


@cli.command("plant-canaries")
def plant_canaries(
    config: Annotated[Optional[Path], typer.Option(help="the run's override file, e.g. simulations/canary.toml")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="key=value override of a run-config key")] = [],  # noqa: B006
    data_dir: Annotated[Optional[str], typer.Option(help="folder of user device folders (sets data=dir)")] = None,
    one_run: Annotated[int, typer.Option(help="one-run canaries, each planted once with probability 1/2", min=0)]
    = 200,
    per_repetition: Annotated[int, typer.Option(help="exposure canaries planted 1x, 10x and 100x, each", min=0)] = 2,
    chosen_users: Annotated[int, typer.Option(help="users whose folders hold the exposure canaries", min=1)] = 2,
) -> None:
    """Plant canaries (text task) in the users' folders of a run before it starts, for `fedpgen audit`.

    Writes canary documents into the device folders and the secret to <run-dir>/audit/canaries.json;
    then run `fedpgen simulate` with the same options, then `fedpgen audit <run-dir>`."""
    from fedpgen.audit.canaries import plant
    from fedpgen.shared.population import ensure_population

    flags = {"data-dir": data_dir, "data": "dir" if data_dir else None}
    cfg = RunConfig.from_mapping(_overrides(config, set_, flags))
    if cfg.task != "text":
        raise typer.BadParameter(f"canaries are planted in documents: the text task only (task={cfg.task})")
    users = ensure_population(cfg)
    path = plant(users, run_dir=Path(cfg.run_dir), one_run=one_run, per_repetition=per_repetition,
                 chosen_users=chosen_users)
    console.print(f"planted canaries in {len(users)} users' folders; the secret is {path} "
                  "(keep it from the devices; `fedpgen audit` reads it)")


@cli.command()
def summary(run_dir: Path) -> None:
    """Print the results table of a finished run folder and (re)write its plots and report.html."""
    from fedpgen.server.summary import print_summary

    print_summary(run_dir, console=console)


@cli.command()
def generate(
    run_dir: Path,
    user: str,
    prompt: Annotated[str, typer.Argument(help="text prefix | item ids | image attributes: hair=red glasses=yes")]
    = "",
    variant: Annotated[str, typer.Option(help="personal (shared+personal) | shared | base")] = "personal",
    out: Annotated[Optional[Path], typer.Option(help="images: folder (default <run-dir>/generated/<user>/<variant>)")]
    = None,
    count: Annotated[int, typer.Option(help="images: how many", min=1)] = 4,
    subject: Annotated[Optional[str], typer.Option(help="images: a subject (folder under subjects/), not the face")]
    = None,
    seed: int = 0,
    user_dir: Annotated[Optional[Path], typer.Option(help="the user's device folder (default: the run's)")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="the device's state-dir (default: the run's)")] = None,
    key_file: Annotated[Optional[Path], typer.Option(help="device key (default <state-dir>/device.key)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "cpu",
) -> None:
    """Generate for one user with the run's final shared base and the user's own personal part (on the device)."""
    from fedpgen.generate import generate as run

    result = run(run_dir, user, prompt, variant=variant, out=out, user_dir=user_dir, device_state=state_dir,
                 key_file=key_file, seed=seed, count=count, device=device, subject=subject)
    console.print(result, markup=False, highlight=False)  # generated text may contain "[...]"


@cli.command("export")
def export_model(
    run_dir: Path,
    user: str,
    out: Annotated[Path, typer.Option(help="the export folder to create (it must not exist)")],
    variant: Annotated[str, typer.Option(help="personal (base + shared + personal adapter) | shared")] = "personal",
    user_dir: Annotated[Optional[Path], typer.Option(help="the user's device folder (default: the run's)")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="the device's state-dir (default: the run's)")] = None,
    key_file: Annotated[Optional[Path], typer.Option(help="device key (default <state-dir>/device.key)")] = None,
) -> None:
    """Export one user's model (on the device): the base in Hugging Face format, each adapter in PEFT's.

    The personal adapter is written unsealed and is not DP-protected (docs/export.md)."""
    from fedpgen.export import PLAINTEXT_WARNING
    from fedpgen.export import export as run

    result = run(run_dir, user, out=out, variant=variant, user_dir=user_dir, device_state=state_dir,
                 key_file=key_file)
    folders = "base/, shared/" + (", personal/" if variant == "personal" else "")
    console.print(f"exported {user} to {result.out}: {folders} (shared adapter of round {result.round}; "
                  f"{variant} = adapters {' + '.join(result.activate)} active together); loading code in "
                  f"{result.out / 'README.txt'}", markup=False, highlight=False)
    if variant == "personal":
        console.print(f"[bold red]WARNING:[/] {PLAINTEXT_WARNING}")


@cli.command()
def ledger(state_dir: Path,
           key_file: Annotated[Optional[Path], typer.Option(help="device key (default <state-dir>/device.key)")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout, for tools")] = False,
           ) -> None:
    """Verify and print a device's privacy ledger (for auditors; needs the device key)."""
    import dataclasses

    from rich.table import Table

    from fedpgen.shared.privacy.ledger import PrivacyLedger
    from fedpgen.shared.store import device_sealer

    if not state_dir.is_dir():
        raise FileNotFoundError(f"state dir not found: {state_dir}")
    ledger_ = PrivacyLedger(state_dir, device_sealer(state_dir, key_file, create=False))
    events, user_plan = ledger_.events(), ledger_.user_plan()
    if as_json:  # ∞ (no noise) as null: strict JSON
        rows = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(e).items()}
                for e in events]
        typer.echo(json.dumps({"state-dir": str(state_dir), "chain": "verified", "events": rows,
                               "participations": ledger_.participations(), "record-plan": ledger_.plan(),
                               "user-plan": user_plan}, indent=1))
        return
    table = Table(title=f"Privacy ledger of {state_dir} ({len(events)} events, chain verified)")
    for col in ("round", "unit", "mechanism", "σ", "C", "q", "steps", "δ", "ε (cumulative)", "accountant"):
        table.add_column(col)
    for e in events:
        table.add_row(str(e.round), e.unit, e.mechanism, f"{e.noise_multiplier:.4g}", f"{e.clip:g}",
                      f"{e.sample_rate:.4g}", str(e.steps), f"{e.delta:g}",
                      (f"{e.epsilon:.3f}" if e.private else "inf (NOT PRIVATE)")
                      + (" vs server" if e.unit == "user" else ""), e.accountant)
    console.print(table)
    if user_plan:  # the user-level parameters the device holds fixed (shared/privacy/plan.py)
        cap, times = int(user_plan.get("dp-max-participations", 0)), ledger_.participations()
        console.print(f"user-level DP ({user_plan['user-dp']} DP-FedAvg, S={user_plan['user-clip']}, "
                      f"z={user_plan['user-noise-multiplier']}, dropouts {user_plan['user-noise-dropouts']}), fixed "
                      f"since this device first trained: {times} participation{'' if times == 1 else 's'}"
                      + (f" of at most {cap} (dp-max-participations)" if cap else " (no cap)")
                      + ". Its events' ε is against the server, which drew the cohorts (q = 1); the amplified ε "
                      "against anyone who sees only the shared bases is the run's user-epsilon (summary.json)")


deploy_cli = typer.Typer(no_args_is_help=True, help="A real federation: Flower's Deployment Engine with TLS and "
                                                     "node authentication (docs/deployment.md).")
cli.add_typer(deploy_cli, name="deploy")
INSECURE = typer.Option(help="run WITHOUT TLS and node authentication (one-machine demos only)")


@deploy_cli.command("certs")
def deploy_certs(out: Path,
                 nodes: Annotated[int, typer.Option(help="SuperNode key pairs to create (node0, node1, ...)")] = 1,
                 host: Annotated[list[str], typer.Option(help="SuperLink host names / IPs for the certificate")] = [
                     "localhost", "127.0.0.1"],  # noqa: B006
                 ) -> None:
    """Create a CA, the SuperLink's TLS certificate and SuperNode authentication keys."""
    from fedpgen.deploy import make_certificates

    names = [f"node{i}" for i in range(nodes)]
    make_certificates(out, nodes=names, hosts=host)
    console.print(f"wrote {out}/ca.pem (give to every SuperNode and flwr), server.pem/server.key (SuperLink), "
                  f"{', '.join(names)} (private, one per SuperNode) and their .pub (register them)")


@deploy_cli.command("superlink")
def deploy_superlink(certs: Annotated[Optional[Path], typer.Option(help="folder from `fedpgen deploy certs`")] = None,
                     state: Annotated[Path, typer.Option(help="SuperLink state folder (SQLite)")] = Path("superlink"),
                     host: str = "127.0.0.1", port: int = 9092, insecure: Annotated[bool, INSECURE] = False) -> None:
    """Start flower-superlink (TLS, node authentication, durable state, no runtime installs)."""
    from fedpgen.deploy import INSECURE_WHY, flower_env, superlink_command

    state.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(certs=certs, database=state / "state.db", host=host, port=port, insecure=insecure)
    if insecure:
        console.print(f"[bold red]INSECURE deployment:[/] {INSECURE_WHY}")
    os.execvpe(cmd[0], cmd, flower_env(state / "flwr-home"))


@deploy_cli.command("register")
def deploy_register(public_key: Path, superlink: str = "127.0.0.1:9092",
                    ca: Annotated[Optional[Path], typer.Option(help="CA certificate")] = None,
                    home: Annotated[Path, typer.Option(help="flwr CLI home")] = Path(".flwr-home")) -> None:
    """Register a SuperNode's public key with the SuperLink (prints its node id)."""
    from fedpgen.deploy import flwr_home, register_node

    console.print(f"node id {register_node(public_key, env=flwr_home(home, superlink=superlink, ca=ca))}")


@deploy_cli.command("supernode")
def deploy_supernode(data_dir: Annotated[Path, typer.Option(help="this user's device folder")],
                     state_dir: Annotated[Path, typer.Option(help="the sealed on-device store")],
                     superlink: str = "127.0.0.1:9092",
                     ca: Annotated[Optional[Path], typer.Option(help="CA certificate")] = None,
                     key: Annotated[Optional[Path], typer.Option(help="this node's private key")] = None,
                     port: Annotated[int, typer.Option(help="this node's local API port")] = 9094,
                     device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
                     micro_batch: Annotated[int, typer.Option(help="records per forward/backward (0 = all)")] = 0,
                     key_file: Annotated[Optional[Path], typer.Option(help="device key for the state "
                                                                           "(default <state-dir>/device.key)")] = None,
                     per_message_process: Annotated[bool, typer.Option(
                         help="Flower's default: a fresh ClientApp process (model built again) per message; "
                              "default: one resident ClientApp process (docs/scale.md)")] = False,
                     insecure: Annotated[bool, INSECURE] = False) -> None:
    """Start flower-supernode for one user's device, with its resident ClientApp process."""
    from fedpgen.deploy import INSECURE_WHY, flower_env, supernode_command

    from fedpgen.shared.accelerator import select_device

    select_device(device)  # a clear error now, not at the first round
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data dir not found: {data_dir}")
    cmd = supernode_command(superlink=superlink, ca=ca, key=key, data_dir=data_dir, state_dir=state_dir, port=port,
                            device=device, micro_batch=micro_batch, key_file=key_file, insecure=insecure,
                            resident=not per_message_process)
    if insecure:
        console.print(f"[bold red]INSECURE deployment:[/] {INSECURE_WHY}")
    state_dir.mkdir(parents=True, exist_ok=True)
    os.execvpe(cmd[0], cmd, flower_env(state_dir.parent / f".flwr-home-{state_dir.name}"))


@deploy_cli.command("run")
def deploy_run(superlink: str = "127.0.0.1:9092",
               ca: Annotated[Optional[Path], typer.Option(help="CA certificate")] = None,
               config: Annotated[Optional[Path], typer.Option(help="override file")] = None,
               set_: Annotated[list[str], typer.Option("--set", help="key=value run-config override")] = [],  # noqa: B006
               home: Annotated[Path, typer.Option(help="flwr CLI home")] = Path(".flwr-home"),
               insecure: Annotated[bool, INSECURE] = False) -> None:
    """Run this Flower App on the SuperLink (`flwr run . --stream`) and check that it completed."""
    from fedpgen.deploy import flwr_home, run_app

    overrides = _overrides(config, set_, {})
    RunConfig.from_mapping(overrides)  # validate here: a bad key fails before anything starts
    env = flwr_home(home, superlink=superlink, ca=ca, insecure=insecure)
    run_id, _ = run_app(Path(__file__).resolve().parent.parent, env=env, run_config=overrides)
    console.print(f"run {run_id} completed")


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
