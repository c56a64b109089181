"""First Block Cache 2, CPU, no ComfyUI: Taylor forecasts, first/last-n blocks, calibration, short runs, compile.

Uses the stand-in networks of ``test_fbcache_core.py`` (they drive the hooks the way ComfyUI's
UNet and Flux forwards do).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_fbcache_core import (
    SIGMAS,
    STACKS,
    Flux,
    UNetModel,
    _UNetRun,
    active,
    call_options,
    dit_options,
)
from torch import nn

from speedkit.fbcache import (
    FBCacheHolder,
    cached_span,
    clamp_blocks,
    unet_first_level,
    validate_settings,
)
from speedkit.fbcache.calibration import (
    PLAN_GUARD,
    CallTrace,
    ReplaySettings,
    plan,
    replay,
    sample_stride,
    survival,
)
from speedkit.fbcache.forecast import (
    MAX_FORECAST_GAPS,
    fit_weights,
    lagrange_weights,
    step_position,
    step_weights,
    taylor_weights,
)

# ------------------------------------------------------------------------------------ forecast math


def test_taylor_weights_match_hand_computed_values():
    # order 2 through steps 0, 1, 2: r(3) = r0 - 3 r1 + 3 r2 (the second difference kept constant)
    assert taylor_weights([0.0, 1.0, 2.0], 3.0, 2) == pytest.approx([1.0, -3.0, 3.0])
    # r(4) = 3 r0 - 8 r1 + 6 r2
    assert taylor_weights([0.0, 1.0, 2.0], 4.0, 2) == pytest.approx([3.0, -8.0, 6.0])
    # uneven spacing (steps 0, 2, 3 computed, forecast at 4): the quadratic through those points
    assert taylor_weights([0.0, 2.0, 3.0], 4.0, 2) == pytest.approx([1 / 3, -2.0, 8 / 3])
    # order 1 through steps 1 and 2 at 3.5: r2 + 1.5 (r2 - r1)
    assert taylor_weights([1.0, 2.0], 3.5, 1) == pytest.approx([-1.5, 2.5])
    # order 1 uses only the last two of three points
    assert taylor_weights([0.0, 1.0, 2.0], 3.0, 1) == pytest.approx([0.0, -1.0, 2.0])
    # fewer points than the order needs: the order drops (one point = reuse)
    assert taylor_weights([5.0], 7.0, 2) == pytest.approx([1.0])
    assert taylor_weights([1.0, 2.0], 3.0, 2) == pytest.approx([-1.0, 2.0])


def test_taylor_forecast_reproduces_polynomials_and_is_clamped():
    # a quadratic is forecast exactly by order 2 (the Taylor series with divided-difference derivatives)
    points = [0.0, 1.5, 2.0]

    def f(x):
        return 2.0 - 0.5 * x + 0.25 * x * x

    for x in (2.5, 3.0, 3.4):
        w = taylor_weights(points, x, 2)
        assert sum(wi * f(p) for wi, p in zip(w, points, strict=True)) == pytest.approx(f(x))
    # further than MAX_FORECAST_GAPS last spacings the forecast holds
    far = points[-1] + MAX_FORECAST_GAPS * 0.5
    assert taylor_weights(points, far + 10, 2) == pytest.approx(taylor_weights(points, far, 2))
    # behind the last computed step: no backward extrapolation
    assert taylor_weights(points, 1.0, 2) == pytest.approx([0.0, 0.0, 1.0])
    assert sum(lagrange_weights([0.0, 1.0, 3.0], 7.0)) == pytest.approx(1.0)


def test_fit1_weights_are_the_least_squares_line_of_the_last_three_points():
    # steps 0, 1, 2 -> 3: line fit r(x) = mean + slope (x - 1), slope = (r2 - r0) / 2: w = [-2/3, 1/3, 4/3]
    assert fit_weights([0.0, 1.0, 2.0], 3.0) == pytest.approx([-2 / 3, 1 / 3, 4 / 3])
    # uneven steps 0, 2, 3 -> 5 (hand-computed: mean 5/3, S = 14/3)
    mean, spread = 5 / 3, 14 / 3
    expected = [1 / 3 + (5 - mean) * (p - mean) / spread for p in (0.0, 2.0, 3.0)]
    assert fit_weights([0.0, 2.0, 3.0], 5.0) == pytest.approx(expected)
    # a straight line is forecast exactly; points off a line are not followed exactly (smoothing)
    points = [1.0, 4.0, 6.0, 9.0]
    for x in (9.0, 10.5, 12.0):
        w = fit_weights(points, x)
        assert w[0] == 0.0  # only the last three points
        assert sum(wi * (3.0 - 0.5 * p) for wi, p in zip(w, points, strict=True)) == pytest.approx(3.0 - 0.5 * x)
    bumpy = [0.0, 1.0, 0.0]
    assert sum(wi * y for wi, y in zip(fit_weights([0.0, 1.0, 2.0], 2.0), bumpy, strict=True)) == pytest.approx(1 / 3)
    # two points: the line through them (taylor1); one: reuse; clamped like the Taylor forecasts
    assert fit_weights([1.0, 2.0], 3.5) == pytest.approx(taylor_weights([1.0, 2.0], 3.5, 1))
    assert fit_weights([5.0], 9.0) == pytest.approx([1.0])
    far = 2.0 + MAX_FORECAST_GAPS * 1.0
    assert fit_weights([0.0, 1.0, 2.0], far + 5) == pytest.approx(fit_weights([0.0, 1.0, 2.0], far))
    assert step_weights("fit1", [0.0, 1.0, 2.0], 3.0) == fit_weights([0.0, 1.0, 2.0], 3.0)
    assert step_weights("taylor2", [0.0, 1.0, 2.0], 3.0) == taylor_weights([0.0, 1.0, 2.0], 3.0, 2)


def test_step_position_on_a_schedule():
    schedule = [10.0, 6.0, 4.0, 1.0, 0.0]
    assert step_position(schedule, 10.0) == 0.0
    assert step_position(schedule, 4.0) == 2.0
    assert step_position(schedule, 5.0) == pytest.approx(1.5)  # a second Heun evaluation between steps
    assert step_position(schedule, 20.0) == 0.0 and step_position(schedule, -1.0) == 4.0


def _schedule_holder(**kwargs) -> FBCacheHolder:
    holder = active(FBCacheHolder(0.5, **kwargs))
    holder.begin_run([*SIGMAS, 0.0], "sample_euler", (1, 6, 8))
    return holder


def _trace(model: Flux, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> dict:
    """Residuals of the blocks after double block 0, per stack (as test_fbcache_core._trace_flux)."""
    i, t = img + torch.tanh(model.double_blocks[0](img) + vec), txt + torch.tanh(model.double_txt[0](txt))
    i1, t1 = i, t
    for bi, bt in zip(model.double_blocks[1:], model.double_txt[1:], strict=True):
        i, t = i + torch.tanh(bi(i) + vec), t + torch.tanh(bt(t))
    x0 = torch.cat([t, i], 1)
    x = x0
    for b in model.single_blocks:
        x = x + torch.tanh(b(x) + vec)
    return {"d_img": i - i1, "d_txt": t - t1, "s": x - x0}


def _hit(model: Flux, img, txt, vec, residuals: dict) -> torch.Tensor:
    i = img + torch.tanh(model.double_blocks[0](img) + vec) + residuals["d_img"]
    t = txt + torch.tanh(model.double_txt[0](txt)) + residuals["d_txt"]
    x = torch.cat([t, i], 1) + residuals["s"]
    return model.final(x[:, txt.shape[1] :])


@pytest.mark.parametrize(("hit_residual", "order"), [("taylor1", 1), ("taylor2", 2)])
@pytest.mark.parametrize("mode", ["tail", "per_block"])
@torch.no_grad()
def test_taylor_hit_residual_formula_under_forced_hits(hit_residual, order, mode):
    """A hit adds sum_i w_i r_i over the last order+1 computed calls, w = the Taylor/Lagrange weights in
    the step index of the run's schedule; hand-computed for the calls of this pattern."""
    torch.manual_seed(0)
    flux = Flux().eval()
    img, txt = torch.randn(1, 6, 8), torch.randn(1, 2, 8)
    holder = _schedule_holder(
        cache_mode=mode, force_pattern=[False, False, False, True, True, False], hit_residual=hit_residual
    )
    to = dit_options(holder)
    outs, traces = [], []
    for k, s in enumerate(SIGMAS):
        vec = torch.full((1, 1, 8), s / 10)
        x = img + 0.02 * k
        outs.append(flux(x, txt, vec, call_options(to, s)))
        traces.append(_trace(flux, x, txt, vec))
    expected_weights = {
        ("taylor2", 3): [1.0, -3.0, 3.0],  # steps 0, 1, 2 -> 3
        ("taylor2", 4): [3.0, -8.0, 6.0],  # steps 0, 1, 2 -> 4
        ("taylor1", 3): [-1.0, 2.0],  # steps 1, 2 -> 3
        ("taylor1", 4): [-2.0, 3.0],  # steps 1, 2 -> 4
    }
    for k in (3, 4):
        w = expected_weights[(hit_residual, k)]
        used = traces[3 - len(w) : 3]
        residuals = {key: sum(wi * t[key] for wi, t in zip(w, used, strict=True)) for key in used[0]}
        vec = torch.full((1, 1, 8), SIGMAS[k] / 10)
        torch.testing.assert_close(outs[k], _hit(flux, img + 0.02 * k, txt, vec, residuals), rtol=1e-5, atol=1e-5)
    assert holder.summary()["skipped"] == 2
    assert order == {"taylor1": 1, "taylor2": 2}[hit_residual]


