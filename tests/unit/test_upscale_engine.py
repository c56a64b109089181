"""The CUDA upscaler engine on random-weight spandrel models (CPU by default;
``SPEEDKIT_TEST_DEVICE=cuda`` runs the same tests on a GPU, ``gpu`` tests need one)."""

from __future__ import annotations

import logging

import pytest
import torch
from spandrel import ImageModelDescriptor, ModelLoader, ModelTiling, SizeRequirements
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SPAN import SPAN
from spandrel.architectures.SwinIR import SwinIR

from speedkit.upscale_cuda.cache import ModelCache, model_fingerprint
from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler, model_traits

# -- random-weight models, re-detected by spandrel from their state dicts ------------------

ARCHES = {
    "esrgan_x4_nf16_nb2": lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=4),
    "esrgan_x2plus_nf8_nb1": lambda: ESRGAN(in_nc=12, out_nc=3, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2),
    "compact_x4_nc4": lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4),
    "compact_x2_nc8": lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=8, upscale=2),
    "span_x2_f16": lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2),
    "swinir_x2_tiny": lambda: SwinIR(
        upscale=2,
        in_chans=3,
        img_size=32,
        window_size=8,
        img_range=1.0,
        depths=[2],
        embed_dim=12,
        num_heads=[2],
        mlp_ratio=2,
        upsampler="pixelshuffledirect",
        resi_connection="1conv",
    ),
}


def load(name: str, seed: int = 0) -> ImageModelDescriptor:
    torch.manual_seed(seed)
    net = ARCHES[name]()
    desc = ModelLoader().load_from_state_dict(net.state_dict())
    assert isinstance(desc, ImageModelDescriptor)
    return desc.eval()


def reference(desc: ImageModelDescriptor, images: torch.Tensor) -> torch.Tensor:
    """spandrel's own whole-image call, frame by frame, fp32 on CPU (the contract)."""
    outs = [desc(images[i : i + 1].permute(0, 3, 1, 2).float()) for i in range(images.shape[0])]
    return torch.cat(outs).permute(0, 2, 3, 1)


def fp32_options(**kw) -> UpscaleOptions:
    return UpscaleOptions(precision="fp32", **kw)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# -- whole image = spandrel's call ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHES))
def test_whole_frame_matches_spandrel_call(name, device):
    desc = load(name)
    images = torch.rand(2, 24, 40, 3)
    want = reference(desc, images)
    out, report = Upscaler(desc, fp32_options(), device=device).upscale(images)
    assert out.shape == want.shape == (2, 24 * desc.scale, 40 * desc.scale, 3)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert report.tile == "whole frame"
    torch.testing.assert_close(out, want, atol=2e-5, rtol=0)


# -- tiles = whole image -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["compact_x4_nc4", "compact_x2_nc8", "span_x2_f16"])
def test_tiled_equals_whole_for_local_cnns(name, device):
    desc = load(name)
    rf = model_traits(desc).receptive_field
    assert rf is not None and rf > 0
    images = torch.rand(1, 8 * rf + 12, 8 * rf + 30, 3)  # just over one tile: 4 tiles
    whole, _ = Upscaler(desc, fp32_options(), device=device).upscale(images)
    tiled, report = Upscaler(desc, fp32_options(tile_size=8 * rf, overlap=4 * rf), device=device).upscale(images)
    assert "of" in report.tile, report.tile  # really tiled
    assert float((tiled - whole).abs().max()) <= 1e-5


def test_tiled_rrdb_close_to_whole(device):
    desc = load("esrgan_x4_nf16_nb2")
    images = torch.rand(1, 60, 100, 3)
    whole, _ = Upscaler(desc, fp32_options(), device=device).upscale(images)
    tiled, report = Upscaler(desc, fp32_options(tile_size=48, overlap=24), device=device).upscale(images)
    assert "of 48x48" in report.tile
    assert float((tiled - whole).abs().mean()) <= 1e-4
    assert float((tiled - whole).abs().max()) <= 5e-3


def test_tiling_without_context_differs_which_is_why_overlap_matters(device):
    desc = load("compact_x2_nc8")
    images = torch.rand(1, 64, 64, 3)
    whole, _ = Upscaler(desc, fp32_options(), device=device).upscale(images)
    tiled, _ = Upscaler(desc, fp32_options(tile_size=32, overlap=0), device=device).upscale(images)
    assert float((tiled - whole).abs().max()) > 1e-5  # the bound the exact tests use


