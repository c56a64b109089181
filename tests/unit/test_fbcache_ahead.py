"""First Block Cache deciding ahead of the GPU (CPU, no ComfyUI; one GPU test).

A run whose skips are fixed in advance (a calibrated plan, or a forced pattern) on a sampler that
calls the model once per step decides without reading the GPU: the sigma of a call is the
schedule's entry of the step the sampler reported, and the call's distances and sigma are read
``AHEAD_LAG`` calls later (report, sigma check, the plan's guard). Uses the stand-in Flux of
``test_fbcache_core.py``, driven the way ComfyUI's sampler drives it (one call per step, the step
reported to the callback after it).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_fbcache_core import Flux, _Executor, active, call_options, dit_options

from speedkit.fbcache import HOLDER_KEY, FBCacheHolder, step_apply_model_wrapper
from speedkit.fbcache.holder import AHEAD_LAG, AHEAD_SAMPLERS

# float32 values, as the adapter reads ComfyUI's sigmas (the calls' sigma tensors are float32 too)
SCHEDULE = torch.tensor([14.0 * (1 - k / 12) ** 2 for k in range(12)] + [0.0]).tolist()


def sample(flux, holder, img, txt, *, sampler="sample_euler", count=True, jump_at=None, reported=None):
    """One sampling run of the stand-in Flux; returns (outputs, per-call decisions, summary, summary text).

    ``jump_at``: from that step on the input moves far (the first block's residual with it);
    ``reported``: the step indices told to the callback (default: the true ones).
    """
    holder.begin_run(SCHEDULE, sampler, tuple(img.shape))
    step_done = holder.count_steps() if count else None
    to = dit_options(holder)
    outs, decisions = [], []
    for k, s in enumerate(SCHEDULE[:-1]):
        vec = torch.full((1, 1, 8), s / 14)
        x = img + 0.01 * k + (3.0 * (k - jump_at + 1) if jump_at is not None and k >= jump_at else 0.0)
        outs.append(flux(x, txt, vec, call_options(to, s)))
        decisions.append(_last_hit(holder))
        if step_done is not None:
            step_done(k if reported is None else reported[k])
    text = holder.summary_text()
    return outs, decisions, holder.summary(), text


def _last_hit(holder) -> bool:
    st = next(iter(holder.stats.values()))
    return st.consecutive_hits > 0


@pytest.fixture
def flux_and_inputs():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return Flux().eval(), torch.randn(1, 6, 8, generator=g), torch.randn(1, 2, 8, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("hit_residual", ["reuse", "extrapolate", "taylor1", "taylor2", "fit1"])
@pytest.mark.parametrize("mode", ["tail", "per_block"])
def test_forced_skips_decided_ahead_equal_the_waiting_decisions(flux_and_inputs, hit_residual, mode):
    flux, img, txt = flux_and_inputs
    pattern = [False, False, True, True, False, True]
    runs = {}
    for count in (True, False):
        holder = active(FBCacheHolder(0.5, cache_mode=mode, hit_residual=hit_residual, force_pattern=pattern))
        runs[count] = sample(flux, holder, img, txt, count=count)
    (out_a, dec_a, sum_a, text_a), (out_w, dec_w, sum_w, _) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_w, strict=True))
    assert dec_a == dec_w and sum_a["skipped"] == sum_w["skipped"] > 0
    assert sum_a["decided_ahead"] and not sum_w["decided_ahead"] and not sum_a["ahead_stopped"]
    assert "Skips decided ahead of the GPU" in text_a


@torch.no_grad()
def test_distances_are_read_late_and_all_of_them(flux_and_inputs, monkeypatch):
    """No call reads its own values: after each call the last AHEAD_LAG calls' values are unread, and
    at the end of the run every distance is in the report, equal to the ones a waiting run reads."""
    flux, img, txt = flux_and_inputs
    holder = active(FBCacheHolder(0.5, hit_residual="taylor1", force_pattern=[False, True]))
    holder.begin_run(SCHEDULE, "sample_euler", tuple(img.shape))
    step_done = holder.count_steps()
    to = dit_options(holder)
    unread = []
    for k, s in enumerate(SCHEDULE[:-1]):
        flux(img + 0.01 * k, txt, torch.full((1, 1, 8), s / 14), call_options(to, s))
        unread.append([p.step for p in holder._pending])
        step_done(k)
    assert unread[0] == [0.0] and all(u == [k - 1.0, float(k)] for k, u in enumerate(unread) if k >= AHEAD_LAG - 1)
    diffs_ahead = list(holder.summary() and holder.stats["u0"].diffs)
    assert not holder._pending
    waiting = active(FBCacheHolder(0.5, hit_residual="taylor1", force_pattern=[False, True]))
    sample(flux, waiting, img, txt, count=False)
    assert diffs_ahead == pytest.approx(waiting.stats["u0"].diffs, rel=1e-6) and len(diffs_ahead) == len(SCHEDULE) - 2


def _planned(flux, img, txt):
    """A speed-target patched model whose plan is made on (img, txt); returns the template holder."""
    template = FBCacheHolder(0.1, hit_residual="taylor1", max_consecutive_hits=3, target_speedup=2.0)
    holder = active(template.clone())
    sample(flux, holder, img, txt)
    holder.finish_calibration(4.0)
    assert template.calibrations
    return template


@torch.no_grad()
def test_a_planned_run_decides_ahead_and_equals_the_waiting_one(flux_and_inputs):
    flux, img, txt = flux_and_inputs
    template = _planned(flux, img, txt)
    ahead = sample(flux, active(template.clone()), img, txt)
    waiting = sample(flux, active(template.clone()), img, txt, count=False)
    assert ahead[2]["run_mode"] == "calibrated" and ahead[2]["decided_ahead"] and not ahead[2]["ahead_stopped"]
    assert not waiting[2]["decided_ahead"]
    assert ahead[1] == waiting[1] and sum(ahead[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(ahead[0], waiting[0], strict=True))


@torch.no_grad()
def test_the_plans_guard_stops_deciding_ahead_lag_calls_late(flux_and_inputs, caplog):
    """A later run that strays from the calibration run: waiting, the first planned skip past the
    guard is computed; ahead it is skipped, noticed AHEAD_LAG calls later, and from then on the
    decisions wait for the GPU (and the guard) again."""
    flux, img, txt = flux_and_inputs
    template = _planned(flux, img, txt)
    plan = set(template.calibrations[next(iter(template.calibrations))].plan)
    jump = next(k for k in range(4, 12) if k not in plan)  # a planned skip
    waiting = sample(flux, active(template.clone()), img, txt, count=False, jump_at=jump)
    with caplog.at_level(logging.INFO, logger="speedkit.fbcache.holder"):
        holder = active(template.clone())
        ahead = sample(flux, holder, img, txt, jump_at=jump)
    assert not waiting[1][jump]  # the guard computes it
    assert ahead[1][jump]  # ahead the skip is taken ...
    assert ahead[1][:jump] == waiting[1][:jump]
    assert f"the planned skip at step {jump}" in holder.ahead_stopped  # ... and the guard trips later
    assert "past the calibration's guard" in caplog.text and "wait for the GPU again" in caplog.text
    assert "Decided ahead of the GPU until the planned skip" in ahead[3]
    assert all(torch.isfinite(o).all() for o in ahead[0])


@torch.no_grad()
def test_a_call_off_the_schedule_stops_deciding_ahead_and_resets(flux_and_inputs):
    flux, img, txt = flux_and_inputs
    holder = active(FBCacheHolder(0.5, hit_residual="taylor1", force_pattern=[False, True]))
    reported = [0] * 12  # a sampler that reports step 0 every time: the guessed sigmas are wrong from call 2 on
    outs, _, summary, _ = sample(flux, holder, img, txt, reported=reported)
    assert summary["decided_ahead"] and summary["resets"] >= 1
    assert holder.ahead_stopped.startswith("a model call at sigma")
    assert all(torch.isfinite(o).all() for o in outs)


def test_who_decides_ahead():
    img_shape = (1, 6, 8)
    forced = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    forced.begin_run(SCHEDULE, "sample_euler", img_shape)
    assert not forced.ahead  # the sampler's steps are not reported yet
    forced.count_steps()
    assert forced.ahead
    for sampler in ("sample_heun", "sample_dpmpp_2s_ancestral", "sample_unipc", "KSAMPLER"):
        other = active(FBCacheHolder(0.5, force_pattern=[False, True]))
        other.begin_run(SCHEDULE, sampler, img_shape)
        other.count_steps()
        assert not other.ahead, sampler
    threshold = active(FBCacheHolder(0.5))  # decided by the distance: has to wait for it
    threshold.begin_run(SCHEDULE, "sample_euler", img_shape)
    threshold.count_steps()
    assert not threshold.ahead
    calibrating = active(FBCacheHolder(0.5, target_speedup=2.0))
    assert calibrating.begin_run(SCHEDULE, "sample_euler", img_shape) == "calibrating"
    calibrating.count_steps()
    assert not calibrating.ahead
    switched_off = active(FBCacheHolder(0.5, force_pattern=[False, True], decide_ahead=False).clone())
    switched_off.begin_run(SCHEDULE, "sample_euler", img_shape)
    switched_off.count_steps()
    assert not switched_off.ahead  # the node's decide_ahead input, kept by the per-run clone
    no_schedule = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    no_schedule.begin_run(None, "sample_euler", img_shape)
    no_schedule.count_steps()
    assert not no_schedule.ahead
    assert {"sample_euler", "sample_dpmpp_2m", "sample_euler_ancestral"} <= AHEAD_SAMPLERS
    assert "sample_heun" not in AHEAD_SAMPLERS


ON_CUDA_DEVICE = pytest.mark.skipif(
    not (torch.cuda.is_available() and os.environ.get("SPEEDKIT_TEST_DEVICE") == "cuda"),
    reason="needs a CUDA GPU (SPEEDKIT_TEST_DEVICE=cuda)",
)
"""Skips a GPU test unless the run asks for the CUDA device (shared by the FBCache GPU unit tests)."""


@pytest.mark.gpu
@torch.no_grad()
@ON_CUDA_DEVICE
def test_deciding_ahead_never_waits_for_the_gpu():
    """CUDA sync debug mode 'error' raises on any operation that waits for the GPU: the decided-ahead
    calls (hits and misses, forecasts, reading values AHEAD_LAG calls late) run under it."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    flux = Flux().eval().to(dev)
    img, txt = torch.randn(1, 6, 8, device=dev), torch.randn(1, 2, 8, device=dev)
    holder = active(FBCacheHolder(0.5, hit_residual="taylor1", force_pattern=[False, False, True, True]))
    holder.begin_run(SCHEDULE, "sample_euler", tuple(img.shape))
    step_done = holder.count_steps()
    to = dit_options(holder)
    calls = []  # ComfyUI's sigmas are on the GPU already: made before the checked part
    for k, s in enumerate(SCHEDULE[:-1]):
        options = call_options(to, s)
        options["sigmas"] = options["sigmas"].to(dev)
        calls.append((img + 0.01 * k, torch.full((1, 1, 8), s / 14, device=dev), options))
    for k in range(4):  # the first calls fill the caches of the allocator and the ops
        flux(calls[k][0], txt, calls[k][1], calls[k][2])
        step_done(k)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(4, len(calls)):
            flux(calls[k][0], txt, calls[k][1], calls[k][2])
            step_done(k)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    summary = holder.summary()
    assert summary["decided_ahead"] and not summary["ahead_stopped"] and summary["skipped"] > 0


@torch.no_grad()
@pytest.mark.parametrize("hit_residual", ["reuse", "taylor1"])
def test_whole_step_mode_decided_ahead_equals_waiting(hit_residual):
    """Networks without block hooks (the Nunchaku wrapper): whole model calls are skipped; deciding
    ahead gives the waiting outputs there too."""

    def apply_model(x, sigma, *_rest, **_kw):
        return x - sigma.view(-1, 1, 1, 1) * torch.tanh(x)  # denoised = x - sigma * eps(x)

    outs = {}
    for count in (True, False):
        holder = active(FBCacheHolder(0.5, hit_residual=hit_residual, force_pattern=[False, False, True]))
        holder.begin_run(SCHEDULE, "sample_euler", (1, 4, 4, 4))
        step_done = holder.count_steps() if count else None
        to = {HOLDER_KEY: holder}
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        run = []
        for k, s in enumerate(SCHEDULE[:-1]):
            sigma = torch.tensor([s])
            run.append(
                step_apply_model_wrapper(_Executor(apply_model, None), x, sigma, None, None, None, call_options(to, s))
            )
            x = x * 0.95
            if step_done is not None:
                step_done(k)
        outs[count] = (run, holder.summary())
    assert all(torch.equal(a, b) for a, b in zip(outs[True][0], outs[False][0], strict=True))
    assert outs[True][1]["decided_ahead"] and outs[True][1]["skipped"] == outs[False][1]["skipped"] > 0