@torch.no_grad()
def test_taylor_keeps_order_plus_one_residuals():
    holder = _schedule_holder(force_pattern=[False], hit_residual="taylor2")
    for s in SIGMAS:
        holder.begin_call({"cond_or_uncond": [0], "sigmas": torch.tensor([s])})
        holder.decide(torch.randn(1, 4))
        holder.store("tail", {"h": torch.ones(1, 4) * s})
        holder.finish_compute()
    history = holder._stores[(0,)]["tail"]
    assert [h.sigma for h in history] == SIGMAS[-3:]
    one = torch.ones(1, 4).untyped_storage().nbytes()
    # three residuals, and three first-block references (the decision compares with their forecast)
    assert holder.memory_bytes() == 3 * one + 3 * one


@torch.no_grad()
def test_unet_taylor_forecast_formula():
    """UNet tail residual forecast: out(h1 + sum_i w_i R_i) on the hit."""
    torch.manual_seed(0)
    model = UNetModel().eval()
    x = torch.randn(1, 4, 8, 8)
    holder = _schedule_holder(force_pattern=[False, False, False, True], hit_residual="taylor2")
    run = _UNetRun(holder)
    captured = []
    handle = model.out.register_forward_pre_hook(lambda m, a: captured.append(a[0]))

    def h1_of(inp, sigma):
        h0 = model.input_blocks[0](inp)
        return h0 + torch.tanh(model.input_blocks[1](h0) + sigma / 10)

    tails = []
    for k in range(3):
        run(model, x * (1 - 0.1 * k), SIGMAS[k])
        tails.append(captured[-1] - h1_of(x * (1 - 0.1 * k), SIGMAS[k]))
    out = run(model, x * 0.7, SIGMAS[3])
    handle.remove()
    expected = model.out(h1_of(x * 0.7, SIGMAS[3]) + tails[0] - 3 * tails[1] + 3 * tails[2])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert model.calls["middle"] == 3


