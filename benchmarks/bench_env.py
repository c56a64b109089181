"""Environment set-up shared by the benchmark scripts (never imported by the pack itself).

Benchmarks run as plain scripts on bare GPU machines, so they need two things the pack never
does: the repository folder importable under a fixed package name, and ComfyUI importable
where PyAV (which ``comfy_api.latest`` imports for its video types) is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterable
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


def run_isolated_cases(
    script: str, cases: Iterable[str], env: dict[str, str], cwd: str | None = None, timeout: float = 600
) -> dict[str, dict]:
    """Run ``python <script> <case>`` for each case in a process of its own and collect the results.

    For probes whose cases may abort the process (a failed CUDA-graph capture): each case prints
    one ``RESULT <json>`` line; per case this returns the return code (negative: killed by a
    signal), that result (None when it never came) and the telling lines of its stderr.
    """
    log = logging.getLogger(Path(script).stem)
    results: dict[str, dict] = {}
    for case in cases:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(script), case],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        lines = proc.stderr.strip().splitlines()
        keys = ("terminate", "what()", "error", "Error", "Aborted", "warn", 'File "')
        tail = [x for x in lines if any(k in x for k in keys)][:16] + lines[-2:]
        results[case] = {"rc": proc.returncode, "result": json.loads(line[7:]) if line else None, "stderr": tail}
        log.info("%-32s rc=%-4d %s", case, proc.returncode, line[7:] if line else " | ".join(tail))
    return results


def server_with_assets(server_cls, root: Path, work: Path, assets: Path, folders: Iterable[str], port: int, **kwargs):
    """A ComfyServer (``server_cls``, not started) whose model ``folders`` link to ``assets``
    (so large random-weight models are built once and shared by every server of a run)."""
    server = server_cls(root=root, work=work, port=port, **kwargs)
    server.models_dir.mkdir(parents=True, exist_ok=True)
    for name in folders:
        (assets / name).mkdir(parents=True, exist_ok=True)
        (server.models_dir / name).symlink_to(assets / name, target_is_directory=True)
    return server


def run_header(server_args: str, **extra) -> dict:
    """The first keys of a server benchmark's results: the GPU, the server's arguments, torch."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "server_args": server_args or "(ComfyUI defaults)", "torch": torch.__version__, **extra}
