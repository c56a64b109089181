"""Hold a quality target by measuring it: sample again with the chosen plan and compare.

Why: ``target_psnr`` plans from an estimate (``calibration.py``), a model of how a skipped step's
error travels to the final latent. It was cautious on the benchmark's UNet and on its flow models
at low guidance, and up to 18 dB too optimistic on the flow models under strong guidance with
multistep samplers (``docs/fbcache.md``, "Guidance scale"), where the sampled path amplifies any
change. A run with the plan on the
calibration run's own inputs (same noise, seed, conditioning) is a measurement: its PSNR against
the calibration run's result (every step computed) is what the plan costs on that image.

The search: check the plan the estimate chose. The estimate was off by ``estimated - measured``
dB there; correct the estimate by the latest such difference and check the plan with the fewest
computed steps whose corrected estimate reaches the target (after a miss, by
:data:`CHECK_MARGIN_DB` more), always strictly between the slowest plan that missed and the
fastest that held. So a missed target leads to a slower plan, and under a quality target alone a
target held with room to spare leads to a faster one. At most :data:`MAX_CHECKS` runs; the fastest
plan that held is kept. When none held, every step is computed: the target asked for quality,
and no plan with skips was shown to keep it.

Pure logic: the caller supplies ``measure`` (the sampling run) and gets a :class:`Calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .calibration import Calibration, PlanSearch, psnr_of

MAX_CHECKS = 3
"""Check runs per calibration at most (each samples the whole schedule with a plan, so costs about
``1 / speedup`` of an uncached run)."""

CHECK_MARGIN_DB = 0.5
"""After a plan missed: how far above ``target + (estimated - measured)`` the next plan's estimate
must be (the estimate's error differs a little between plans)."""


@dataclass(frozen=True)
class CheckedPlan:
    """One check run: the plan's computed steps, its speed in model calls, estimated and measured PSNR."""

    count: int
    speedup: float
    estimated: float
    measured: float


def measured_psnr(reference: torch.Tensor, samples: torch.Tensor, value_range: float) -> float | None:
    """PSNR of ``samples`` against ``reference`` with ``value_range`` as the peak (the calibration
    run's own range, as the estimate uses); None when the two cannot be compared. One device sync."""
    if not (isinstance(reference, torch.Tensor) and isinstance(samples, torch.Tensor)):
        return None
    if reference.shape != samples.shape:
        return None
    rms = float((samples.detach().float() - reference.detach().float().to(samples.device)).pow(2).mean().sqrt())
    if not math.isfinite(rms):
        return -math.inf
    return psnr_of(rms, value_range)


def check_plans(
    search: PlanSearch,
    target_speedup: float,
    target_psnr: float,
    measure: Callable[[Calibration], float | None],
    max_checks: int = MAX_CHECKS,
) -> tuple[Calibration, list[CheckedPlan]] | None:
    """Choose the plan for ``target_psnr`` by running candidates (see the module docstring).

    ``measure(candidate)`` samples the calibration run's inputs with the candidate plan and returns
    the PSNR against the calibration run (None: the run could not be made; then the checks stop,
    and with no plan shown to hold this returns None, leaving the estimate to decide). With a
    speed target too, its plan is checked first and kept when it holds (no faster plan is tried).
    Returns the chosen calibration (``measured_psnr`` and ``checks`` filled in) and the checks run.
    """
    n = search.all_steps
    skipping = [c for c in search.counts if c < n]
    count: int | None = search.choose_count(target_speedup, target_psnr)
    missed = 0  # most computed steps of a plan that missed
    held: int | None = None  # fewest computed steps of a plan that held
    records: list[CheckedPlan] = []
    failed = False
    while count is not None and count < n and len(records) < max_checks:
        candidate = search.calibration(count, target_speedup, target_psnr)
        got = measure(candidate)
        if got is None:
            failed = True
            break
        records.append(CheckedPlan(count, candidate.speedup, candidate.psnr, got))
        optimism = candidate.psnr - got if math.isfinite(candidate.psnr) and math.isfinite(got) else math.inf
        if got >= target_psnr:
            held = count
            if target_speedup > 0:
                break  # the speed target's plan keeps the quality: nothing faster was asked for
            bar = target_psnr + optimism
            count = next((c for c in skipping if missed < c < held and search.psnr(c) >= bar), None)
        else:
            missed = count
            bar = target_psnr + optimism + CHECK_MARGIN_DB  # the estimate corrected by this miss (either sign)
            upper = held if held is not None else n
            count = next((c for c in skipping if missed < c < upper and search.psnr(c) >= bar), None)
    if held is not None:
        chosen = held
    elif failed:
        return None  # a check run could not be made and none held: the estimate decides
    else:
        chosen = n  # none held (or the estimate computes every step): compute every step
    result = search.calibration(chosen, target_speedup, target_psnr)
    by_count = {r.count: r for r in records}
    measured = by_count[chosen].measured if chosen in by_count else (math.inf if chosen >= n else None)
    reached = (
        measured is not None
        and measured >= target_psnr
        and (target_speedup <= 0 or result.speedup >= target_speedup - 1e-9)
    )
    return replace(result, measured_psnr=measured, reached=reached, checks=_describe(records, chosen, n)), records


def _describe(records: list[CheckedPlan], chosen: int, all_steps: int) -> str:
    if not records:
        return ""  # the estimate computes every step: nothing to check
    runs = "; ".join(f"{r.speedup:.2f}x measured {r.measured:.1f} dB (estimated {r.estimated:.1f} dB)" for r in records)
    if chosen >= all_steps:
        outcome = "no plan with skipped steps held the target on this run, so every step is computed"
    else:
        outcome = "kept the fastest plan that held"
    return f"{len(records)} check run{'s' if len(records) != 1 else ''}: {runs}; {outcome}"
