"""A real federation with Flower's Deployment Engine: certificates, SuperLink, SuperNodes, runs.

Flower 1.42 facts this relies on (checked by running them, see docs/deployment.md):

- ``flower-superlink`` serves the Fleet, Control and Runtime APIs on ONE HTTPS port
  (``--host``/``--port``); TLS with ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``;
  SuperNode authentication with ``--enable-supernode-auth``; its state (registered nodes,
  runs) in ``--database``; ``--disable-runtime-dependency-installation`` so nothing is
  installed at run time (air-gapped).
- SuperNode keys are EC (SECP384R1): the private key in OpenSSH format for
  ``flower-supernode --auth-supernode-private-key``, the public key in OpenSSH format for
  ``flwr supernode register``. The node id is bound to the key.
- The ``flwr`` CLI reads connections from ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``
  with an absolute ``root-certificates``); ``flwr run --stream`` exits 0 even when the
  ServerApp fails, so the run's status is checked with ``flwr ls``.
- Each SuperNode opens its own local Runtime API port (``--port``): one per node on a host.

Only ``cryptography`` is used for keys and certificates; no primitive is written here.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONNECTION = "fedpgen"  # the flwr CLI connection name written into $FLWR_HOME/config.toml
INSECURE_WHY = ("without TLS every shared delta, the SecAgg+ key exchange and the node's identity travel in "
                "clear text, and without node authentication any machine can join the federation")


class InsecureDeploymentError(ValueError):
    """A deployment without TLS was asked for without ``--insecure``."""


# -- keys and certificates --------------------------------------------------------------------
def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certificates(out: Path, *, nodes: list[str], hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Write ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (SAN: ``hosts``) and, per node
    name, ``<node>`` (OpenSSH EC private key, 0600) and ``<node>.pub`` (OpenSSH public key)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(days=days)}
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (x509.CertificateBuilder().subject_name(_name("fedpgen-ca")).issuer_name(_name("fedpgen-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), 0o600)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
              .add_extension(x509.SubjectAlternativeName(sans), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", server_key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()), 0o600)
    for node in nodes:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(out / node, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), 0o600)
        _write(out / f"{node}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return {"ca": out / "ca.pem", "server-cert": out / "server.pem", "server-key": out / "server.key"}


def _need(path: Path | None, what: str) -> Path:
    if path is None or not Path(path).is_file():
        raise InsecureDeploymentError(f"{what} not found ({path}): TLS needs it, because {INSECURE_WHY}. Create "
                                      "certificates with `fedpgen deploy certs DIR`, or pass --insecure to run "
                                      "without TLS knowingly (tests and demos on one machine only)")
    return Path(path).resolve()


def flower_exe(name: str) -> str:
    """A Flower executable: next to this Python first (the project's venv), then on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install the project (make install) or put Flower on PATH")
    return found


# -- commands ---------------------------------------------------------------------------------
def superlink_command(*, certs: Path | None, database: Path, host: str = "127.0.0.1", port: int = 9092,
                      insecure: bool = False) -> list[str]:
    """``flower-superlink`` with TLS, node authentication and durable state (or ``--insecure``)."""
    cmd = [flower_exe("flower-superlink"), "--database", str(Path(database).resolve()), "--host", host,
           "--port", str(port), "--disable-runtime-dependency-installation"]
    if insecure:
        return [*cmd, "--insecure"]  # Flower refuses node authentication without TLS
    certs = Path(certs) if certs else None
    return [*cmd, "--ssl-ca-certfile", str(_need(certs / "ca.pem" if certs else None, "CA certificate")),
            "--ssl-certfile", str(_need(certs / "server.pem" if certs else None, "SuperLink certificate")),
            "--ssl-keyfile", str(_need(certs / "server.key" if certs else None, "SuperLink private key")),
            "--enable-supernode-auth"]


def node_config_arg(values: Mapping[str, Any]) -> str:
    """Flower's ``--node-config`` string: strings single-quoted (an unquoted path crashes the
    SuperNode), numbers as they are; no spaces around ``=`` (those pairs are silently dropped)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            if "'" in text:
                raise ValueError(f"node config {key!r}: a single quote cannot be passed: {text!r}")
            parts.append(f"{key}='{text}'")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def supernode_command(*, superlink: str, ca: Path | None, key: Path | None, data_dir: Path, state_dir: Path,
                      port: int = 9094, device: str = "auto", micro_batch: int = 0, key_file: Path | None = None,
                      insecure: bool = False, resident: bool = True) -> list[str]:
    """``flower-supernode`` for one user's device: TLS + node key, and its node config.

    ``resident`` (the default): wrapped by ``client/resident.py``, one long-running ClientApp
    process that keeps the model built across messages; otherwise Flower starts a
    ``flwr-clientapp`` process per message."""
    node: dict[str, Any] = {"data-dir": str(Path(data_dir).resolve()), "state-dir": str(Path(state_dir).resolve()),
                            "device": device, "micro-batch": micro_batch}
    if key_file:
        node["key-file"] = str(Path(key_file).resolve())
    args = ["--superlink", superlink, "--port", str(port), "--node-config", node_config_arg(node)]
    if insecure:
        args.append("--insecure")
    else:
        args += ["--root-certificates", str(_need(Path(ca) if ca else None, "CA certificate")),
                 "--auth-supernode-private-key", str(_need(Path(key) if key else None, "SuperNode private key"))]
    if resident:
        return [sys.executable, "-m", "fedpgen.client.resident", "--", *args]
    return [flower_exe("flower-supernode"), *args]


def flwr_home(home: Path, *, superlink: str, ca: Path | None, insecure: bool = False) -> dict[str, str]:
    """Write ``$FLWR_HOME/config.toml`` with the ``fedpgen`` connection; return the environment
    for ``flwr`` (written before any ``flwr`` call: otherwise the CLI writes a default whose
    ``:local:`` connection starts a background SuperLink)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{superlink}"']
    lines.append("insecure = true" if insecure else
                 f'root-certificates = "{_need(Path(ca) if ca else None, "CA certificate")}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return flower_env(home)


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower processes: this venv's executables first (Flower spawns
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), no update check."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"FLWR_HOME": str(Path(home).resolve()), "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    return env


def register_node(public_key: Path, *, env: Mapping[str, str]) -> int:
    """Register a SuperNode's public key with the SuperLink; return its node id."""
    out = subprocess.run([flower_exe("flwr"), "supernode", "register", str(Path(public_key).resolve()), CONNECTION,
                          "--format", "json"], env=dict(env), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"registering {public_key} failed: {(out.stdout + out.stderr).strip()[-800:]}")
    return int(_json(out.stdout)["node-id"])


def cli_value(value: Any) -> str:
    """A value as Flower's CLI reads ``key=value`` (``--run-config``, ``--federation-config``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def run_app(app_dir: Path, *, env: Mapping[str, str], run_config: Mapping[str, Any],
            timeout: float = 3600) -> tuple[int, str]:
    """``flwr run APP_DIR fedpgen --stream``; return (run id, output). Raises when the run did not
    finish as ``completed`` (``--stream`` alone exits 0 on a failed ServerApp)."""
    cfg = " ".join(f"{k}={cli_value(v)}" for k, v in run_config.items())
    cmd = [flower_exe("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
    if cfg:
        cmd += ["--run-config", cfg]
    out = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    found = re.search(r"Successfully started run (\d+)", text)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"flwr run failed (exit {out.returncode}): {text.strip()[-1500:]}")
    run_id = int(found.group(1))
    status = run_status(run_id, env=env)
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} ended {status!r}: {text.strip()[-1500:]}")
    return run_id, text


def run_status(run_id: int, *, env: Mapping[str, str]) -> str:
    out = subprocess.run([flower_exe("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                         env=dict(env), capture_output=True, text=True, timeout=120)
    return str(_json(out.stdout)["runs"][0]["status"])


def _json(text: str) -> dict[str, Any]:
    return json.loads(text[text.index("{"):])
