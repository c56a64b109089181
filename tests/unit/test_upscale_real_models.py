"""The engine on real pretrained Real-ESRGAN weights (skipped when the files are absent:
set SPEEDKIT_TEST_MODELS to the folder holding them)."""

from __future__ import annotations

import math

import pytest
import torch
from spandrel import ModelLoader

from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler


def photo_like(h: int, w: int) -> torch.Tensor:
    """Smooth shading plus hard-edged blocks and mild noise (deterministic)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None, :]
    img = torch.stack(
        torch.broadcast_tensors(
            0.5 + 0.3 * torch.sin(7 * xx + 2 * yy), 0.5 + 0.3 * torch.cos(5 * yy), 0.4 + 0.2 * xx * yy
        ),
        -1,
    ).clone()
    for _ in range(10):
        y0, x0 = (int(v) for v in torch.randint(0, min(h, w) - 8, (2,), generator=g))
        img[y0 : y0 + 12, x0 : x0 + 20] = torch.rand(3, generator=g)
    return (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)[None]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def test_compact_real_weights_tiled_equals_whole_in_fp32(real_model_path, device):
    desc = ModelLoader().load_from_file(str(real_model_path("realesr-animevideov3-x4.safetensors"))).eval()
    images = photo_like(170, 200)
    whole, _ = Upscaler(desc, UpscaleOptions(precision="fp32"), device=device).upscale(images)
    # auto overlap for Compact-16 is 4 x 18 = 72 px, so the context covers the receptive field
    tiled, rep = Upscaler(desc, UpscaleOptions(precision="fp32", tile_size=144), device=device).upscale(images)
    assert "of 144x144, overlap 72" in rep.tile
    assert float((tiled - whole).abs().max()) <= 1e-5


def p9999(d: torch.Tensor) -> float:
    flat = d.flatten()
    return float(flat.topk(max(1, math.ceil(flat.numel() * 1e-4))).values.min())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["RealESRGAN_x4plus.safetensors", "realesr-animevideov3-x4.safetensors"])
def test_real_weights_fp16_faithful_to_fp32_whole_image(real_model_path, name):
    desc = ModelLoader().load_from_file(str(real_model_path(name))).eval()
    images = photo_like(256, 320)
    ref, _ = Upscaler(desc, UpscaleOptions(precision="fp32"), device="cuda").upscale(images)
    for opts in (UpscaleOptions(precision="fp16"), UpscaleOptions(precision="fp16", tile_size=128)):
        out, rep = Upscaler(desc, opts, device="cuda").upscale(images)
        d = (out - ref).abs()
        assert bool(torch.isfinite(out).all())
        assert float(d.mean()) <= 1e-3, (rep.tile, float(d.mean()))
        assert p9999(d) <= 0.02, (rep.tile, p9999(d))


def test_real_rrdb_6b_cpu_matches_spandrel_call(real_model_path):
    desc = ModelLoader().load_from_file(str(real_model_path("RealESRGAN_x4plus_anime_6B.safetensors"))).eval()
    images = photo_like(32, 40)
    want = desc(images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out, _ = Upscaler(desc, UpscaleOptions(precision="fp32"), device="cpu").upscale(images)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