# ------------------------------------------------------------------------------------ first / last n blocks


def test_cached_span_and_clamping():
    stacks = (("double_block", 3), ("single_block", 3))
    assert cached_span(stacks, "double_block", 1, 0) == (1, 3)
    assert cached_span(stacks, "single_block", 1, 0) == (0, 3)
    assert cached_span(stacks, "double_block", 2, 1) == (2, 3)
    assert cached_span(stacks, "single_block", 2, 1) == (0, 2)
    assert cached_span(stacks, "double_block", 3, 4) is None and cached_span(stacks, "single_block", 3, 4) is None
    assert cached_span(stacks, "single_block", 3, 3) is None
    assert clamp_blocks(stacks, 2, 1) == (2, 1, "")
    f, b, why = clamp_blocks(stacks, 5, 0)
    assert (f, b) == (3, 0) and "first stack" in why
    f, b, why = clamp_blocks(stacks, 3, 3)
    assert (f, b) == (3, 2) and "left to cache" in why


class _Counting:
    """Counts forward calls of every Linear of a stand-in Flux by (kind, index)."""

    def __init__(self, flux: Flux) -> None:
        self.calls: dict[tuple[str, int], int] = {}
        for kind, blocks in (("double_block", flux.double_blocks), ("single_block", flux.single_blocks)):
            for i, block in enumerate(blocks):
                block.register_forward_pre_hook(lambda *_, key=(kind, i): self._add(key))

    def _add(self, key) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1