def test_batched_tiles_and_frames_equal_unbatched(device):
    desc = load("compact_x4_nc4")
    images = torch.rand(3, 40, 56, 3)
    one, _ = Upscaler(desc, fp32_options(tile_size=32, overlap=16, batch_size=1), device=device).upscale(images)
    many, rep = Upscaler(desc, fp32_options(tile_size=32, overlap=16, batch_size=5), device=device).upscale(images)
    assert rep.batch == 5
    torch.testing.assert_close(many, one, atol=2e-6, rtol=0)
    frames, rep = Upscaler(desc, fp32_options(batch_size=2), device=device).upscale(images)
    assert rep.batch == 2
    torch.testing.assert_close(frames, reference(desc, images), atol=2e-5, rtol=0)


# -- size requirements ---------------------------------------------------------------------


def test_multiple_of_requirement_is_met_and_cropped(device):
    desc = load("esrgan_x2plus_nf8_nb1")
    assert desc.scale == 2 and desc.size_requirements.multiple_of == 4
    images = torch.rand(1, 37, 53, 3)  # neither side a multiple of 4
    out, _ = Upscaler(desc, fp32_options(), device=device).upscale(images)
    assert out.shape == (1, 74, 106, 3)
    torch.testing.assert_close(out, reference(desc, images), atol=2e-5, rtol=0)
    tiled, rep = Upscaler(desc, fp32_options(tile_size=22, overlap=8), device=device).upscale(images)
    assert "of 20x20" in rep.tile  # tile rounded down to a multiple of 4
    assert tiled.shape == out.shape


def test_minimum_size_requirement_pads_small_images(device):
    desc = load("swinir_x2_tiny")
    assert desc.size_requirements.minimum >= 16
    images = torch.rand(1, 9, 13, 3)
    out, _ = Upscaler(desc, fp32_options(), device=device).upscale(images)
    assert out.shape == (1, 18, 26, 3)
    torch.testing.assert_close(out, reference(desc, images), atol=5e-5, rtol=0)


def test_tile_below_arch_minimum_is_an_error(device):
    desc = load("swinir_x2_tiny")
    with pytest.raises(ValueError, match=r"tile_size: 8 is below the minimum 16"):
        Upscaler(desc, fp32_options(tile_size=8), device=device).upscale(torch.rand(1, 40, 40, 3))


def test_internal_tiling_model_is_never_tiled(device):
    desc = load("compact_x2_nc8")
    internal = ImageModelDescriptor(
        desc.model,
        desc.model.state_dict(),
        desc.architecture,
        purpose="SR",
        tags=[],
        supports_half=True,
        supports_bfloat16=True,
        scale=2,
        input_channels=3,
        output_channels=3,
        size_requirements=SizeRequirements(),
        tiling=ModelTiling.INTERNAL,
    )
    out, rep = Upscaler(internal, fp32_options(tile_size=16), device=device).upscale(torch.rand(1, 40, 40, 3))
    assert rep.tile == "whole frame" and out.shape == (1, 80, 80, 3)


# -- precision -----------------------------------------------------------------------------


def test_precision_choice_follows_the_architecture():
    cpu = torch.device("cpu")
    swin = load("swinir_x2_tiny")
    assert swin.supports_half is False
    with pytest.raises(ValueError, match="precision: this architecture does not support fp16"):
        Upscaler(swin, UpscaleOptions(precision="fp16"), device=cpu)
    assert Upscaler(swin, UpscaleOptions(precision="bf16"), device=cpu).dtype is torch.bfloat16
    assert Upscaler(swin, UpscaleOptions(precision="auto"), device=cpu).dtype is torch.float32
    compact = load("compact_x4_nc4")
    assert Upscaler(compact, UpscaleOptions(precision="fp16", use_autocast=False), device=cpu).dtype is torch.float32
    with pytest.raises(ValueError, match="precision: unknown value 'fp8'"):
        Upscaler(compact, UpscaleOptions(precision="fp8"), device=cpu)


