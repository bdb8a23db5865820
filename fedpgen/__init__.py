"""FedPGen: federated, privacy-preserving personalized generation.

One import namespace for the whole project. The repository keeps the requested layout —
``server/``, ``client/`` and ``shared/`` beside ``fedpgen/`` — but those generic names are never
top-level packages: they import as ``fedpgen.server``, ``fedpgen.client`` and
``fedpgen.shared``. An install maps them into this package (``[tool.setuptools.package-dir]``);
run from a source tree that is not installed (Flower's copy of the app, a fresh clone), the
folders beside this one are added to the package's search path, so the names resolve the same.
"""

from __future__ import annotations

from pathlib import Path as _Path

_SOURCE_ROOT = _Path(__file__).resolve().parent.parent
if all((_SOURCE_ROOT / part / "__init__.py").is_file() for part in ("server", "client", "shared")) \
        and (_SOURCE_ROOT / "pyproject.toml").is_file():
    __path__.append(str(_SOURCE_ROOT))  # noqa: F821 (a package's __path__)