@pytest.mark.parametrize(("n_first", "n_last"), [(1, 0), (2, 0), (1, 1), (2, 1), (3, 2)])
@pytest.mark.parametrize("mode", ["tail", "per_block"])
@torch.no_grad()
def test_first_and_last_n_blocks_run_on_hits_and_only_they(n_first, n_last, mode):
    """On a hit exactly the first n_first and the last n_last blocks run; the decision uses the first
    n_first blocks' residual; the output equals the blocks recomputed by hand around the cached span."""
    torch.manual_seed(0)
    flux = Flux().eval()
    counting = _Counting(flux)
    img, txt = torch.randn(1, 6, 8), torch.randn(1, 2, 8)
    holder = active(FBCacheHolder(0.5, cache_mode=mode, force_pattern=[False, True], n_first=n_first, n_last=n_last))
    to = dit_options(holder)
    vec0, vec1 = torch.full((1, 1, 8), 0.9), torch.full((1, 1, 8), 0.7)
    flux(img, txt, vec0, call_options(to, 9.0))
    after_miss = dict(counting.calls)
    assert all(after_miss[(k, i)] == 1 for k, n in STACKS for i in range(n))
    hit = flux(img + 0.05, txt, vec1, call_options(to, 7.0))
    order = [(k, i) for k, n in STACKS for i in range(n)]
    ran = [key for key in order if counting.calls[key] == 2]
    assert ran == order[:n_first] + order[len(order) - n_last :]
    assert holder.summary()["skipped"] == 1

    # expected: head blocks on the new input, cached span residuals from the computed call, tail blocks recomputed
    def run(img_, vec, span_residual=None):
        i, t, residuals = img_, txt, {}
        for idx, (bi, bt) in enumerate(zip(flux.double_blocks, flux.double_txt, strict=True)):
            key = ("double_block", idx)
            in_span = n_first <= order.index(key) < len(order) - n_last
            if span_residual is not None and in_span:
                i, t = i + span_residual[key][0], t + span_residual[key][1]
                continue
            ni, nt = i + torch.tanh(bi(i) + vec), t + torch.tanh(bt(t))
            residuals[key] = (ni - i, nt - t)
            i, t = ni, nt
        x = torch.cat([t, i], 1)
        for idx, b in enumerate(flux.single_blocks):
            key = ("single_block", idx)
            in_span = n_first <= order.index(key) < len(order) - n_last
            if span_residual is not None and in_span:
                x = x + span_residual[key]
                continue
            nx = x + torch.tanh(b(x) + vec)
            residuals[key] = nx - x
            x = nx
        return flux.final(x[:, txt.shape[1] :]), residuals

    _, residuals = run(img, vec0)
    expected, _ = run(img + 0.05, vec1, residuals)
    torch.testing.assert_close(hit, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_decision_uses_the_first_n_blocks_residual():
    torch.manual_seed(0)
    flux = Flux().eval()
    img, txt = torch.randn(1, 6, 8), torch.randn(1, 2, 8)
    seen = []
    holder = active(FBCacheHolder(0.5, force_pattern=[False], n_first=2))
    original = holder.decide
    holder.decide = lambda r: seen.append(r.clone()) or original(r)  # instance attribute: this holder only
    vec = torch.full((1, 1, 8), 0.9)
    flux(img, txt, vec, call_options(dit_options(holder), 9.0))
    i = img
    for bi in flux.double_blocks[:2]:
        i = i + torch.tanh(bi(i) + vec)
    torch.testing.assert_close(seen[0], i - img)


class _Downsample(nn.Conv2d):
    pass


_Downsample.__name__ = "Downsample"


def test_unet_first_level_stops_before_the_first_downsampling():
    net = nn.Module()
    net.input_blocks = nn.ModuleList(
        [nn.Conv2d(4, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 3)), nn.Sequential(nn.Conv2d(8, 8, 3))]
        + [nn.Sequential(_Downsample(8, 8, 3, stride=2)), nn.Sequential(nn.Conv2d(8, 8, 3))]
    )
    assert unet_first_level(net) == 2


class FlatUNet(UNetModel):
    """The stand-in UNet without its downsampling: input blocks 1 and 2 both keep the full resolution."""

    def __init__(self):
        super().__init__()
        self.input_blocks[2] = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = 1


