"""The quality check of ``target_psnr`` (fbcache/quality_check.py): plans chosen by measured runs.

The search is driven by a real :class:`PlanSearch` on recorded traces; ``measure`` stands for the
sampling run, returning the candidate's estimate shifted by a known amount (an estimate that is
too high, exact or too low), so each test knows which plan must come out.
"""

from __future__ import annotations

import math

import torch
from test_fbcache_core import Flux, active, call_options, dit_options
from test_fbcache_forecast import _random_traces

from speedkit.fbcache import FBCacheHolder, measured_psnr
from speedkit.fbcache.calibration import PlanSearch, ReplaySettings
from speedkit.fbcache.quality_check import CHECK_MARGIN_DB, MAX_CHECKS, check_plans

SETTINGS = ReplaySettings(2, math.inf, -math.inf, "taylor1", True, True, 5.0)


def _search() -> PlanSearch:
    return PlanSearch(_random_traces(30), SETTINGS, 2, 2000.0)  # a peak that puts the estimates near 50 dB


def _estimated_middle(search: PlanSearch) -> float:
    """A target inside the estimates' range (the plan for it skips some steps, not all it could)."""
    skipping = [c for c in search.counts if c < search.all_steps]
    return search.psnr(skipping[len(skipping) // 2])


def _measure_shifted(shift: float, log: list):
    def measure(candidate):
        log.append(candidate)
        return candidate.psnr - shift

    return measure


def test_an_exact_estimate_is_checked_once_and_kept():
    search = _search()
    target = _estimated_middle(search)
    runs: list = []
    chosen, records = check_plans(search, 0.0, target, _measure_shifted(0.0, runs))
    assert len(runs) == 1 and len(records) == 1
    assert chosen.plan == search.choose(0.0, target).plan
    assert chosen.measured_psnr == records[0].measured >= target and chosen.reached
    assert "kept the fastest plan that held" in chosen.checks


def test_a_too_optimistic_estimate_gets_a_slower_plan_that_holds():
    search = _search()
    target = _estimated_middle(search)
    runs: list = []
    chosen, records = check_plans(search, 0.0, target, _measure_shifted(6.0, runs))
    assert records[0].measured < target  # the estimate's own choice missed
    assert chosen.measured_psnr >= target and chosen.reached
    assert chosen.computed > search.choose(0.0, target).computed  # more computed steps
    # the next plan is the fastest whose estimate clears target + miss + margin
    bar = target + 6.0 + CHECK_MARGIN_DB
    expected = min(c for c in search.counts if c < search.all_steps and search.psnr(c) >= bar)
    assert records[1].count == expected and len(records) == 2
    assert chosen.plan == search.calibration(expected).plan


def test_a_too_pessimistic_estimate_under_a_quality_target_alone_gets_a_faster_plan():
    search = _search()
    target = _estimated_middle(search)
    runs: list = []
    chosen, records = check_plans(search, 0.0, target, _measure_shifted(-8.0, runs))
    first = search.choose_count(0.0, target)
    assert records[0].count == first and records[0].measured >= target
    faster = min(c for c in search.counts if search.psnr(c) >= target - 8.0)
    assert faster < first and records[1].count == faster
    assert chosen.computed < search.choose(0.0, target).computed and chosen.measured_psnr >= target
    assert chosen.speedup > search.choose(0.0, target).speedup


def test_with_a_speed_target_too_a_plan_that_holds_is_not_made_faster():
    search = _search()
    speed = search.speedup(search.choose_count(0.0, _estimated_middle(search)))
    target = _estimated_middle(search) - 20.0  # easily held
    runs: list = []
    chosen, records = check_plans(search, speed, target, _measure_shifted(-8.0, runs))
    assert len(records) == 1 and chosen.plan == search.choose(speed, target).plan


def test_when_no_plan_holds_every_step_is_computed_and_the_report_says_so():
    search = _search()
    target = _estimated_middle(search)
    runs: list = []
    chosen, records = check_plans(search, 0.0, target, lambda c: runs.append(c) or -math.inf)
    assert len(records) == len(runs) <= MAX_CHECKS
    assert chosen.computed == chosen.total and math.isinf(chosen.psnr)
    assert chosen.measured_psnr == math.inf  # nothing skipped: identical to the uncached run
    assert "every step is computed" in chosen.checks and chosen.describe().count("no skipped step") == 1


def test_the_checks_stop_at_the_limit():
    search = _search()
    target = _estimated_middle(search)
    runs: list = []
    check_plans(search, 0.0, target, _measure_shifted(3.0, runs), max_checks=1)
    assert len(runs) == 1


def test_a_check_run_that_fails_leaves_the_estimate_to_decide():
    search = _search()
    assert check_plans(search, 0.0, _estimated_middle(search), lambda c: None) is None
    # a later failure after a plan held keeps the plan that held
    results = iter([100.0, None])
    chosen, records = check_plans(search, 0.0, _estimated_middle(search), lambda c: next(results))
    assert len(records) == 1 and chosen.measured_psnr == 100.0


def test_checks_are_deterministic():
    search = _search()
    target = _estimated_middle(search)
    a = check_plans(search, 0.0, target, _measure_shifted(4.0, []))
    b = check_plans(_search(), 0.0, target, _measure_shifted(4.0, []))
    assert a == b


def test_measured_psnr_uses_the_given_peak():
    ref = torch.zeros(2, 4, 8, 8)
    out = ref + 0.1
    assert abs(measured_psnr(ref, out, 2.0) - 20 * math.log10(2.0 / 0.1)) < 1e-4
    assert abs(measured_psnr(ref, out, 4.0) - measured_psnr(ref, out, 2.0) - 20 * math.log10(2)) < 1e-4
    assert measured_psnr(ref, ref.clone(), 2.0) == math.inf
    assert measured_psnr(ref, torch.zeros(1, 4, 8, 8), 2.0) is None
    assert measured_psnr(ref, out * math.nan, 2.0) == -math.inf


# ----------------------------------------------------------------------------- through the holder


def _flux_run(holder, flux, img, txt, sigmas) -> torch.Tensor:
    """One sampling-like run of the stand-in Flux: the last call's output stands for the final latent."""
    to = dit_options(holder)
    out = None
    for k, s in enumerate(sigmas[:-1]):
        vec = torch.full((1, 1, 8), s / 14)
        out = flux(img + 0.01 * k, txt, vec, call_options(to, s))
    return out


def test_the_holder_checks_its_plan_with_runs_that_leave_no_calibration_behind(caplog):
    torch.manual_seed(0)
    flux = Flux().eval()
    img, txt = torch.randn(1, 6, 8), torch.randn(1, 2, 8)
    sigmas = [14.0 * (1 - k / 12) ** 2 for k in range(12)] + [0.0]
    template = FBCacheHolder(0.1, hit_residual="taylor2", max_consecutive_hits=3, target_psnr=40.0)
    template.flow = True
    holder = active(template.clone())
    assert holder.begin_run(sigmas, "sample_euler", (1, 6, 8)) == "calibrating"
    reference = _flux_run(holder, flux, img, txt, sigmas)
    trials = []

    def measure(candidate):
        trial = holder.trial(candidate)
        trials.append(trial)
        assert trial.run_mode == "calibrated" and trial.calibration is candidate
        out = _flux_run(trial, flux, img, txt, sigmas)
        trials[-1] = (trial.summary(), candidate)
        trial.reset()
        return measured_psnr(reference, out, 4.0)

    with caplog.at_level("INFO", logger="speedkit.fbcache"):
        cal = holder.finish_calibration(4.0, measure)
    assert trials and cal.measured_psnr is not None
    for summary, candidate in trials:
        assert summary["computed"] == candidate.computed  # the check run followed the candidate plan
    assert template.calibrations == {holder._calibration_key: cal}  # only the final choice is shared
    assert cal.caveat == ""  # measured: the estimate's caveat does not apply
    assert "measured PSNR" in holder.summary_text() and "quality check:" in holder.summary_text()
    assert holder.finish_calibration(4.0, measure) is cal  # once per run
    # a later run uses the checked plan and reproduces the measured PSNR (same inputs)
    later = active(template.clone())
    assert later.begin_run(sigmas, "sample_euler", (1, 6, 8)) == "calibrated"
    again = measured_psnr(reference, _flux_run(later, flux, img, txt, sigmas), 4.0)
    assert again == cal.measured_psnr or (math.isinf(again) and math.isinf(cal.measured_psnr))


def test_check_quality_off_leaves_the_estimate_to_decide():
    template = FBCacheHolder(0.1, hit_residual="taylor2", target_psnr=40.0, check_quality=False)
    assert template.clone().check_quality is False
    holder = active(template.clone())
    sigmas = [14.0 * (1 - k / 12) ** 2 for k in range(12)] + [0.0]
    holder.begin_run(sigmas, "sample_euler", (1, 6, 8))
    torch.manual_seed(0)
    _flux_run(holder, Flux().eval(), torch.randn(1, 6, 8), torch.randn(1, 2, 8), sigmas)
    calls = []
    cal = holder.finish_calibration(4.0, lambda c: calls.append(c) or 99.0)
    assert calls == [] and cal.measured_psnr is None and "estimated PSNR" in cal.describe()


def test_after_a_faster_plan_misses_the_next_lies_between_it_and_the_plan_that_held():
    """The estimate is 8 dB low near its own choice but only 2 dB low on much faster plans: the
    faster try misses, and the third run is a plan strictly between the two, chosen with the
    latest correction (not the first one)."""
    search = _search()
    target = _estimated_middle(search)
    first = search.choose_count(0.0, target)

    def measure(candidate):
        return candidate.psnr + (8.0 if len(candidate.plan) >= first else 2.0)

    chosen, records = check_plans(search, 0.0, target, measure)
    assert records[0].count == first and records[1].count < first and records[1].measured < target
    bar = target - 2.0 + CHECK_MARGIN_DB
    between = [c for c in search.counts if records[1].count < c < first and search.psnr(c) >= bar]
    assert between  # the fixture has such a plan
    assert len(records) == 3 and records[2].count == min(between)
    assert chosen.measured_psnr >= target and records[1].count < len(chosen.plan) <= first