@pytest.mark.gpu
def test_auto_precision_on_gpu_is_fp16_or_bf16_per_arch():
    cuda = torch.device("cuda")
    assert Upscaler(load("compact_x4_nc4"), UpscaleOptions(), device=cuda).dtype is torch.float16
    assert Upscaler(load("swinir_x2_tiny"), UpscaleOptions(), device=cuda).dtype is torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["compact_x4_nc4", "esrgan_x4_nf16_nb2", "span_x2_f16"])
def test_fp16_on_gpu_close_to_fp32(name):
    desc = load(name)
    images = torch.rand(2, 64, 96, 3)
    want = reference(desc, images)
    out, rep = Upscaler(desc, UpscaleOptions(precision="fp16"), device="cuda").upscale(images)
    assert rep.precision == "fp16"
    assert bool(torch.isfinite(out).all())
    diff = (out - want).abs()
    # Random weights give large pre-clamp activations, so the max is looser than for real
    # weights (those are held to the 99.99th-percentile bound in test_upscale_real_models).
    assert float(diff.mean()) <= 1e-3 and float(diff.max()) <= 5e-2


def test_reduced_precision_on_cpu_bf16_close_to_fp32():
    desc = load("compact_x4_nc4")
    images = torch.rand(1, 32, 32, 3)
    out, rep = Upscaler(desc, UpscaleOptions(precision="bf16"), device="cpu").upscale(images)
    assert rep.precision == "bf16"
    assert float((out - reference(desc, images)).abs().mean()) <= 1e-2


# -- never modify the shared model ---------------------------------------------------------


def test_shared_descriptor_is_never_modified(device):
    desc = load("compact_x4_nc4")
    before = {k: v.clone() for k, v in desc.model.state_dict().items()}
    params_before = [(p.dtype, p.device, p.data_ptr()) for p in desc.model.parameters()]
    Upscaler(desc, UpscaleOptions(precision="bf16", tile_size=16, overlap=8), device=device).upscale(
        torch.rand(1, 40, 40, 3)
    )
    assert [(p.dtype, p.device, p.data_ptr()) for p in desc.model.parameters()] == params_before
    for k, v in desc.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert desc.dtype == torch.float32 and desc.device.type == "cpu"


def test_outputs_are_clamped_per_pixel_never_rescaled(device):
    """In-range pixels are the model's raw values; out-of-range ones clip (no global rescale)."""
    desc = load("esrgan_x4_nf16_nb2")
    images = torch.rand(1, 24, 24, 3)
    raw = desc.model(images.permute(0, 3, 1, 2)).detach().permute(0, 2, 3, 1)
    assert float(raw.max()) > 1.0 or float(raw.min()) < 0.0  # random weights overshoot
    out, _ = Upscaler(desc, fp32_options(), device=device).upscale(images)
    inside = (raw >= 0) & (raw <= 1)
    torch.testing.assert_close(out[inside], raw[inside], atol=2e-5, rtol=0)
    assert torch.all(out[raw > 1] == 1.0) and torch.all(out[raw < 0] == 0.0)


# -- overflow and out-of-memory recovery ---------------------------------------------------


class _FragileNet(torch.nn.Module):
    """Nearest x2 upscale that overflows in fp16 and 'runs out of memory' above a size."""

    def __init__(self, max_pixels: int | None = None, fail_call: int | None = None) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(1))
        self.max_pixels = max_pixels
        self.fail_call = fail_call
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        if len(self.calls) == self.fail_call:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, once)")
        if self.max_pixels is not None and x.shape[0] * x.shape[-2] * x.shape[-1] > self.max_pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        y = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") * self.gain
        return (y * 70000.0) / 70000.0  # inf in fp16, exact in bf16/fp32


def fragile(max_pixels: int | None = None, fail_call: int | None = None) -> ImageModelDescriptor:
    arch = load("compact_x2_nc8").architecture
    net = _FragileNet(max_pixels, fail_call)
    return ImageModelDescriptor(
        net,
        net.state_dict(),
        arch,
        purpose="SR",
        tags=[],
        supports_half=True,
        supports_bfloat16=True,
        scale=2,
        input_channels=3,
        output_channels=3,
    )