@torch.no_grad()
def test_unet_decides_after_input_block_n_first():
    """n_first=2 on a UNet: the residual of input blocks 1-2 decides, the tail starts after block 2:
    a hit is out(h2 + cached residual)."""
    torch.manual_seed(0)
    model = FlatUNet().eval()
    seen = []
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True], n_first=2))
    original = holder.decide
    holder.decide = lambda r: seen.append(r.clone()) or original(r)
    run = _UNetRun(holder)
    x = torch.randn(1, 4, 8, 8)

    def h2_of(inp, sigma):
        h0 = model.input_blocks[0](inp)
        h1 = h0 + torch.tanh(model.input_blocks[1](h0) + sigma / 10)
        return h0, model.input_blocks[2](h1)

    captured = []
    handle = model.out.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    run(model, x, 5.0)
    out = run(model, x * 0.9, 4.0)
    handle.remove()
    h0, h2 = h2_of(x, 5.0)
    torch.testing.assert_close(seen[0], h2 - h0)
    assert model.calls["middle"] == 1
    torch.testing.assert_close(out, model.out(h2_of(x * 0.9, 4.0)[1] + captured[0] - h2), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ short runs


def test_runs_shorter_than_min_steps_are_not_cached(caplog):
    holder = active(FBCacheHolder(0.5, min_steps=8))
    with caplog.at_level(logging.INFO):
        assert holder.begin_run([float(s) for s in range(4, -1, -1)], "sample_euler", (1, 4, 8, 8)) == "off"
    assert not holder.active
    assert "4 steps, fewer than min_steps 8" in caplog.text and "min_steps to 0" in holder.summary_text()
    on = active(FBCacheHolder(0.5, min_steps=8))
    assert on.begin_run([float(s) for s in range(8, -1, -1)], "sample_euler", (1, 4, 8, 8)) == "manual"
    assert on.active
    forced = active(FBCacheHolder(0.5, min_steps=0))
    assert forced.begin_run([1.0, 0.0], "sample_euler", ()) == "manual" and forced.active


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_first": 0}, "n_first=0"),
        ({"n_last": -1}, "n_last=-1"),
        ({"min_steps": -2}, "min_steps=-2"),
        ({"target_speedup": 0.5}, "target_speedup=0.5"),
        ({"target_speedup": float("nan")}, "target_speedup=nan"),
        ({"target_psnr": -3.0}, "target_psnr=-3.0"),
        ({"hit_residual": "taylor3"}, "hit_residual='taylor3'"),
    ],
)
def test_new_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_settings(0.1, 0.0, 1.0, 2, "tail", **{"hit_residual": "reuse", **kwargs})


# ------------------------------------------------------------------------------------ calibration


def _calibrated_run(
    target_speedup: float = 0.0,
    target_psnr: float = 0.0,
    hit_residual: str = "taylor2",
    sampler: str = "sample_euler",
    flow: bool = False,
    cfg: float = 1.0,
):
    """Two sampling runs of the stand-in Flux on identical inputs: the first calibrates, the second uses it."""
    torch.manual_seed(0)
    flux = Flux().eval()
    img, txt = torch.randn(1, 6, 8), torch.randn(1, 2, 8)
    template = FBCacheHolder(
        0.1,
        hit_residual=hit_residual,
        max_consecutive_hits=3,
        target_speedup=target_speedup,
        target_psnr=target_psnr,
    )
    template.flow = flow
    sigmas = [14.0 * (1 - k / 12) ** 2 for k in range(12)] + [0.0]
    summaries = []
    for _ in range(2):
        holder = active(template.clone())
        holder.cfg = cfg  # as the adapter sets it from the guider, per run
        mode = holder.begin_run(sigmas, sampler, (1, 6, 8))
        to = dit_options(holder)
        for k, s in enumerate(sigmas[:-1]):
            vec = torch.full((1, 1, 8), s / 14)
            flux(img + 0.01 * k, txt, vec, call_options(to, s))
        holder.value_range = 4.0
        holder.finish_calibration(holder.value_range)
        summaries.append((mode, holder.summary(), holder.summary_text(), holder.calibration))
    return template, summaries


def test_calibration_plans_the_steps_for_the_speed_and_the_plan_is_reused():
    template, ((mode1, s1, text1, cal1), (mode2, s2, text2, cal2)) = _calibrated_run(target_speedup=2.0)
    assert mode1 == "calibrating" and mode2 == "calibrated"
    assert s1["skipped"] == 0  # the calibration run computes every call
    assert cal1 is cal2 and len(template.calibrations) == 1
    assert cal1.reached and cal1.speedup >= 2.0 and cal1.plan
    assert len(cal1.plan) == cal1.computed == 6  # 12 steps at 2.0x: the fewest computed steps that reach it
    # same inputs: the live run computed exactly the planned steps
    assert s2["computed"] == cal1.computed and s2["computed"] + s2["skipped"] == cal1.total
    assert s2["threshold"] == cal1.threshold  # the plan's guard
    assert "calibration run, every step computed; chose plan computing steps 0, " in text1
    assert "calibrated plan computing steps" in text2


def test_calibration_is_deterministic():
    _, first = _calibrated_run(target_speedup=2.5)
    _, second = _calibrated_run(target_speedup=2.5)
    assert first[0][3] == second[0][3]


def test_quality_target_trades_speed_for_estimated_psnr():
    _, fast = _calibrated_run(target_speedup=4.0)
    _, careful = _calibrated_run(target_psnr=60.0)
    fast_cal, careful_cal = fast[0][3], careful[0][3]
    assert careful_cal.psnr >= 60.0 or not careful_cal.reached
    assert careful_cal.speedup <= fast_cal.speedup
    _, both = _calibrated_run(target_speedup=4.0, target_psnr=60.0)
    assert both[0][3].psnr >= 60.0 or not both[0][3].reached


