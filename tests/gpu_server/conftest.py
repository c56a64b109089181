"""GPU server tier: a real ComfyUI server on the GPU, driven through its HTTP API.

Every test runs once per server setting (:data:`SETTINGS`): ComfyUI's defaults (on NVIDIA:
dynamic VRAM and cudaMallocAsync), ``--highvram``, ``--disable-dynamic-vram`` and
``--disable-cuda-malloc``. Tests are grouped by setting, so each server starts once.

Skipped cleanly without a CUDA GPU or without ``COMFYUI_ROOT``. Model files: the real
Real-ESRGAN weights from ``SPEEDKIT_TEST_MODELS`` / ``../shared/models`` where present, the
realesr-animevideov3 weights bundled with the pack, and random-weight checkpoints of real
architectures built on first use (tiny SD1.5; full-size SDXL for the example workflows, cached
in ``SPEEDKIT_GPU_ASSETS`` or the session's temporary folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from server_cases import (
    BUNDLED_ANIME,
    PROBE_NODES,
    SETTINGS,
    TINY_CKPT,
    TINY_UPSCALER,
    comfyui_root_for_gpu,
    make_photo,
)
from tiny_models import build_models

from comfy_server import REPO_ROOT, ComfyServer, free_port


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Write each test's time and any failure's reason the moment it ends.

    GPU runs are cut by a wall-clock limit; pytest's own summary comes only at the end, so a
    cut run used to show which tests failed but never why.
    """
    outcome = yield
    report = outcome.get_result()
    terminal = item.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None or (report.when != "call" and not report.failed):
        return
    terminal.write_line(f"[{report.when} {report.outcome} in {report.duration:.1f} s] {item.nodeid}")
    if report.failed:
        terminal.write_line(report.longreprtext[-6000:])


@pytest.fixture(scope="session")
def gpu_assets(tmp_path_factory) -> Path:
    """Model and input folders shared by every server of the session."""
    root = comfyui_root_for_gpu()
    assets = Path(os.environ.get("SPEEDKIT_GPU_ASSETS") or tmp_path_factory.mktemp("gpu_assets"))
    ups, ckpts, inputs = assets / "upscale_models", assets / "checkpoints", assets / "input"
    for d in (ups, ckpts, inputs):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUNDLED_ANIME, ups / BUNDLED_ANIME.name)
    shared = Path(os.environ.get("SPEEDKIT_TEST_MODELS") or REPO_ROOT.parent / "shared" / "models")
    if (shared / "RealESRGAN_x4plus.safetensors").is_file():
        shutil.copyfile(shared / "RealESRGAN_x4plus.safetensors", ups / "RealESRGAN_x4plus.safetensors")
    if not (ckpts / TINY_CKPT).is_file():
        build_models(root, ckpts / TINY_CKPT, ups / TINY_UPSCALER)
    Image.fromarray(make_photo(540, 960)).save(inputs / "photo_540p.png")
    Image.fromarray(make_photo(540, 960, seed=1)).save(inputs / "photo_540p_b.png")
    Image.fromarray(make_photo(512, 512)).save(inputs / "example.png")
    return assets


@pytest.fixture(scope="session", params=list(SETTINGS))
def gpu_server(request, gpu_assets, tmp_path_factory) -> ComfyServer:
    """A ComfyUI server on the GPU under one of :data:`SETTINGS` (the test id names it)."""
    root = comfyui_root_for_gpu()
    work = tmp_path_factory.mktemp(f"server-{request.param}")
    server = ComfyServer(
        root=root,
        work=work,
        port=free_port(),
        cpu=False,
        extra_args=SETTINGS[request.param],
        extra_nodes=(PROBE_NODES,),
    )
    server.models_dir.mkdir(parents=True, exist_ok=True)
    for name in ("upscale_models", "checkpoints"):
        (server.models_dir / name).symlink_to(gpu_assets / name, target_is_directory=True)
    server.input_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(gpu_assets / "input", server.input_dir)
    server.setting = request.param
    server.start()
    try:
        yield server
    finally:
        alive = server.alive()
        server.stop()
        log = server.log_text()
        assert alive, f"ComfyUI ({request.param}) died during the tests:\n{log[-6000:]}"
        for fatal in ("Fatal Python error", "terminate called", "Segmentation fault", "core dumped"):
            assert fatal not in log, f"ComfyUI ({request.param}) logged {fatal!r}:\n{log[-6000:]}"
