"""Names, settings and inputs shared by the GPU server tier's fixtures and tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_server import REPO_ROOT

SETTINGS: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "highvram": ("--highvram",),
    "disable-dynamic-vram": ("--disable-dynamic-vram",),
    "disable-cuda-malloc": ("--disable-cuda-malloc",),
}
PROBE_NODES = REPO_ROOT / "tests" / "speedkit_probe_nodes"
BUNDLED_ANIME = REPO_ROOT / "upscale_cuda" / "models" / "realesr-animevideov3-x4.safetensors"
TINY_CKPT = "tiny_sd15.safetensors"
TINY_UPSCALER = "tiny_compact_x2.safetensors"


def comfyui_root_for_gpu() -> Path:
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not (Path(root) / "main.py").is_file():
        pytest.skip("the GPU server tier needs COMFYUI_ROOT pointing at a ComfyUI v0.19.3 checkout (see README)")
    if not torch.cuda.is_available():
        pytest.skip("the GPU server tier needs a CUDA GPU; this machine has none")
    return Path(root)


def make_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A real photograph (scikit-image's astronaut) resized to ``width x height``; a smooth
    synthetic picture where scikit-image is absent. uint8 HWC."""
    try:
        from skimage import data

        img = Image.fromarray(data.astronaut())
        if seed:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(img.resize((width, height), Image.Resampling.LANCZOS))
    except ImportError:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
        base = np.stack([np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in range(3)], -1)
        noise = rng.normal(0, 0.05, base.shape)
        return (np.clip(0.5 + 0.4 * base + noise, 0, 1) * 255).round().astype(np.uint8)