def test_quality_target_under_strong_guidance_carries_a_caveat(caplog):
    with caplog.at_level(logging.WARNING, logger="speedkit.fbcache"):
        _, ((_, _, text1, cal), (_, _, text2, _)) = _calibrated_run(
            target_psnr=40.0, sampler="sample_dpmpp_2m", flow=True, cfg=3.0
        )
    assert "at CFG 3 with dpmpp_2m, which reuses earlier predictions, on a flow model" in cal.caveat
    assert cal.caveat in text1 and cal.caveat in text2  # the calibration run's report and every later one
    assert sum("estimated PSNR is likely too high" in r.getMessage() for r in caplog.records) == 1
    for kwargs, where in (({"sampler": "sample_euler", "flow": True, "cfg": 4.0}, "at CFG 4 on a flow model"),):
        _, ((_, _, text, other), _) = _calibrated_run(target_psnr=40.0, **kwargs)
        assert where in other.caveat and other.caveat in text, kwargs


def test_quality_target_where_the_estimate_held_carries_no_caveat():
    """The estimate held (or was low) in the benchmark up to CFG 2 with multistep samplers on flow
    models, 3 with single-step ones, and at every scale measured (3-7) on noise-prediction models; a
    speed target does not rest on the estimate at all."""
    for kwargs in (
        {"target_psnr": 40.0, "sampler": "sample_dpmpp_2m", "flow": True, "cfg": 2.0},
        {"target_psnr": 40.0, "sampler": "sample_dpmpp_2m", "flow": True, "cfg": 1.0},
        {"target_psnr": 40.0, "sampler": "sample_euler", "flow": True, "cfg": 3.0},
        {"target_psnr": 40.0, "sampler": "sample_dpmpp_2m", "flow": False, "cfg": 5.0},
        {"target_psnr": 40.0, "sampler": "sample_dpmpp_2m", "flow": False, "cfg": 7.0},
        {"target_speedup": 2.0, "sampler": "sample_dpmpp_2m", "flow": True, "cfg": 5.0},
    ):
        _, ((_, _, text, other), _) = _calibrated_run(**kwargs)
        assert other.caveat == "" and "likely too high" not in text, kwargs


def test_unreachable_target_takes_the_fastest_threshold_and_says_so():
    _, ((_, _, text, cal), _) = _calibrated_run(target_speedup=19.0)
    assert not cal.reached and "out of reach" in text


def test_replay_follows_the_decision_rule():
    """Hand-made traces: every call changes by 1 % relative: threshold 0.015 skips until the
    distance to the last computed call passes it (two calls later), max_consecutive_hits applies."""
    base = torch.ones(100)
    calls = [
        CallTrace(
            ("c",),
            sigma=10.0 - k,
            step=float(k),
            dsigma=1.0,
            decision={"c": base * (1 + 0.01 * k)},
            span={"c": base * k},
            output_rms={"c": torch.tensor(1.0)},
        )
        for k in range(10)
    ]
    settings = ReplaySettings(-1, math.inf, -math.inf, "reuse")
    r = replay(calls, 0.015, settings, keep=1)
    # computed at 0, hit 1 (0.01 < 0.015), computed 2 (0.02), hit 3, computed 4, ...
    assert (r.computed, r.total) == (5, 10)
    limited = replay(calls, 0.5, ReplaySettings(2, math.inf, -math.inf, "reuse"), keep=1)
    assert limited.computed == 4  # computed 0, 3, 6, 9
    # a linear span residual is forecast exactly by taylor1: no estimated error once two points are known
    linear = replay(calls, 0.5, ReplaySettings(2, math.inf, -math.inf, "taylor1"), keep=2)
    reuse = replay(calls, 0.5, ReplaySettings(2, math.inf, -math.inf, "reuse"), keep=1)
    assert linear.error < reuse.error


def _traces(n: int = 10, jump_at: int | None = None, output_jump_at: int | None = None, sigma0: float = 10.0):
    """Hand-made traces of ``n`` steps: span residual and prediction move on straight lines (a
    first-order forecast is exact), except a jump of the span at ``jump_at`` or of the prediction
    alone at ``output_jump_at``."""
    base = torch.ones(64)
    calls = []
    for k in range(n):
        span = base * k + (5.0 if k == jump_at else 0.0)
        out = base * (0.5 * k) + (5.0 if k == output_jump_at else 0.0)
        calls.append(
            CallTrace(
                ("c",),
                sigma=sigma0 - k,
                step=float(k),
                dsigma=1.0,
                decision={"c": base * (1 + 0.01 * k)},
                span={"c": span},
                output_rms={"c": out.pow(2).mean().sqrt()},
                output={"c": out},
            )
        )
    return calls


