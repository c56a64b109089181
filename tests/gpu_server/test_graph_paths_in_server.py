"""USDU's fast paths under every server setting: the default path (fully loaded model, CUDA
graphs, automatic batch size: one tile per call under graphs) against the plain path (one tile
per sampler call, no graphs) on a full-size SDXL checkpoint, same seed.

In every setting, ComfyUI's defaults (cudaMallocAsync) included, the graphs must be recorded and
replayed (behind the checked run) and give the plain path's picture (max |diff| <= 1e-3), and
the server must survive (the session fixture also fails on fatal lines in its log).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from server_cases import make_photo
from test_example_workflows_in_server import SDXL_NAME, sdxl_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gpu


def usdu_prompt(image: str, save: str, **extra) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a sharp photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {
            "class_type": "SpeedKit_UltimateSDUpscaleNoUpscale",
            "inputs": {
                "upscaled_image": ["4", 0],
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "vae": ["1", 2],
                "seed": 7,
                "steps": 3,
                "denoise": 0.3,
                "tile_width": 512,
                "tile_height": 512,
                **extra,
            },
        },
        "9": {"class_type": "SpeedKitProbe_ImageSink", "inputs": {"image": ["6", 0], "save_name": save}},
    }


def test_usdu_default_path_matches_plain_path(gpu_server, sdxl_checkpoint):  # noqa: F811
    Image.fromarray(make_photo(1024, 1024)).save(gpu_server.input_dir / "usdu_1024.png")
    tag = gpu_server.setting
    before = len(gpu_server.log_text())
    gpu_server.run_prompt(usdu_prompt("usdu_1024.png", f"fast_{tag}", cuda_graphs=True), 900)
    log = gpu_server.log_text()[before:]
    gpu_server.run_prompt(usdu_prompt("usdu_1024.png", f"plain_{tag}", cuda_graphs=False, batch_size=1), 900)
    probe = gpu_server.output_dir / "probe"
    fast = load_file(str(probe / f"fast_{tag}.safetensors"))["image"]
    plain = load_file(str(probe / f"plain_{tag}.safetensors"))["image"]
    assert fast.shape == plain.shape == (1, 1024, 1024, 3)
    assert torch.isfinite(fast).all()
    diff = (fast - plain).abs()
    # same tiles, same seeds, one tile per call on both paths: a replay runs the eager kernels
    assert float(diff.max()) <= 1e-3, (float(diff.mean()), float(diff.max()))
    assert "model loaded fully on the GPU" in log or tag == "disable-dynamic-vram" or "highvram" in tag, log[-3000:]
    assert "batch_size automatic: 1 tile(s) per sampler call" in log, log[-3000:]
    assert "CUDA graph(s)" in log and "capture failed" not in log, log[-3000:]
    assert gpu_server.alive()