def test_fp16_overflow_is_redone_in_a_safe_dtype_with_a_log_line(device, caplog):
    desc = fragile()
    images = torch.rand(2, 16, 16, 3)
    with caplog.at_level(logging.WARNING):
        out, rep = Upscaler(desc, UpscaleOptions(precision="fp16"), device=device).upscale(images)
    assert rep.redone_tiles == 2
    assert "overflowed in fp16" in caplog.text and "redoing them in bf16" in caplog.text
    want = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), scale_factor=2).permute(0, 2, 3, 1)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, want, atol=1e-2, rtol=0)  # two bf16 roundings of [0,1] values


def test_out_of_memory_halves_the_tile_and_retries(device, caplog):
    desc = fragile(max_pixels=70 * 70)
    images = torch.rand(1, 150, 150, 3)
    with caplog.at_level(logging.WARNING):
        out, rep = Upscaler(desc, fp32_options(), device=device).upscale(images)
    assert rep.oom_retries >= 2 and "out of memory" in caplog.text
    want = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), scale_factor=2).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_out_of_memory_in_a_frame_batch_resumes_without_redoing_finished_frames(device):
    desc = fragile(fail_call=2)
    images = torch.rand(5, 16, 16, 3)
    up = Upscaler(desc, fp32_options(batch_size=2), device=device)
    out, rep = up.upscale(images)
    assert rep.oom_retries == 1
    ours = up.cache.module(desc.model, up.fingerprint, up.dtype)  # the engine's own copy ran
    assert ours is not desc.model and desc.model.calls == []
    # batch 2 ok (frames 0-1), batch 2 fails, then frames 2, 3, 4 one by one: nothing twice.
    assert [c[0] for c in ours.calls] == [2, 2, 1, 1, 1]
    want = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), scale_factor=2).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_out_of_memory_below_the_smallest_tile_is_reraised(device):
    desc = fragile(max_pixels=10)
    with pytest.raises(torch.OutOfMemoryError):
        Upscaler(desc, fp32_options(), device=device).upscale(torch.rand(1, 200, 200, 3))


def test_other_model_errors_are_not_swallowed(device):
    desc = fragile()

    def broken(x):
        raise RuntimeError("shape mismatch in layer 3")

    desc.model.forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Upscaler(desc, fp32_options(), device=device).upscale(torch.rand(1, 16, 16, 3))


# -- bad input -----------------------------------------------------------------------------


def test_non_image_model_is_rejected():
    with pytest.raises(ValueError, match="upscale_model: expected a single-image upscale model"):
        Upscaler(torch.nn.Conv2d(3, 3, 3), UpscaleOptions())


def test_masked_inpainting_model_is_rejected():
    from spandrel import MaskedImageModelDescriptor

    base = load("compact_x2_nc8")
    masked = MaskedImageModelDescriptor(
        base.model,
        base.model.state_dict(),
        base.architecture,
        purpose="Inpainting",
        tags=[],
        supports_half=True,
        supports_bfloat16=True,
        input_channels=3,
        output_channels=3,
    )
    with pytest.raises(ValueError, match="MaskedImageModelDescriptor"):
        Upscaler(masked, UpscaleOptions())


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (torch.rand(16, 16, 3), r"\[batch, height, width, channels\]"),
        (torch.randint(0, 255, (1, 16, 16, 3), dtype=torch.uint8), "float values"),
        (torch.rand(1, 16, 16, 4), "drop the alpha channel"),
        (torch.rand(1, 16, 16, 1), "convert the image to RGB"),
        (torch.rand(0, 16, 16, 3), "empty"),
        ("not a tensor", "IMAGE tensor"),
    ],
)
def test_bad_images_are_rejected_with_a_clear_error(image, match, device):
    with pytest.raises(ValueError, match=f"image: .*{match}"):
        Upscaler(load("compact_x2_nc8"), fp32_options(), device=device).upscale(image)


def test_nan_input_is_rejected(device):
    images = torch.rand(2, 16, 16, 3)
    images[1, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="image: frame 1 holds NaN or Inf"):
        Upscaler(load("compact_x2_nc8"), fp32_options(batch_size=1), device=device).upscale(images)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tile_size": -1}, "tile_size: must be >= 0"),
        ({"optimization_level": "max"}, "optimization_level: unknown value"),
        ({"compile_mode": "reduce-overhead"}, "compile_mode: unknown value"),
    ],
)
def test_bad_options_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        Upscaler(load("compact_x2_nc8"), UpscaleOptions(**kw))