def test_plan_computes_the_step_a_forecast_would_miss():
    settings = ReplaySettings(-1, math.inf, -math.inf, "taylor1")
    smooth = plan(_traces(), settings, 2, 2.0, target_speedup=2.0)
    assert smooth.reached and smooth.computed == 5 and smooth.plan[0] == 0.0
    assert math.isinf(smooth.psnr)  # straight lines: every forecast exact
    for jump in (4, 7):
        cal = plan(_traces(jump_at=jump), settings, 2, 2.0, target_speedup=2.0)
        assert float(jump) in cal.plan, (jump, cal.plan)
        assert cal.computed == 5
        skipping_it = replay(_traces(jump_at=jump), math.inf, settings, 2, plan=frozenset(range(0, 10, 2)) - {jump})
        assert cal.psnr > skipping_it.psnr(2.0)
    # a jump of the prediction alone (the span stays on its line) is seen too: the output-space estimate
    cal = plan(_traces(output_jump_at=6), settings, 2, 2.0, target_speedup=2.0)
    assert 6.0 in cal.plan
    # deterministic
    assert plan(_traces(jump_at=4), settings, 2, 2.0, target_speedup=2.0) == plan(
        _traces(jump_at=4), settings, 2, 2.0, target_speedup=2.0
    )


def test_plan_respects_the_window_max_hits_and_quality():
    traces = _traces(n=12, jump_at=5)
    limited = plan(traces, ReplaySettings(1, math.inf, -math.inf, "taylor1"), 2, 2.0, target_speedup=4.0)
    positions = sorted(limited.plan)
    assert max(b - a for a, b in zip(positions, positions[1:], strict=False)) <= 2  # at most 1 skip in a row
    assert not limited.reached  # 4x needs runs of 3 skips
    # outside the window (sigma above start_sigma: the first 3 steps) everything is computed
    windowed = plan(traces, ReplaySettings(-1, 7.5, -math.inf, "taylor1"), 2, 2.0, target_speedup=2.0)
    assert {0.0, 1.0, 2.0} <= set(windowed.plan)
    # quality only: skips until the next would pass the estimated PSNR; reuse (order 0) errs on every skip
    reuse = ReplaySettings(-1, math.inf, -math.inf, "reuse")
    careful = plan(traces, reuse, 1, 2.0, target_psnr=20.0)
    loose = plan(traces, reuse, 1, 2.0, target_psnr=5.0)
    assert careful.psnr >= 20.0 and loose.psnr >= 5.0 and careful.reached and loose.reached
    assert careful.speedup < loose.speedup


def _random_traces(n: int, keys=(0, 1), seed: int = 0) -> list[CallTrace]:
    g = torch.Generator().manual_seed(seed)

    def sample() -> dict:
        return {k: torch.randn(256, generator=g) for k in keys}

    return [
        CallTrace(
            tuple(keys),
            sigma=1 - k / n,
            step=float(k),
            dsigma=1 / n,
            decision=sample(),
            span=sample(),
            output_rms={k: torch.tensor(1.0) for k in keys},
            output=sample(),
            guidance={k: i for i, k in enumerate(keys)},
        )
        for k in range(n)
    ]


def test_plan_is_the_least_estimated_error_and_never_stuck_by_the_run_limit():
    """Noise-like traces (every skip costs about the same): a plan for 3x with at most 2 skips in a row
    must compute exactly every third step; and for a short run the search's plan has the least
    estimated error of all plans with that many computed steps (brute force)."""
    settings = ReplaySettings(2, math.inf, -math.inf, "taylor1", True, True, 5.0)
    cal = plan(_random_traces(30), settings, 2, 2.0, target_speedup=3.0)
    assert cal.reached and cal.computed == 20 and cal.total == 60 and len(cal.plan) == 10

    import itertools

    from speedkit.fbcache import calibration as cm

    traces = _random_traces(9, seed=3)
    steps = cm._steps_of(traces)
    errors = cm._PlanErrors(steps, settings)

    def cost(chosen: set[int]) -> float:
        history, run, total = [], 0, 0.0
        for i in range(len(steps)):
            if i in chosen:
                history, run = [*history, i][-2:], 0
                continue
            run += 1
            if run > 2:
                return math.inf
            total += errors(i, tuple(history))
        return total

    plans = cm._best_plans(steps, errors, 2, {0}, 2)
    for m in range(3, 9):
        brute = min(cost({0, *rest}) for rest in itertools.combinations(range(1, 9), m - 1))
        assert plans[m][0] == pytest.approx(brute), m
        assert cost(set(plans[m][1])) == pytest.approx(brute) and len(plans[m][1]) == m


