"""The generic top-level packages resolve to this repository, and pyproject is the config schema."""

from __future__ import annotations

import dataclasses
import importlib
import tomllib
from pathlib import Path

from shared.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_packages_resolve_to_this_repository() -> None:
    for name in ("server", "client", "shared", "fedpgen"):
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == ROOT / name, f"{name} is shadowed by {module.__file__}"


def test_pyproject_declares_the_flower_app_and_every_config_key() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = data["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    keys = {k.replace("-", "_") for k in app["config"]}
    assert keys == {f.name for f in dataclasses.fields(RunConfig)}
    assert data["project"]["scripts"]["fedpgen"] == "fedpgen.cli:main"
    assert set(data["tool"]["setuptools"]["packages"]) >= {"server", "client", "shared", "fedpgen"}


def test_every_package_folder_is_declared_for_non_editable_installs() -> None:
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".") for top in ("fedpgen", "server", "client", "shared")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found == declared, f"undeclared: {sorted(found - declared)}, stale: {sorted(declared - found)}"
