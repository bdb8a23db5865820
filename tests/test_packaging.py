"""One import namespace (``fedpgen.server``, ``fedpgen.client``, ``fedpgen.shared``) that resolves to
this repository and shadows nothing; pyproject is the config schema."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedpgen.shared.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_the_namespaced_packages_resolve_to_this_repository() -> None:
    for folder in ("server", "client", "shared", "fedpgen"):
        name = folder if folder == "fedpgen" else f"fedpgen.{folder}"
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == ROOT / folder, f"{name} is shadowed by {module.__file__}"


def test_other_packages_named_server_client_shared_neither_break_nor_are_broken(tmp_path: Path) -> None:
    # Prepare: someone else's top-level `server`, `client` and `shared`, first on the path
    for name in ("server", "client", "shared"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'other-{name}'\n")
    code = """
import server, client, shared
from fedpgen.server.app import app as server_app
from fedpgen.client.app import app as client_app
from fedpgen.shared.config import RunConfig
import fedpgen.server, fedpgen.shared
assert (server.OWNER, client.OWNER, shared.OWNER) == ("other-server", "other-client", "other-shared")
assert fedpgen.server.__file__.endswith("server/__init__.py") and not hasattr(fedpgen.server, "OWNER")
print(type(server_app).__name__, type(client_app).__name__, RunConfig.from_mapping({}).task)
"""
    # Execute: from a folder that is not the repository
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=300, check=False)
    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ServerApp", "ClientApp", "text"]


def test_no_generic_top_level_package_is_installed(tmp_path: Path) -> None:
    # Flower's Ray backend exports its sys.path as PYTHONPATH (a source checkout's root, where
    # the folders are): a process started afterwards would find them there, not installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import server"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False, env=env)
    assert proc.returncode != 0 and "No module named 'server'" in proc.stderr, proc.stderr


def test_pyproject_declares_the_flower_app_and_every_config_key() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = data["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedpgen.server.app:app", "clientapp": "fedpgen.client.app:app"}
    keys = {k.replace("-", "_") for k in app["config"]}
    assert keys == {f.name for f in dataclasses.fields(RunConfig)}
    assert data["project"]["scripts"]["fedpgen"] == "fedpgen.cli:main"
    setuptools = data["tool"]["setuptools"]
    assert not {p for p in setuptools["packages"] if p.split(".")[0] != "fedpgen"}, "a top-level package besides fedpgen"
    assert setuptools["package-dir"] == {f"fedpgen.{d}": d for d in ("server", "client", "shared")}


def test_every_package_folder_is_declared_for_non_editable_installs() -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {("" if top == "fedpgen" else "fedpgen.") + str(p.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("fedpgen", "server", "client", "shared") for p in (ROOT / top).rglob("__init__.py")}
    assert found == declared, f"undeclared: {sorted(found - declared)}, stale: {sorted(declared - found)}"


def test_a_built_wheel_ships_the_plays_under_the_namespace_only(tmp_path: Path) -> None:
    # Prepare / Execute: a wheel as `pip install .` builds it, installed apart from the source tree
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True,
                           timeout=600, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("fedpgen-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("fedpgen-")}
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import fedpgen.shared.data.shakespeare as s, sys; users = s.users(num_users=3, min_bytes=1000); "
            "print(s.__file__.startswith(sys.argv[1]), len(s.play_texts()), len(users), 'shksprdata' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                          capture_output=True, text=True, timeout=300, check=False)
    # Assert: one top-level package; the 42 plays come from the installed wheel, not another package
    assert tops == {"fedpgen"}, tops
    assert "fedpgen/shared/data/plays.tar.xz" in names
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "42", "3", "False"]


@pytest.mark.parametrize("pythonpath", ["", "root"])  # root: the checkout on the path, as Flower's Ray backend exports it
def test_a_code_only_copy_of_the_app_finds_the_plays_of_the_installed_package(tmp_path: Path, pythonpath: str) -> None:
    # Prepare: what Flower's FAB holds (only .py/.toml/.md files: no plays.tar.xz), as under `flwr run`
    app = tmp_path / "fab"
    for folder in ("fedpgen", "server", "client", "shared"):
        for f in (ROOT / folder).rglob("*.py"):
            dest = app / f.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    (app / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    assert not (app / "shared" / "data" / "plays.tar.xz").exists()
    code = ("import fedpgen.shared.data.shakespeare as s, sys; "
            "print(s.__file__.startswith(sys.argv[1]), len(s.play_texts()), s.archive() == s.ARCHIVE)")
    # Execute: the copy's modules, this environment's installed fedpgen distribution
    proc = subprocess.run([sys.executable, "-c", code, str(app)], cwd=app, capture_output=True, text=True,
                          timeout=300, check=False, env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                                         **({"PYTHONPATH": str(ROOT)} if pythonpath else {})})
    # Assert: the copy's code ran, with the 42 plays found outside it
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "42", "False"]