def test_no_cuda_runs_on_cpu_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO):
        up = Upscaler(load("compact_x2_nc8"), UpscaleOptions())
    assert up.device.type == "cpu" and up.dtype is torch.float32
    assert "no CUDA device found, running on the CPU" in caplog.text


def test_compile_on_cpu_falls_back_to_eager_and_says_why():
    up = Upscaler(load("compact_x2_nc8"), UpscaleOptions(compile=True), device="cpu")
    assert up.backend == "eager" and "compile unavailable" in up.backend_reason and "cpu" in up.backend_reason


# -- progress, cancel, cache ---------------------------------------------------------------


def test_progress_reaches_total_and_cancel_stops(device):
    desc = load("compact_x2_nc8")
    seen: list[tuple[int, int]] = []
    up = Upscaler(desc, fp32_options(tile_size=16, overlap=8, batch_size=1), device=device, cache=ModelCache())
    up.upscale(torch.rand(2, 32, 32, 3), progress=lambda d, t: seen.append((d, t)))
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and seen[-1][0] == seen[-1][1] == len(seen)

    class Cancelled(Exception):
        pass

    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        if calls["n"] > 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        up.upscale(torch.rand(4, 32, 32, 3), check_cancel=cancel)
    assert calls["n"] == 3
    # The copy went back to the CPU even though the run was cancelled.
    assert all(p.device.type == "cpu" for p in up.cache.module(desc.model, up.fingerprint, up.dtype).parameters())


def test_cancel_inside_a_batch_does_not_wait_for_the_batch_before(device):
    """Whole frames: batch i+1 is queued before batch i is checked. A cancel raised while
    queueing batch i+1 must end the run at once, not first finish batch i (on a GPU that is a
    wait for its kernels; an out-of-memory error keeps it instead, so the retry resumes after it)."""
    desc = load("compact_x2_nc8")
    up = Upscaler(desc, fp32_options(batch_size=1), device=device, cache=ModelCache())
    per_frame = {"n": 0}

    def count():
        per_frame["n"] += 1

    up.upscale(torch.rand(1, 16, 16, 3), check_cancel=count)  # checks made for one frame's batch
    calls = {"n": 0}

    class Cancelled(Exception):
        pass

    def cancel():
        calls["n"] += 1
        if calls["n"] > per_frame["n"] + 1:  # inside the second batch's model call
            raise Cancelled

    seen: list[int] = []
    with pytest.raises(Cancelled):
        up.upscale(torch.rand(3, 16, 16, 3), check_cancel=cancel, progress=lambda d, t: seen.append(d))
    assert per_frame["n"] > 1 and calls["n"] == per_frame["n"] + 2
    assert seen == []  # the first batch was dropped, not finished


def test_model_cache_is_bounded_and_keyed_by_weights():
    a, b = load("compact_x2_nc8", seed=1), load("compact_x2_nc8", seed=2)
    fa, fb = model_fingerprint(a.model, "Compact"), model_fingerprint(b.model, "Compact")
    assert fa != fb and fa == model_fingerprint(load("compact_x2_nc8", seed=1).model, "Compact")
    cache = ModelCache(max_models=1)
    ma = cache.module(a.model, fa, torch.float32)
    assert ma is not a.model and cache.module(a.model, fa, torch.float32) is ma
    cache.module(b.model, fb, torch.float32)
    assert len(cache) == 1
    assert cache.module(a.model, fa, torch.float32) is not ma  # evicted, rebuilt
    with pytest.raises(ValueError, match="max_models"):
        ModelCache(max_models=0)


def test_output_device_and_dtype_follow_the_caller(device):
    out, _ = Upscaler(load("compact_x2_nc8"), fp32_options(), device=device).upscale(
        torch.rand(1, 16, 16, 3), out_dtype=torch.float16
    )
    assert out.dtype == torch.float16 and out.device.type == "cpu"


# -- GPU-only paths: compiled == eager, overlapped transfers ---------------------------------


