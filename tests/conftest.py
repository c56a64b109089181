"""Test setup shared by every tier.

The repository root is the pack itself (ComfyUI imports it as a package from its folder),
so tests import it under the fixed name ``speedkit``. The package object is registered
without running the root ``__init__`` (which would try to load the ComfyUI adapters);
tests that need the real ``__init__`` load it explicitly.
"""

from __future__ import annotations

import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "speedkit"

# musubi-tuner beside the integration tier's ComfyUI (tests/setup_comfyui.sh extracts both), for
# the tests that check commands against its real argparse and save code
_musubi = Path(os.environ.get("COMFYUI_ROOT", "/nonexistent")).parent / "musubi-tuner"
if not os.environ.get("MUSUBI_TUNER_ROOT") and (_musubi / "src" / "musubi_tuner").is_dir():
    os.environ["MUSUBI_TUNER_ROOT"] = str(_musubi)

if PACKAGE not in sys.modules:
    _pkg = types.ModuleType(PACKAGE)
    _pkg.__path__ = [str(REPO_ROOT)]
    _pkg.__file__ = str(REPO_ROOT / "__init__.py")
    sys.modules[PACKAGE] = _pkg


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "integration: needs a ComfyUI checkout in COMFYUI_ROOT")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    """Device under test: ``SPEEDKIT_TEST_DEVICE`` (default cpu)."""
    name = os.environ.get("SPEEDKIT_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"SPEEDKIT_TEST_DEVICE={name} but no CUDA device is available")
    return torch.device(name)


def shared_models_dir() -> Path | None:
    """Folder of the real pretrained test weights, or None when absent.

    ``SPEEDKIT_TEST_MODELS`` wins; otherwise ``../shared/models`` beside the checkout.
    """
    env = os.environ.get("SPEEDKIT_TEST_MODELS")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "models")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture
def real_model_path():
    """Returns a function name -> path of a real weight file, skipping the test when absent."""

    def _get(filename: str) -> Path:
        folder = shared_models_dir()
        if folder is None or not (folder / filename).is_file():
            pytest.skip(f"{filename} not found: set SPEEDKIT_TEST_MODELS to the folder holding it")
        return folder / filename

    return _get
