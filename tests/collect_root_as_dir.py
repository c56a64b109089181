"""pytest plugin (loaded with ``-p`` from pyproject): collect the repository root as a
plain directory.

The root holds the pack's ``__init__.py`` (ComfyUI imports the folder as a package), so
pytest would otherwise treat it as a test package and import it, running the ComfyUI
registration in the test process. Tests import the pack as ``speedkit`` instead (see
``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector):
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
