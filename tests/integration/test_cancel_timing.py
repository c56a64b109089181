"""Cancel within 2 s for every long node, measured through a real ComfyUI server (CPU).

Each case queues a job that would run for minutes, waits until the node is inside its long
loop, presses Cancel (``POST /interrupt``) and takes the time from the press to the server's
own ``execution_interrupted`` message (its millisecond timestamp, same machine clock). Every
case also checks that nothing was left under a final output name and that the server is alive.
The cases are shared with the GPU server tier (``tests/cancel_helpers.py``); :data:`JOBS`
sizes them for the CPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from cancel_helpers import CASES, CancelJobs
from PIL import Image
from tiny_models import build_models

from comfy_server import REPO_ROOT, ComfyServer, free_port

pytestmark = pytest.mark.integration

CKPT = "cancel_tiny_sd15.safetensors"
UPSCALER = "cancel_tiny_compact_x2.safetensors"
ANIME = "cancel_anime_x4.safetensors"
EMBEDDED = REPO_ROOT / "upscale_cuda" / "models" / "realesr-animevideov3-x4.safetensors"
PICTURE = "cancel_256.png"
JOBS = CancelJobs(
    ckpt=CKPT,
    upscaler=UPSCALER,
    batch_upscaler=ANIME,
    picture=PICTURE,
    frames=30,
    usdu={"steps": 400, "denoise": 0.5, "tile_width": 64, "tile_height": 64, "seed": 3},
    latent=(256, 4),
    sampler_steps=5000,
    train_steps=100000,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own (interrupted runs leave tracebacks in its log, which the shared
    server's log checks would take for the pack's errors), with a tiny SD1.5 checkpoint,
    upscalers and an input picture."""
    from conftest import comfyui_root

    comfy = ComfyServer(root=comfyui_root(), work=tmp_path_factory.mktemp("cancel_server"), port=free_port())
    build_models(comfy.root, comfy.models_dir / "checkpoints" / CKPT, comfy.models_dir / "upscale_models" / UPSCALER)
    shutil.copyfile(EMBEDDED, comfy.models_dir / "upscale_models" / ANIME)
    comfy.input_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(comfy.input_dir / PICTURE)
    comfy.start()
    try:
        yield comfy
    finally:
        comfy.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_cancels_within_2s(server, tmp_path, case):
    CASES[case](server, tmp_path, JOBS)