def test_planned_skip_is_computed_when_the_content_is_far_from_the_calibration():
    """The guard: a later run whose first-blocks distance at a planned skip exceeds PLAN_GUARD times
    the calibration's largest is computed there."""
    settings = ReplaySettings(-1, math.inf, -math.inf, "taylor1")
    traces = _traces()
    cal = plan(traces, settings, 2, 2.0, target_speedup=2.0)
    calm = replay(traces, cal.threshold, settings, 2, plan=frozenset(cal.plan))
    assert calm.computed == cal.computed
    assert cal.threshold == pytest.approx(PLAN_GUARD * calm.max_distance)
    rough = _traces()
    for k, call in enumerate(rough):
        call.decision["c"] = call.decision["c"] * (1 + 0.05 * k * k)  # the first block moves far more
    assert replay(rough, cal.threshold, settings, 2, plan=frozenset(cal.plan)).computed > cal.computed


def test_sampling_helpers():
    assert sample_stride(10) == 1
    stride = sample_stride(4 * 65536 * 8)
    assert stride % 2 and stride % 3 and stride % 5 and stride % 7
    assert survival(0.0, False) == 1.0 and survival(10.0, False) < 0.1 and survival(0.5, True) > 1.0


# ------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("hit_residual", ["reuse", "extrapolate", "taylor2"])
def test_cached_sampling_does_not_recompile_under_torch_compile(hit_residual):
    """The stand-in Flux compiled (eager backend) runs hits and misses, forecasts with a new step every
    call, first/last-n blocks and a calibration run: after a warm-up run nothing is recompiled."""
    import torch._dynamo

    torch.manual_seed(0)
    flux = Flux().eval()
    img, txt = torch.randn(1, 6, 8), torch.randn(1, 2, 8)
    compiled = torch.compile(flux, backend="eager")
    sigmas = [*SIGMAS, 0.0]

    def sampling_run(holder: FBCacheHolder, scale: float) -> None:
        active(holder)
        holder.begin_run(sigmas, "sample_euler", (1, 6, 8))
        to = dit_options(holder)
        for k, s in enumerate(SIGMAS):
            vec = torch.full((1, 1, 8), s / 10)
            compiled(img * scale + 0.02 * k, txt, vec, call_options(to, s))
        holder.finish_calibration(2.0)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            sampling_run(FBCacheHolder(0.5, force_pattern=[False, True], hit_residual=hit_residual), 1.0)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for pattern in ([False, False, True], [False, True, True, False]):
                    sampling_run(FBCacheHolder(0.5, force_pattern=pattern, hit_residual=hit_residual), 0.9)
                sampling_run(
                    FBCacheHolder(0.5, hit_residual=hit_residual, n_first=2, n_last=1, force_pattern=[False, True]), 1.1
                )
                target = FBCacheHolder(0.1, hit_residual=hit_residual, target_speedup=1.5)
                sampling_run(target, 1.0)  # calibration run
                sampling_run(target.clone(), 1.2)  # calibrated run
    finally:
        torch._dynamo.reset()


def test_taylor_decisions_compare_with_the_first_blocks_forecast():
    """taylor1/2: the first blocks' residual is compared with its own forecast from the last computed
    calls, so a residual that moves along a straight line keeps hitting; reuse compares with the last
    computed residual and recomputes."""

    def run(hit_residual: str) -> list[bool]:
        holder = _schedule_holder(hit_residual=hit_residual, max_consecutive_hits=-1)
        holder.threshold = 0.01
        decisions = []
        for k, s in enumerate(SIGMAS):
            holder.begin_call({"cond_or_uncond": [0], "sigmas": torch.tensor([s])})
            hit = holder.decide(torch.ones(1, 8) * (1.0 + 0.1 * k))
            if not hit:
                holder.store("tail", {"h": torch.zeros(1, 8)})
                holder.finish_compute()
            holder.end_call()
            decisions.append(hit)
        return decisions

    # exact linear forecast after two computed calls, up to MAX_FORECAST_GAPS (3) spacings ahead, then it holds
    assert run("taylor1") == [False, False, True, True, True, False]
    assert run("reuse") == [False] * len(SIGMAS)  # a 10 % step is above the threshold every time
    assert not FBCacheHolder(0.1, hit_residual="taylor1", forecast_decision=False).forecast_decision
