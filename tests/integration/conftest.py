"""Integration tier: one real ComfyUI server per test session (skipped without COMFYUI_ROOT)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfy_server import ComfyServer, free_port


def comfyui_root() -> Path:
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        pytest.skip("integration tests need COMFYUI_ROOT pointing at a ComfyUI v0.19.3 checkout (see README)")
    path = Path(root)
    if not (path / "main.py").is_file():
        pytest.skip(f"COMFYUI_ROOT={root} has no main.py: point it at a ComfyUI checkout")
    return path


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    server = ComfyServer(root=comfyui_root(), work=tmp_path_factory.mktemp("comfyui"), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
