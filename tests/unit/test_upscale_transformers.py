"""The upscaler engine on attention/transformer and other non-ESRGAN spandrel architectures
(HAT, DAT, OmniSR, RGT, DRCT, ATD, Swin2SR, SAFMN, PLKSR), each in small random-weight
variants built from spandrel's own classes and re-detected from their state dicts.

Checked per variant: whole-frame output = spandrel's own call (size requirements padded and
cropped), tiled output close to whole-frame output within a bound set by how far the
architecture sees (local convs exact; window attention nearly exact; global pooling or
attention only close), tiles honour ``multiple_of``, and the precision choice follows
spandrel's ``supports_half`` / ``supports_bfloat16`` (bf16 really runs).
"""

from __future__ import annotations

import functools

import pytest
import torch
from spandrel import ImageModelDescriptor, ModelLoader
from spandrel.architectures.ATD import ATD
from spandrel.architectures.DAT import DAT
from spandrel.architectures.DRCT import DRCT
from spandrel.architectures.HAT import HAT
from spandrel.architectures.OmniSR import OmniSR
from spandrel.architectures.PLKSR import PLKSR
from spandrel.architectures.RGT import RGT
from spandrel.architectures.SAFMN import SAFMN
from spandrel.architectures.Swin2SR import Swin2SR

from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler

# How close a tiled result must be to the whole-frame one (mean, 99th percentile of |diff|),
# with 32 px tiles and 16 px overlap (8 px of context per side) on random weights, about 2-3x
# what this seed measures (the measured value in brackets), so that a worse tiling fails:
# 16 px tiles with 4 px overlap give means of 3e-3 .. 4e-2 for the same models.
# - "local": a CNN whose receptive field fits in the context: equal up to float rounding
#   (PLKSR 9e-8);
# - "window": window attention whose windows line up with the tile grid, plus averaged
#   channel statistics (HAT, DAT: 9e-6, q99 2.3e-4);
# - "attention": shifted/rectangular windows or token categories wider than the context
#   (RGT, ATD, Swin2SR: up to 6.1e-4, q99 5.7e-3);
# - "global": pooling or grid attention across the whole image, dense window stacks
#   (OmniSR, SAFMN, DRCT: up to 2.7e-3, q99 6.1e-2).
TOLERANCE = {
    "local": (1e-6, 1e-5),
    "window": (3e-5, 1e-3),
    "attention": (2e-3, 1.5e-2),
    "global": (6e-3, 0.12),
}

VARIANTS = {
    "hat_x2_w8": (
        lambda: HAT(
            upscale=2, embed_dim=12, depths=[2], num_heads=[2], window_size=8, compress_ratio=3,
            squeeze_factor=4, mlp_ratio=2.0, num_feat=8, img_size=32,
        ),
        "window",
    ),
    "hat_x4_w4_two_groups": (
        lambda: HAT(
            upscale=4, embed_dim=12, depths=[1, 1], num_heads=[3, 3], window_size=4, compress_ratio=2,
            squeeze_factor=3, mlp_ratio=1.0, num_feat=8, img_size=16,
        ),
        "window",
    ),
    "dat_x2_split2x4": (
        lambda: DAT(upscale=2, embed_dim=16, split_size=[2, 4], depth=[2], num_heads=[2], expansion_factor=2.0),
        "window",
    ),
    "dat_x3_split4x8": (
        lambda: DAT(
            upscale=3, embed_dim=16, split_size=[4, 8], depth=[3], num_heads=[4], expansion_factor=1.0, img_size=32
        ),
        "window",
    ),
    "omnisr_x2_w8": (lambda: OmniSR(num_feat=8, block_num=1, window_size=8, res_num=1, up_scale=2), "global"),
    "omnisr_x4_w4_nope": (
        lambda: OmniSR(num_feat=8, block_num=2, window_size=4, res_num=1, up_scale=4, pe=False),
        "global",
    ),
    "rgt_x2": (
        lambda: RGT(upscale=2, embed_dim=12, depth=[2], num_heads=[2], mlp_ratio=2.0, split_size=[4, 8], img_size=32),
        "attention",
    ),
    "drct_x2_w8": (
        lambda: DRCT(
            upscale=2, embed_dim=12, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2.0, gc=8,
            upsampler="pixelshuffle", img_size=32,
        ),
        "global",
    ),
    "atd_x2_w8": (
        lambda: ATD(
            upscale=2, embed_dim=12, depths=[2], num_heads=[2], window_size=8, category_size=32, num_tokens=8,
            reducted_dim=4, mlp_ratio=1.0, upsampler="pixelshuffledirect", img_size=32,
        ),
        "attention",
    ),
    "swin2sr_x2_w8": (
        lambda: Swin2SR(
            upscale=2, embed_dim=12, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2.0,
            upsampler="pixelshuffledirect", img_size=32,
        ),
        "attention",
    ),
    "safmn_x2": (lambda: SAFMN(dim=8, n_blocks=2, upscaling_factor=2), "global"),
    "plksr_x2_k9": (lambda: PLKSR(dim=8, n_blocks=2, upscaling_factor=2, kernel_size=9), "local"),
}  # fmt: skip


