"""Environment set-up shared by the benchmark scripts (never imported by the pack itself).

Benchmarks run as plain scripts on bare GPU machines, so they need two things the pack never
does: the repository folder importable under a fixed package name, and ComfyUI importable
where PyAV (which ``comfy_api.latest`` imports for its video types) is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "speedkit"
PYAV_MODULES = (
    "av",
    "av.container",
    "av.subtitles",
    "av.subtitles.stream",
    "av.video",
    "av.video.frame",
    "av.audio",
    "av.audio.frame",
)


def register_pack() -> Path:
    """Make the repository importable as ``speedkit`` (as tests/conftest.py does); returns its path."""
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(REPO)]
        sys.modules[PACKAGE] = pkg
    return REPO


class _PyAVStandIn(types.ModuleType):
    """Any attribute is an inert class, enough for ComfyUI's type annotations at import time."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__module__": self.__name__})


def stub_pyav() -> None:
    """Register PyAV stand-ins when PyAV is missing (or ``SPEEDKIT_STUB_AV`` is set).

    The benchmarks never touch video; without this ``import comfy_api.latest`` fails there.
    """
    if importlib.util.find_spec("av") is not None and not os.environ.get("SPEEDKIT_STUB_AV"):
        return
    for name in PYAV_MODULES:
        sys.modules.setdefault(name, _PyAVStandIn(name))