@pytest.mark.gpu
def test_compiled_path_matches_eager_and_compiles_once(tmp_path):
    import torch._dynamo

    desc = load("compact_x4_nc4")
    images = torch.rand(5, 48, 64, 3)
    cache = ModelCache(max_models=1, cache_dir=tmp_path / "inductor")
    eager, _ = Upscaler(desc, UpscaleOptions(precision="fp32"), device="cuda", cache=cache).upscale(images)
    torch._dynamo.reset()
    up = Upscaler(desc, UpscaleOptions(precision="fp32", compile=True, batch_size=2), device="cuda", cache=cache)
    assert up.backend.startswith("compiled")
    out, rep = up.upscale(images)  # 5 frames in batches of 2: the short last batch is padded
    assert rep.backend.startswith("compiled"), rep.backend_reason
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=0)
    again, _ = up.upscale(images)  # model parked on CPU in between; no recompile needed
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    assert (tmp_path / "inductor").is_dir() and any((tmp_path / "inductor").iterdir())
    regional = Upscaler(desc, UpscaleOptions(precision="fp32", compile=True, compile_mode="regional"), device="cuda")
    out_r, rep_r = regional.upscale(images)
    assert rep_r.backend == "compiled:regional", rep_r.backend_reason
    torch.testing.assert_close(out_r, eager, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_regional_compile_of_rrdb_blocks_matches_eager():
    desc = load("esrgan_x4_nf16_nb2")
    images = torch.rand(2, 32, 40, 3)
    eager, _ = Upscaler(desc, UpscaleOptions(precision="fp32"), device="cuda").upscale(images)
    up = Upscaler(desc, UpscaleOptions(precision="fp32", compile=True, compile_mode="regional"), device="cuda")
    out, rep = up.upscale(images)
    assert rep.backend == "compiled:regional"
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_gpu_output_and_pinned_transfers_agree():
    desc = load("compact_x4_nc4")
    images = torch.rand(6, 40, 48, 3)
    up = Upscaler(desc, UpscaleOptions(precision="fp32", batch_size=1), device="cuda")
    on_cpu, _ = up.upscale(images, out_device="cpu")
    on_gpu, _ = up.upscale(images.cuda(), out_device="cuda")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=0, rtol=0)


def test_repeated_blocks_finds_the_trunk_of_rrdb():
    from speedkit.upscale_cuda.cache import repeated_blocks

    rrdb = load("esrgan_x4_nf16_nb2").model
    assert len(repeated_blocks(rrdb, min_repeats=2)) == 2
    assert repeated_blocks(load("compact_x4_nc4").model) == []  # bare convs: compiled whole