@functools.cache
def load(name: str) -> ImageModelDescriptor:
    torch.manual_seed(0)
    net = VARIANTS[name][0]()
    desc = ModelLoader().load_from_state_dict(net.state_dict())
    assert isinstance(desc, ImageModelDescriptor)
    assert type(desc.model) is type(net)  # spandrel re-detected the architecture we built
    return desc.eval()


def reference(desc: ImageModelDescriptor, images: torch.Tensor) -> torch.Tensor:
    """spandrel's own whole-image fp32 call (pads to its size requirements, crops), clamped."""
    with torch.inference_mode():
        return desc(images.permute(0, 3, 1, 2).float()).clamp(0, 1).permute(0, 2, 3, 1)


def fp32(**kw) -> UpscaleOptions:
    return UpscaleOptions(precision="fp32", **kw)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_whole_frame_and_tiles_match_spandrel(name, device):
    desc = load(name)
    req, s = desc.size_requirements, desc.scale
    torch.manual_seed(1)
    # Sides that are neither window nor multiple_of multiples, one below the usual minimum of
    # 16: the padding must be added and cropped again.
    odd = torch.rand(1, 13, 19, 3)
    out, rep = Upscaler(desc, fp32(), device=device).upscale(odd)
    assert rep.tile == "whole frame" and out.shape == (1, 13 * s, 19 * s, 3)
    # fp32 on CUDA vs spandrel on the CPU: ATD's token-dictionary softmax amplifies the
    # kernels' rounding differences (5.4e-4 measured on an H100); the rest agree to 5e-5.
    atol = 1e-3 if str(device).startswith("cuda") and name.startswith("atd") else 5e-5
    torch.testing.assert_close(out, reference(desc, odd), atol=atol, rtol=0)

    images = torch.rand(1, 40, 48, 3)
    whole = reference(desc, images)
    tiled, rep = Upscaler(desc, fp32(tile_size=32, overlap=16), device=device).upscale(images)
    # Really tiled, with the tile asked for (32 is a multiple of every requirement here).
    assert int(rep.tile.split(" of ")[0]) >= 4 and "of 32x32" in rep.tile, rep.tile
    inside = float(((whole > 0) & (whole < 1)).float().mean())
    assert inside > 0.4, f"random weights saturate {1 - inside:.0%} of the pixels; the comparison would be blind"
    diff = (tiled - whole).abs().flatten()
    mean_tol, q99_tol = TOLERANCE[VARIANTS[name][1]]
    assert float(diff.mean()) <= mean_tol, (float(diff.mean()), mean_tol)
    assert float(diff.quantile(0.99)) <= q99_tol, (float(diff.quantile(0.99)), q99_tol)
    assert req.minimum <= 32 and 32 % req.multiple_of == 0


