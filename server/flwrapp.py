"""The Flower app bundle (FAB) that ``dicomfl run`` submits: only a pyproject that names our
installed ServerApp and ClientApp. Sites run offline with the dicomfl package installed, so the
FAB carries no code and no dependencies to install."""

from __future__ import annotations

from pathlib import Path

from dicomfl.common import __version__

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dicomfl-app"
version = "{version}"
description = "dicomfl federation (the code is the installed dicomfl package)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "dicomfl"

[tool.flwr.app.components]
serverapp = "dicomfl.server.app:app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
run-yaml = ""
coordinator-yaml = ""
resume = false
evaluate-only = ""
"""


CLIENTAPP = "dicomfl.client.app:app"


def write_app(folder: Path, clientapp: str = CLIENTAPP) -> Path:
    """Write the FAB's pyproject into ``folder``; ``clientapp`` is the ClientApp the sites run
    (``module:attribute``, importable at the sites; the default is dicomfl's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(version=__version__, clientapp=clientapp))
    return folder