def test_split_conv_bias_is_the_same_function():
    import copy

    from speedkit.upscale_cuda.cache import split_conv_bias

    for name in ("compact_x4_nc4", "esrgan_x4_nf16_nb2"):
        desc = load(name)
        split = copy.deepcopy(desc.model)
        changed = split_conv_bias(split)
        assert changed == sum(1 for m in desc.model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
        x = torch.rand(1, 3, 20, 24)
        with torch.inference_mode():
            torch.testing.assert_close(split(x), desc.model(x), atol=1e-5, rtol=0)
        assert all(type(m) is torch.nn.Conv2d for m in desc.model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.gpu
def test_split_bias_on_gpu_matches_plain_convs():
    desc = load("esrgan_x4_nf16_nb2")
    images = torch.rand(2, 48, 64, 3)
    plain, _ = Upscaler(desc, UpscaleOptions(precision="fp16", split_bias=False), device="cuda").upscale(images)
    split, _ = Upscaler(desc, UpscaleOptions(precision="fp16", split_bias=True), device="cuda").upscale(images)
    assert float((plain - split).abs().mean()) <= 2e-4 and float((plain - split).abs().max()) <= 2e-2


def test_memory_estimate_grows_with_the_frame():
    up = Upscaler(load("compact_x4_nc4"), UpscaleOptions(), device="cpu")
    small, big = up.memory_estimate(64, 64), up.memory_estimate(1080, 1920)
    assert 0 < small < big
    weights = sum(p.numel() for p in up.descriptor.model.parameters()) * 4
    assert small > weights


class _SquareOnlyNet(torch.nn.Module):
    """Nearest x2 that refuses non-square or too-small inputs (like some windowed arches)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2] or x.shape[-1] % 8 or x.shape[-1] < 24:
            raise RuntimeError(f"got {tuple(x.shape)}, needs square multiples of 8, >= 24")
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") * self.gain


@pytest.mark.parametrize("tile", [0, 32])
def test_square_and_multiple_of_requirements_with_a_model(tile, device):
    net = _SquareOnlyNet()
    desc = ImageModelDescriptor(
        net,
        net.state_dict(),
        load("compact_x2_nc8").architecture,
        purpose="SR",
        tags=[],
        supports_half=True,
        supports_bfloat16=True,
        scale=2,
        input_channels=3,
        output_channels=3,
        size_requirements=SizeRequirements(minimum=24, multiple_of=8, square=True),
    )
    images = torch.rand(2, 20, 70, 3)
    out, _ = Upscaler(desc, fp32_options(tile_size=tile, overlap=8), device=device).upscale(images)
    want = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), scale_factor=2).permute(0, 2, 3, 1)
    assert out.shape == (2, 40, 140, 3)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


# -- keep_loaded: our copy stays on the device between runs only when asked ------------------


def _params_device(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


def test_keep_loaded_keeps_only_this_runs_copy_and_a_later_run_parks_it(device):
    a, b = load("compact_x2_nc8", seed=1), load("compact_x4_nc4", seed=2)
    cache = ModelCache(max_models=2)
    images = torch.rand(1, 16, 16, 3)
    up_a = Upscaler(a, fp32_options(keep_loaded=True), device=device, cache=cache)
    out_kept, _ = up_a.upscale(images)
    copy_a = cache.module(a.model, up_a.fingerprint, up_a.dtype)
    assert cache.kept_modules() == [copy_a]
    assert _params_device(copy_a) == {torch.device(device).type}
    # The next run reuses the kept copy (no new copy) and gives the same picture.
    again, _ = Upscaler(a, fp32_options(keep_loaded=True), device=device, cache=cache).upscale(images)
    assert cache.module(a.model, up_a.fingerprint, up_a.dtype) is copy_a
    torch.testing.assert_close(again, out_kept, atol=0, rtol=0)
    # Another model kept: only that one stays, the first goes back to the CPU.
    up_b = Upscaler(b, fp32_options(keep_loaded=True), device=device, cache=cache)
    up_b.upscale(images)
    copy_b = cache.module(b.model, up_b.fingerprint, up_b.dtype)
    assert cache.kept_modules() == [copy_b]
    assert _params_device(copy_a) == {"cpu"}
    # A run without the option parks everything and keeps nothing.
    Upscaler(a, fp32_options(), device=device, cache=cache).upscale(images)
    assert cache.kept_modules() == []
    assert _params_device(copy_a) == _params_device(copy_b) == {"cpu"}
    # The shared descriptors were never moved or cast.
    assert _params_device(a.model) == _params_device(b.model) == {"cpu"}
    assert {p.dtype for p in a.model.parameters()} == {torch.float32}


def test_keep_loaded_copy_leaves_the_cache_when_it_is_evicted_or_cleared(device):
    a, b = load("compact_x2_nc8", seed=1), load("compact_x2_nc8", seed=2)
    cache = ModelCache(max_models=1)
    images = torch.rand(1, 16, 16, 3)
    up_a = Upscaler(a, fp32_options(keep_loaded=True), device=device, cache=cache)
    up_a.upscale(images)
    copy_a = cache.kept_modules()[0]
    # A second model with the option off evicts the kept copy (max_models=1) and parks it first.
    Upscaler(b, fp32_options(), device=device, cache=cache).upscale(images)
    assert cache.kept_modules() == [] and _params_device(copy_a) == {"cpu"}
    Upscaler(b, fp32_options(keep_loaded=True), device=device, cache=cache).upscale(images)
    assert len(cache.kept_modules()) == 1
    cache.clear()
    assert cache.kept_modules() == []


@pytest.mark.gpu
def test_keep_loaded_on_gpu_leaves_the_copy_in_vram_until_offload():
    desc = load("compact_x4_nc4")
    cache = ModelCache(max_models=2)
    up = Upscaler(desc, UpscaleOptions(keep_loaded=True), device="cuda", cache=cache)
    up.upscale(torch.rand(1, 32, 32, 3))
    (kept,) = cache.kept_modules()
    assert _params_device(kept) == {"cuda"}
    cache.offload()
    assert _params_device(kept) == {"cpu"} and cache.kept_modules() == []
