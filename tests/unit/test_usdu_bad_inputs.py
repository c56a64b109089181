"""Every bad input of the USDU nodes gets a clear ``ValueError`` before any tile is sampled.

One test per class of bad input, on the core (no ComfyUI): the message names the input,
says the value and the fix. Before these checks the same inputs gave raw library errors
(``cannot convert float NaN to integer``) or a mostly black picture and a log line that
blamed an fp16 overflow even in an fp32 run.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from speedkit.usdu import checks, cond, pipeline, planner, runner
from speedkit.usdu.planner import PlanSettings

NAN, INF = float("nan"), float("inf")


def settings(**kw) -> pipeline.UsduSettings:
    top = {k: kw.pop(k) for k in ("upscale_by", "normalize", "seed", "tile_seed", "batch_size") if k in kw}
    return pipeline.UsduSettings(plan=PlanSettings(**{"tile_width": 64, "tile_height": 64, **kw}), **top)


def never_called(batch: runner.TileBatch) -> torch.Tensor:
    raise AssertionError("a tile was sampled although the input is bad")


def run(image: torch.Tensor | None = None, **kw) -> torch.Tensor:
    image = torch.rand(1, 64, 64, 3) if image is None else image
    return pipeline.upscale_then_redraw(image, settings(**kw), never_called)


# ---------------------------------------------------------------------------
# SIGMAS (CustomSample): empty, NaN/Inf, increasing, below 0, not a schedule
# ---------------------------------------------------------------------------


def test_empty_sigmas_name_the_input_and_the_scheduler_fix():
    with pytest.raises(ValueError, match=r"^custom_sigmas: the schedule is empty \(0 sigmas.*BasicScheduler"):
        checks.check_sigmas(torch.tensor([]), "custom_sigmas")


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_sigma_names_its_position_and_value(bad):
    sigmas = torch.tensor([14.6, 7.0, bad, 0.0])
    with pytest.raises(ValueError, match=rf"^sigmas: sigma 2 of 4 is {bad}; every sigma must be a finite number"):
        checks.check_sigmas(sigmas)


def test_increasing_sigmas_name_the_step_and_say_they_must_decrease():
    flipped = torch.tensor([0.0001, 1.5, 6.0, 14.6])  # what FlipSigmas makes of a schedule
    with pytest.raises(
        ValueError,
        match=r"^custom_sigmas: sigma 1 \(1\.5\) is larger than sigma 0 \(0\.0001\); sigmas must decrease.*"
        r"BasicScheduler",
    ):
        checks.check_sigmas(flipped, "custom_sigmas")


def test_sigmas_ending_below_zero_are_refused():
    with pytest.raises(ValueError, match=r"^sigmas: the last sigma is -0\.5; sigmas must end at 0 or above"):
        checks.check_sigmas(torch.tensor([3.0, 1.0, -0.5]))


@pytest.mark.parametrize(
    ("sigmas", "match"),
    [
        ([3.0, 0.0], r"^sigmas: expected a SIGMAS tensor, got list"),
        (torch.ones(2, 3), r"^sigmas: expected a 1-D list of noise levels, got shape \(2, 3\)"),
    ],
)
def test_something_that_is_not_a_schedule_is_refused(sigmas, match):
    with pytest.raises(ValueError, match=match):
        checks.check_sigmas(sigmas)


def test_valid_schedules_return_their_step_count():
    assert checks.check_sigmas(torch.tensor([14.6, 7.0, 7.0, 0.0])) == 3  # equal neighbours are fine
    assert checks.check_sigmas(torch.tensor([2.0, 0.5])) == 1  # a partial schedule (SplitSigmas) too
    assert checks.check_sigmas(torch.tensor([0.0])) == 0  # a single sigma: no step


# ---------------------------------------------------------------------------
# Numbers: NaN / Inf / out of range (ComfyUI's min/max checks let NaN and links through)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_upscale_by_nan_or_inf_names_the_value_and_the_range(bad):
    # Before: "ValueError: cannot convert float NaN to integer" (or OverflowError for Inf).
    with pytest.raises(ValueError, match=rf"^upscale_by: {bad} is not a finite number; use a value between 0.05 and 4"):
        run(upscale_by=bad)


@pytest.mark.parametrize("bad", [0.0, -2.0])
def test_upscale_by_zero_or_negative_names_the_value_and_the_range(bad):
    with pytest.raises(ValueError, match=rf"^upscale_by: {bad} is not above 0; use a value between 0.05 and 4"):
        run(upscale_by=bad)


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("denoise", "denoise"),
        ("seam_fix_denoise", "seam_fix_denoise"),
        ("tile_width", "tile_width"),
        ("tile_height", "tile_height"),
        ("padding", "tile_padding"),
        ("mask_blur", "mask_blur"),
        ("seam_fix_width", "seam_fix_width"),
        ("seam_fix_mask_blur", "seam_fix_mask_blur"),
        ("seam_fix_padding", "seam_fix_padding"),
        ("batch_size", "batch_size"),
        ("seed", "seed"),
    ],
)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_number_inputs_name_the_input(field, name, bad):
    # Before: NaN passed every "< min" check and failed later (NaN tile grid, NaN masks = black).
    with pytest.raises(ValueError, match=rf"^{name}: {bad} is not a finite number; use "):
        run(**{field: bad})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"denoise": 1.5}, r"^denoise: 1.5 is above the maximum 1; use a value between 0 \(no change\) and 1"),
        ({"tile_width": 64.5}, r"^tile_width: 64.5 is not a whole number; use 8 or more"),
        ({"seed": -1}, r"^seed: -1 is below the minimum 0; use a whole number in 0\.\.18446744073709551615"),
        ({"seed": 2**64}, r"^seed: 18446744073709551616 is above the maximum 18446744073709551615; use a whole"),
        ({"tile_padding": "32"}, r"^tile_padding: expected a number, got str"),
    ],
)
def test_out_of_range_numbers_from_links_are_refused(kw, match):
    if "tile_padding" in kw:
        kw = {"padding": kw.pop("tile_padding")}
    with pytest.raises(ValueError, match=match):
        run(**kw)


@pytest.mark.parametrize(
    ("name", "value", "kw", "match"),
    [
        ("cfg", NAN, {}, r"^cfg: nan is not a finite number; use a finite"),
        ("cfg", -INF, {}, r"^cfg: -inf is not a finite number"),
        ("steps", 0, {"minimum": 1, "integer": True}, r"^steps: 0 is below the minimum 1"),
        ("steps", NAN, {"minimum": 1, "integer": True}, r"^steps: nan is not a finite number"),
    ],
)
def test_adapter_numbers_cfg_and_steps(name, value, kw, match):
    with pytest.raises(ValueError, match=match):
        checks.check_number(name, value, **kw)
    checks.check_number(name, 7, **kw)  # a good value passes


# ---------------------------------------------------------------------------
# IMAGE: empty batch, 0-pixel side, NaN/Inf (named as the node's input), 0..255 values
# ---------------------------------------------------------------------------


def test_empty_image_batch_says_there_is_no_image():
    with pytest.raises(ValueError, match=r"^image: the IMAGE batch holds no image \(shape \(0, 64, 64, 3\)\)"):
        run(torch.rand(0, 64, 64, 3))


@pytest.mark.parametrize("shape", [(1, 64, 0, 3), (1, 0, 64, 3)])
def test_image_with_a_zero_pixel_side_says_its_size(shape):
    with pytest.raises(ValueError, match=rf"^image: the image is {shape[2]}x{shape[1]} pixels"):
        run(torch.rand(*shape))


def test_non_finite_image_names_the_nodes_input():
    image = torch.rand(1, 64, 64, 3)
    image[0, 3, 4, 1] = NAN
    with pytest.raises(ValueError, match=r"^upscaled_image: 1 value\(s\) are NaN or Inf"):
        pipeline.upscale_then_redraw(image, settings(upscale_by=1.0), never_called, image_name="upscaled_image")


def test_0_255_image_with_normalize_off_is_refused_instead_of_clamped_white():
    with pytest.raises(ValueError, match=r"^image: values range from 0 to 255 .*normalize is off; set normalize"):
        run(torch.linspace(0, 255, 64 * 64 * 3).reshape(1, 64, 64, 3), normalize="off")
    # small overshoots (Lanczos, upscale models) are still accepted and clamped
    image = torch.rand(1, 64, 64, 3) * 1.1
    out = pipeline.upscale_then_redraw(image, settings(upscale_by=1.0, normalize="off"), lambda b: b.pixels)
    assert torch.equal(out, image.clamp(0, 1))


def test_upscale_model_returning_nan_is_a_clear_error():
    def broken_model(x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x.repeat_interleave(2, 1).repeat_interleave(2, 2), NAN)

    with pytest.raises(ValueError, match=r"^upscale_model: the upscale model returned \d+ NaN/Inf value\(s\)"):
        pipeline.upscale_then_redraw(torch.rand(1, 64, 64, 3), settings(), never_called, model_fn=broken_model)


# ---------------------------------------------------------------------------
# CONDITIONING: not a list, empty, no tensor, 0 tokens, NaN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ((torch.rand(1, 77, 768), {}), r"^positive: expected a CONDITIONING, got tuple; connect a text encoder"),
        ([], r"^positive: the CONDITIONING is empty; connect a text encoder"),
        ([["a photo", {}]], r"^positive: conditioning 0 holds a str, not a tensor; connect a text encoder"),
        ([[torch.rand(1, 0, 768), {}]], r"^positive: conditioning 0 is empty \(shape \(1, 0, 768\)\)"),
        (
            [[torch.rand(1, 77, 768), {}], [torch.full((1, 77, 768), NAN), {}]],
            r"^positive: conditioning 1 holds 59136 NaN/Inf value\(s\); the text encoder",
        ),
        (
            [[torch.rand(1, 77, 2048), {"pooled_output": torch.tensor([[INF] * 4])}]],
            r"^positive: conditioning 0 pooled_output holds 4 NaN/Inf value\(s\)",
        ),
    ],
)
def test_bad_conditioning_is_named(value, match):
    with pytest.raises(ValueError, match=match):
        cond.check_conditioning(value, 1, "positive")


def test_good_conditioning_passes():
    cond.check_conditioning([[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 1280)}]], 1, "negative")


# ---------------------------------------------------------------------------
# The NaN tile warning blames fp16 only when something runs in reduced precision
# ---------------------------------------------------------------------------


def nan_tiles_warning(caplog, precision) -> str:
    canvas = torch.rand(1, 64, 64, 3)
    passes = planner.plan(64, 64, PlanSettings(tile_width=64, tile_height=64, padding=0))
    with caplog.at_level(logging.WARNING, logger="speedkit.usdu.runner"):
        caplog.clear()
        out = runner.run_passes(canvas, passes, lambda b: torch.full_like(b.pixels, NAN), precision=precision)
    assert bool(torch.isfinite(out).all())
    (record,) = [r for r in caplog.records if "NaN/Inf" in r.getMessage()]
    return record.getMessage()


def test_nan_tile_warning_in_fp32_does_not_blame_fp16(caplog):
    msg = nan_tiles_warning(caplog, {"model": torch.float32, "VAE": torch.float32})
    assert "so not an fp16 overflow" in msg and "model in fp32, VAE in fp32" in msg and "cfg" in msg
    assert "fp16 overflow in" not in msg


def test_nan_tile_warning_in_fp16_names_the_reduced_precision_part(caplog):
    msg = nan_tiles_warning(caplog, {"model": torch.float32, "VAE": torch.float16})
    assert "the VAE runs in fp16: an overflow in reduced precision?" in msg and "--fp32-vae" in msg
    assert "model runs" not in msg


def test_nan_tile_warning_with_unknown_precision_stays_generic(caplog):
    msg = nan_tiles_warning(caplog, None)
    assert "fp16" not in msg and "overflow in the model or VAE" in msg


def test_reduced_precision_dtypes():
    assert checks.is_reduced_precision(torch.float16) and checks.is_reduced_precision(torch.bfloat16)
    assert not checks.is_reduced_precision(torch.float32) and not checks.is_reduced_precision(torch.int8)
    assert math.isclose(checks.UPSCALE_BY_MIN, 0.05) and checks.UPSCALE_BY_MAX == 4.0
