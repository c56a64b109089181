"""First Block Cache ``skip_whole_step`` (CPU, no ComfyUI).

In a run that decides ahead of the GPU (a calibrated plan or a forced pattern on a one-call-per-step
sampler), a skipped call runs no block: the ``APPLY_MODEL`` wrapper returns ``x - sigma * forecast``,
the forecast being the node's ``hit_residual`` rule over the noise/velocity predictions of the last
computed calls. Driven like ComfyUI's sampler drives the stand-in Flux of ``test_fbcache_core.py``:
``apply_model(x, sigma, c_concat, c_crossattn, control, transformer_options)`` once per step, the
step reported to the callback after it.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_fbcache_ahead import ON_CUDA_DEVICE, SCHEDULE
from test_fbcache_core import Flux, _Executor, active, call_options, dit_options

from speedkit.fbcache import FBCacheHolder, dit_diffusion_wrapper, whole_step_apply_model_wrapper
from speedkit.fbcache.calibration import Calibration, _estimate
from speedkit.fbcache.forecast import extrapolation_weight


class Counted(Flux):
    """The stand-in Flux, counting the calls that ran its first block."""

    def __init__(self):
        super().__init__()
        self.first_block_runs = 0
        self.double_blocks[0].register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.first_block_runs += 1


def sample(flux, holder, img, txt, *, sampler="sample_euler", count=True, reported=None, wrapper=None, control=None):
    """One run through the APPLY_MODEL wrapper; returns (denoised per call, predictions per call, first-block runs per call)."""
    wrapper = wrapper or dit_diffusion_wrapper
    holder.begin_run(SCHEDULE, sampler, tuple(img.shape))
    step_done = holder.count_steps() if count else None
    to = dit_options(holder)
    vec_of = {}

    def apply_model(x, sigma, c_concat, c_crossattn, control, transformer_options):
        vec = vec_of["vec"]
        return x - sigma.reshape(-1, 1, 1) * flux(x, txt, vec, transformer_options)

    outs, preds, ran = [], [], []
    for k, s in enumerate(SCHEDULE[:-1]):
        vec_of["vec"] = torch.full((1, 1, 8), s / 14)
        x = img * (1 + 0.05 * k) + 0.02 * k**1.5
        sigma = torch.tensor([s])
        before = flux.first_block_runs
        denoised = wrapper(_Executor(apply_model, None), x, sigma, None, None, control, call_options(to, s))
        outs.append(denoised)
        preds.append((x - denoised) / s)
        ran.append(flux.first_block_runs > before)
        if step_done is not None:
            step_done(k if reported is None else reported[k])
    return outs, preds, ran


def lagrange(points: list[tuple[float, torch.Tensor]], x: float) -> torch.Tensor:
    out = torch.zeros_like(points[0][1])
    for j, (xj, yj) in enumerate(points):
        w = 1.0
        for m, (xm, _) in enumerate(points):
            if m != j:
                w *= (x - xm) / (xj - xm)
        out = out + w * yj
    return out


@pytest.fixture
def flux_and_inputs():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return Counted().eval(), torch.randn(1, 6, 8, generator=g), torch.randn(1, 2, 8, generator=g)


PATTERN = [False, False, True, False, True, True]
"""Per call, repeated: True = skip. Every skip has at least two computed calls before it."""


@torch.no_grad()
@pytest.mark.parametrize("hit_residual", ["reuse", "extrapolate", "taylor1", "taylor2", "fit1"])
def test_a_whole_step_skip_runs_no_block_and_returns_the_forecast(flux_and_inputs, hit_residual):
    flux, img, txt = flux_and_inputs
    holder = active(FBCacheHolder(0.5, hit_residual=hit_residual, force_pattern=PATTERN, skip_whole_step=True))
    outs, preds, ran = sample(flux, holder, img, txt)
    skipped = [PATTERN[k % len(PATTERN)] for k in range(len(outs))]
    assert ran == [not s for s in skipped]  # a skipped call ran no block at all
    computed = []  # (step, prediction) of the computed calls so far
    order = {"reuse": 0, "extrapolate": 1, "taylor1": 1, "taylor2": 2, "fit1": 1}[hit_residual]
    for k, (s, pred) in enumerate(zip(skipped, preds, strict=True)):
        if not s:
            computed.append((float(k), pred))
            continue
        if hit_residual == "extrapolate":
            (_, p0), (k1, p1) = computed[-2], computed[-1]
            w = extrapolation_weight(SCHEDULE[k], SCHEDULE[int(k1)], SCHEDULE[int(computed[-2][0])])
            expected = p1 + w * (p1 - p0)
        elif hit_residual == "fit1" and len(computed) >= 3:
            xs = torch.tensor([c[0] for c in computed[-3:]], dtype=torch.float64)
            design = torch.stack([torch.ones(3, dtype=torch.float64), xs], 1)
            coef = torch.tensor([1.0, float(k)], dtype=torch.float64) @ torch.linalg.pinv(design)
            expected = sum(float(c) * p for c, (_, p) in zip(coef, computed[-3:], strict=True))
        else:
            expected = lagrange(computed[-(order + 1) :], float(k))
        torch.testing.assert_close(pred, expected, rtol=1e-4, atol=1e-5)
    summary = holder.summary()
    assert summary["whole_step_skips"] == sum(skipped) > 0 and summary["skipped"] == sum(skipped)
    assert "ran no block" in holder.summary_text()


@torch.no_grad()
def test_without_deciding_ahead_a_skip_runs_the_first_blocks(flux_and_inputs):
    """The setting only applies where the skips are known before the call: a waiting run (the
    sampler's steps not reported, or decide_ahead off) keeps the first blocks and their guard."""
    flux, img, txt = flux_and_inputs
    for count, decide_ahead in ((False, True), (True, False)):
        holder = active(
            FBCacheHolder(
                0.5, hit_residual="taylor1", force_pattern=PATTERN, skip_whole_step=True, decide_ahead=decide_ahead
            )
        )
        _, _, ran = sample(flux, holder, img, txt, count=count)
        assert all(ran) and holder.summary()["whole_step_skips"] == 0 and holder.summary()["skipped"] > 0


@torch.no_grad()
def test_the_first_skip_of_a_composition_without_a_computed_prediction_runs(flux_and_inputs):
    """A pattern that skips before any computed call has a prediction: nothing to forecast from, the
    call runs (through the first-block path)."""
    flux, img, txt = flux_and_inputs
    holder = active(FBCacheHolder(0.5, force_pattern=[True, False, True], skip_whole_step=True))
    outs, _, ran = sample(flux, holder, img, txt)
    assert ran[0] and all(torch.isfinite(o).all() for o in outs)
    assert ran[2] is False  # the third call (a skip) forecasts from the second


@torch.no_grad()
def test_a_planned_run_skips_whole_steps_where_the_plan_says(flux_and_inputs):
    flux, img, txt = flux_and_inputs
    template = FBCacheHolder(
        0.1, hit_residual="taylor1", max_consecutive_hits=3, target_speedup=2.0, skip_whole_step=True
    )
    calibrating = active(template.clone())
    _, _, ran = sample(flux, calibrating, img, txt)
    assert all(ran)  # the calibration run computes every step
    found = calibrating.finish_calibration(4.0)
    planned = set(found.plan)
    holder = active(template.clone())
    outs, _, ran = sample(flux, holder, img, txt)
    assert [k for k, r in enumerate(ran) if r] == sorted(int(p) for p in planned)
    assert holder.summary()["whole_step_skips"] == len(ran) - len(planned) > 0
    assert all(torch.isfinite(o).all() for o in outs)


@torch.no_grad()
def test_a_call_off_the_schedule_stops_whole_step_skips(flux_and_inputs, caplog):
    flux, img, txt = flux_and_inputs
    holder = active(FBCacheHolder(0.5, hit_residual="taylor1", force_pattern=PATTERN, skip_whole_step=True))
    with caplog.at_level(logging.INFO, logger="speedkit.fbcache.holder"):
        outs, _, ran = sample(flux, holder, img, txt, reported=[0] * 12)  # wrong step reports: wrong sigma guesses
    assert holder.ahead_stopped.startswith("a model call at sigma") and "wait for the GPU again" in caplog.text
    assert ran[-4:] == [True] * 4  # after the stop every call runs its first blocks again
    assert holder.summary()["resets"] >= 1 and all(torch.isfinite(o).all() for o in outs)


@torch.no_grad()
def test_controlnet_calls_always_run(flux_and_inputs):
    flux, img, txt = flux_and_inputs
    holder = active(FBCacheHolder(0.5, force_pattern=PATTERN, skip_whole_step=True))
    control = {"input": [torch.zeros(1, 6, 8)] * 3}
    _, _, ran = sample(flux, holder, img, txt, control=control)
    assert all(ran) and holder.summary()["whole_step_skips"] == 0


@torch.no_grad()
def test_a_call_that_never_reaches_the_block_hooks_is_not_forecast_from(flux_and_inputs):
    """A computed call whose network runs without the cache's block hooks (another node replaced
    them) is not taken for the last hooked call: the next skip forecasts from the hooked one."""
    flux, img, txt = flux_and_inputs
    template = FBCacheHolder(0.5, target_speedup=2.0, skip_whole_step=True)
    key = ("sample_euler", tuple(round(v, 6) for v in SCHEDULE), tuple(img.shape))
    template.calibrations[key] = Calibration(1e9, 2.0, 40.0, 2, 3, True, plan=(0.0, 1.0))  # compute steps 0 and 1
    holder = active(template.clone())
    assert holder.begin_run(SCHEDULE, "sample_euler", tuple(img.shape)) == "calibrated"
    step_done = holder.count_steps()
    to = dit_options(holder)

    def hooked(x, sigma, c_concat, c_crossattn, control, transformer_options):
        return x - sigma.reshape(-1, 1, 1) * flux(x, txt, torch.full((1, 1, 8), 0.5), transformer_options)

    def unhooked(x, sigma, *_rest, **_kw):
        return x * 0.5

    outs = []
    for k, (wrapper, fn) in enumerate(
        [(dit_diffusion_wrapper, hooked), (whole_step_apply_model_wrapper, unhooked), (dit_diffusion_wrapper, hooked)]
    ):
        s = SCHEDULE[k]
        outs.append(wrapper(_Executor(fn, None), img, torch.tensor([s]), None, None, None, call_options(to, s)))
        step_done(k)
    assert holder.summary()["whole_step_skips"] == 1
    first_prediction = (img - outs[0]) / SCHEDULE[0]
    torch.testing.assert_close(outs[2], img - SCHEDULE[2] * first_prediction)


def test_the_unet_wrapper_passes_calls_without_a_cache_through():
    called = []

    def apply_model(*args, **kwargs):
        called.append(args)
        return args[0] * 2

    x = torch.ones(1, 4, 2, 2)
    out = whole_step_apply_model_wrapper(_Executor(apply_model, None), x, torch.tensor([1.0]), None, None, None, {})
    assert torch.equal(out, x * 2) and len(called) == 1


def test_the_plan_estimates_a_whole_step_skip_by_the_prediction_alone():
    """With first blocks a skip's estimated error is the larger of the span's and the prediction's
    forecast errors; without them (whole step) only the prediction's."""
    span_error, output_error = torch.full((16,), 3.0), torch.full((16,), 1.0)
    errors = {"c": (0, span_error, output_error)}
    assert _estimate(errors, 1.0) == pytest.approx(3.0)
    assert _estimate(errors, 1.0, whole_step=True) == pytest.approx(1.0)
    unrecorded = {"c": (0, span_error, None)}
    assert _estimate(unrecorded, 1.0, whole_step=True) == pytest.approx(3.0)
    assert math.isfinite(_estimate(errors, 5.0, whole_step=True))


@pytest.mark.gpu
@torch.no_grad()
@ON_CUDA_DEVICE
def test_whole_step_skips_never_wait_for_the_gpu():
    """Under CUDA sync debug mode 'error' (raises on anything that waits for the GPU): computed calls,
    whole-step skips with a Taylor forecast, the sigma checks read AHEAD_LAG calls late."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    flux = Counted().eval().to(dev)
    img, txt = torch.randn(1, 6, 8, device=dev), torch.randn(1, 2, 8, device=dev)
    holder = active(FBCacheHolder(0.5, hit_residual="taylor1", force_pattern=PATTERN, skip_whole_step=True))
    holder.begin_run(SCHEDULE, "sample_euler", tuple(img.shape))
    step_done = holder.count_steps()
    to = dit_options(holder)

    def apply_model(x, sigma, c_concat, c_crossattn, control, transformer_options):
        return x - sigma.reshape(-1, 1, 1) * flux(x, txt, transformer_options["vec"], transformer_options)

    calls = []  # ComfyUI's sigmas are on the GPU already: made before the checked part
    for k, s in enumerate(SCHEDULE[:-1]):
        options = call_options(to, s)
        options["sigmas"] = options["sigmas"].to(dev)
        options["vec"] = torch.full((1, 1, 8), s / 14, device=dev)
        calls.append((img * (1 + 0.05 * k), options["sigmas"], options))

    def call(k):
        x, sigma, options = calls[k]
        dit_diffusion_wrapper(_Executor(apply_model, None), x, sigma, None, None, None, options)
        step_done(k)

    for k in range(6):  # the first calls fill the caches of the allocator and the ops
        call(k)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(6, len(calls)):
            call(k)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    summary = holder.summary()
    assert summary["whole_step_skips"] > 2 and not summary["ahead_stopped"]