@pytest.mark.parametrize("name", ["drct_x2_w8", "safmn_x2"])
def test_tile_size_is_rounded_to_multiple_of(name, device):
    desc = load(name)
    m = desc.size_requirements.multiple_of
    assert m in (8, 16)
    images = torch.rand(1, 37, 45, 3)
    out, rep = Upscaler(desc, fp32(tile_size=m * 2 + 5, overlap=m), device=device).upscale(images)
    assert f"of {2 * m}x{2 * m}" in rep.tile, rep.tile
    assert out.shape == (1, 37 * desc.scale, 45 * desc.scale, 3)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_precision_choice_follows_spandrel_flags(name):
    desc = load(name)
    cpu = torch.device("cpu")
    if desc.supports_half:
        assert Upscaler(desc, UpscaleOptions(precision="fp16"), device=cpu).dtype is torch.float16
    else:
        with pytest.raises(ValueError, match="does not support fp16"):
            Upscaler(desc, UpscaleOptions(precision="fp16"), device=cpu)
    assert desc.supports_bfloat16
    assert Upscaler(desc, UpscaleOptions(precision="bf16"), device=cpu).dtype is torch.bfloat16
    assert Upscaler(desc, UpscaleOptions(precision="auto"), device=cpu).dtype is torch.float32


# Swin2SR, DRCT and ATD build their attention mask in fp32 for sizes other than img_size
# (the engine then runs them under autocast); HAT, DAT and OmniSR run bf16 directly.
@pytest.mark.parametrize(
    "name", ["swin2sr_x2_w8", "drct_x2_w8", "atd_x2_w8", "hat_x2_w8", "dat_x2_split2x4", "omnisr_x2_w8"]
)
def test_bf16_really_runs_and_is_close_to_fp32(name):
    desc = load(name)
    cpu = torch.device("cpu")
    images = torch.rand(1, 24, 40, 3)
    out, rep = Upscaler(desc, UpscaleOptions(precision="bf16"), device=cpu).upscale(images)
    assert rep.precision == "bf16" and bool(torch.isfinite(out).all())
    assert float((out - reference(desc, images)).abs().mean()) <= 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_auto_precision_on_gpu_per_arch_runs(name):
    desc = load(name)
    up = Upscaler(desc, UpscaleOptions(), device="cuda")
    assert up.dtype is (torch.float16 if desc.supports_half else torch.bfloat16)
    images = torch.rand(1, 40, 56, 3)
    out, _ = up.upscale(images)
    assert bool(torch.isfinite(out).all())
    assert float((out - reference(desc, images)).abs().mean()) <= 5e-3


def test_dtype_mismatch_inside_a_half_capable_model_switches_to_autocast(caplog):
    """An arch flagged fp16-capable that still mixes dtypes inside is retried under
    autocast (with a log line) instead of failing the run."""
    swin = load("swin2sr_x2_w8")
    flagged = ImageModelDescriptor(
        swin.model,
        swin.model.state_dict(),
        swin.architecture,
        purpose="SR",
        tags=[],
        supports_half=True,  # a wrong flag: the engine must cope
        supports_bfloat16=True,
        scale=swin.scale,
        input_channels=3,
        output_channels=3,
        size_requirements=swin.size_requirements,
    )
    images = torch.rand(1, 24, 40, 3)
    with caplog.at_level("WARNING"):
        out, rep = Upscaler(flagged, UpscaleOptions(precision="bf16"), device="cpu").upscale(images)
    assert "mixes dtypes" in caplog.text and "autocast" in caplog.text
    assert rep.precision == "bf16" and bool(torch.isfinite(out).all())
    assert float((out - reference(swin, images)).abs().mean()) <= 5e-3
