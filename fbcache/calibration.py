"""Choose the threshold for a speed or quality target from one fully computed sampling run.

Why a full run: the skip decision compares the first block's residual with the one of the last
*computed* step, so which steps a threshold skips depends on every earlier decision. A run in
which every step is computed records, for every model call, a strided sample of the first
block's residual and of the cached span's residual. Replaying the decision rule on those samples
for every threshold of :data:`THRESHOLD_GRID` gives, per threshold, the steps it would skip (so
the speedup) and the error its skipped steps would add (the forecast of the span's residual
against the true one), without running the model again. The replay uses the same rule as the
live decision (:mod:`.holder`): window, ``max_consecutive_hits``, the cond/uncond keys of a
call deciding together, and the same forecast (``hit_residual``).

The quality estimate is a model, not a measurement. On a skipped call, the forecast of the
span's residual misses the true one by an error vector (on the recorded samples); it reaches
the model's prediction scaled like the residual itself (times the prediction's RMS over the
residual's RMS). Where a step has a cond and an uncond prediction, they are combined as
classifier-free guidance combines them, ``uncond + cfg (cond - uncond)``, so errors that differ
between the two are amplified by the CFG scale. The step then moves the latent by that error
times the sigma step, damped by how much of an error at that noise level survives to the end
(``1`` at sigma 0; for a unit-variance latent the probability-flow ODE scales an error at
``sigma`` by ``1 / sqrt(1 + sigma^2)`` (eps models) or ``1 / sqrt((1 - t)^2 + t^2)`` (flow
models)). Added up over the run this is an RMS error of the final latent, reported as a PSNR
against the uncached result with the calibration run's own value range as the peak. A sum of
errors is an upper bound when later steps correct part of an earlier error; ``docs/fbcache.md``
compares the estimate with measured PSNR.

Pure logic, deterministic: the same traces and settings give the same threshold.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from .forecast import extrapolation_weight, taylor_order, taylor_weights

SAMPLE_ELEMENTS = 65536
"""Elements per conditioning kept of each recorded residual (a strided sample)."""

THRESHOLD_GRID: tuple[float, ...] = tuple(round(1e-4 * 1.15**i, 8) for i in range(0, 71))
"""Thresholds tried, 1e-4 to about 1.9, 15 % apart."""

_SIGMA_RTOL = 1e-5


def sample_stride(numel: int) -> int:
    """An odd stride that keeps about :data:`SAMPLE_ELEMENTS` of ``numel`` elements.

    Odd and not a multiple of 3, 5 or 7, so it walks across channels and tokens instead of
    staying on one channel of a tensor whose inner sizes are powers of two.
    """
    stride = max(1, numel // SAMPLE_ELEMENTS)
    while stride > 1 and (stride % 2 == 0 or stride % 3 == 0 or stride % 5 == 0 or stride % 7 == 0):
        stride += 1
    return stride


def strided_sample(t: torch.Tensor, stride: int) -> torch.Tensor:
    """A float32 copy of every ``stride``-th element of ``t`` (flattened)."""
    return t.detach().reshape(-1)[::stride].float().clone()


@dataclass
class CallTrace:
    """What a fully computed model call recorded for the replay (all tensors are strided samples)."""

    keys: tuple[Hashable, ...]
    sigma: float | None
    step: float
    dsigma: float  # how far the sampler moves sigma from this call (to the next schedule entry)
    decision: dict[Hashable, torch.Tensor] = field(default_factory=dict)  # first blocks' residual per key
    span: dict[Hashable, torch.Tensor] = field(default_factory=dict)  # cached span's residual per key
    output_rms: dict[Hashable, torch.Tensor] = field(default_factory=dict)  # RMS of the prediction per key
    guidance: dict[Hashable, int] = field(default_factory=dict)  # ComfyUI's cond_or_uncond per key (0 cond, 1 uncond)


@dataclass(frozen=True)
class ReplaySettings:
    """The decision rule's settings that change which calls are skipped."""

    max_consecutive_hits: int
    start_sigma: float
    end_sigma: float
    hit_residual: str
    forecast_decision: bool = False
    flow: bool = False  # flow-matching model (sigma in [0, 1]) vs eps/v diffusion
    cfg: float = 1.0  # classifier-free guidance scale of the run


@dataclass(frozen=True)
class Replay:
    """Outcome of one threshold on the recorded run."""

    threshold: float
    computed: int
    total: int
    error: float  # estimated RMS error of the final latent

    @property
    def speedup(self) -> float:
        return self.total / self.computed if self.computed else 1.0

    def psnr(self, value_range: float) -> float:
        if self.error <= 0:
            return math.inf
        return 20 * math.log10(max(value_range, 1e-12) / self.error)


@dataclass(frozen=True)
class Calibration:
    """The threshold chosen for one (sampler, schedule, latent shape) and what it predicts."""

    threshold: float
    speedup: float
    psnr: float
    computed: int
    total: int
    reached: bool  # False when no threshold met the targets (the closest one is used)

    def describe(self) -> str:
        psnr = "no skipped step" if math.isinf(self.psnr) else f"estimated PSNR {self.psnr:.1f} dB"
        return (
            f"threshold {self.threshold:.4g}: {self.computed} of {self.total} model calls computed, "
            f"{self.speedup:.2f}x, {psnr}"
        )


def survival(sigma: float | None, flow: bool) -> float:
    """How much of an error added to a unit-variance latent at ``sigma`` is left at the end."""
    if sigma is None:
        return 1.0
    if flow:
        t = min(max(sigma, 0.0), 1.0)
        return 1.0 / math.sqrt((1 - t) ** 2 + t**2)
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _weights(hit_residual: str, history: Sequence[tuple[float, float | None]], step: float, sigma: float | None):
    """Forecast weights over ``history`` ((step, sigma) of computed calls, oldest first), as the holder uses them."""
    if len(history) == 1 or hit_residual == "reuse":
        return [0.0] * (len(history) - 1) + [1.0]
    if hit_residual == "extrapolate":
        (_, s0), (_, s1) = history[-2], history[-1]
        if sigma is None or s0 is None or s1 is None or s0 == s1:
            return [0.0] * (len(history) - 1) + [1.0]
        w = extrapolation_weight(sigma, s1, s0)
        return [0.0] * (len(history) - 2) + [-w, 1.0 + w]
    return taylor_weights([h[0] for h in history], step, taylor_order(hit_residual))


def _combine(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = tensors[-1] * weights[-1]
    for t, w in zip(tensors[:-1], weights[:-1], strict=True):
        if w:
            out = out + t * w
    return out


def _step_error(errors: dict[Hashable, tuple[int | None, torch.Tensor]], cfg: float) -> float:
    """RMS of one step's error in the guided prediction, from each conditioning's error vector."""
    by_kind: dict[int | None, list[torch.Tensor]] = {}
    for kind, vector in errors.values():
        by_kind.setdefault(kind, []).append(vector)
    cond, uncond = by_kind.get(0), by_kind.get(1)
    if cond and uncond and cond[0].shape == uncond[0].shape:
        combined = uncond[0] + cfg * (cond[0] - uncond[0])
    else:
        vectors = [v for vs in by_kind.values() for v in vs]
        combined = sum(vectors[1:], vectors[0]) / len(vectors)
    return combined.pow(2).mean().sqrt().item()


def replay(calls: Sequence[CallTrace], threshold: float, settings: ReplaySettings, keep: int) -> Replay:
    """Run the decision rule with ``threshold`` over the recorded ``calls``; ``keep`` = history length."""
    refs: dict[Hashable, list[tuple[float, float | None, torch.Tensor, float]]] = {}
    spans: dict[Hashable, list[torch.Tensor]] = {}
    streak: dict[Hashable, int] = {}
    computed = total = 0
    # per sigma: conditioning -> (cond_or_uncond, error vector of its prediction), and the sigma step
    steps: dict[float | None, tuple[float, dict[Hashable, tuple[int | None, torch.Tensor]]]] = {}
    for call in calls:
        keys = call.keys
        total += len(keys)
        sigma = call.sigma
        in_window = sigma is None or (settings.end_sigma < sigma <= settings.start_sigma * (1 + _SIGMA_RTOL))
        hit = bool(keys) and in_window and all(k in refs for k in keys)
        if hit:
            for k in keys:
                history = refs[k]
                if settings.forecast_decision and taylor_order(settings.hit_residual):
                    w = _weights(settings.hit_residual, [(h[0], h[1]) for h in history], call.step, sigma)
                    expected = _combine([h[2] for h in history], w)
                else:
                    expected = history[-1][2]
                d = (call.decision[k] - expected).abs().mean().item() / history[-1][3]
                limit_ok = settings.max_consecutive_hits < 0 or streak.get(k, 0) < settings.max_consecutive_hits
                if not (d < threshold and limit_ok):
                    hit = False
                    break
        step = steps.setdefault(sigma, (call.dsigma, {}))[1]
        for k in keys:
            true = call.span[k]
            if hit:
                history = refs[k]
                w = _weights(settings.hit_residual, [(h[0], h[1]) for h in history], call.step, sigma)
                miss = _combine(spans[k], w) - true
                gain = float(call.output_rms.get(k, 1.0)) / max(true.pow(2).mean().sqrt().item(), 1e-12)
                step[k] = (call.guidance.get(k), miss * gain)
                streak[k] = streak.get(k, 0) + 1
            else:
                step[k] = (call.guidance.get(k), torch.zeros_like(true))
        if not hit:
            computed += len(keys)
            for k in keys:
                sample = call.decision[k]
                denominator = max(sample.abs().mean().item(), 1e-12)
                refs.setdefault(k, []).append((call.step, sigma, sample, denominator))
                spans.setdefault(k, []).append(call.span[k])
                del refs[k][:-keep], spans[k][:-keep]
                streak[k] = 0
    error = 0.0
    for sigma, (dsigma, errors) in steps.items():
        if errors:
            error += abs(dsigma) * survival(sigma, settings.flow) * _step_error(errors, settings.cfg)
    return Replay(threshold, computed, total, error)


def choose(
    calls: Sequence[CallTrace],
    settings: ReplaySettings,
    keep: int,
    value_range: float,
    target_speedup: float = 0.0,
    target_psnr: float = 0.0,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> Calibration:
    """The threshold for the targets (0 = that target is off).

    Speed only: the smallest threshold that reaches ``target_speedup``. Quality only: the
    fastest threshold whose estimated PSNR is at least ``target_psnr``. Both: the smallest
    threshold that reaches the speed without going below the quality, else the fastest that
    keeps the quality. When nothing meets the targets, the closest threshold is used and
    ``reached`` is False.
    """
    usable = [c for c in calls if c.keys and all(k in c.decision and k in c.span for k in c.keys)]
    replays = [replay(usable, th, settings, keep) for th in grid]
    if not replays:
        raise ValueError("no thresholds to try")

    def quality_ok(r: Replay) -> bool:
        return target_psnr <= 0 or r.psnr(value_range) >= target_psnr

    candidates = [r for r in replays if quality_ok(r)]
    reached = True
    if not candidates:  # even the smallest threshold misses the quality: take the most accurate one
        reached = False
        candidates = [min(replays, key=lambda r: (r.error, r.threshold))]
    if target_speedup > 0:
        fast = [r for r in candidates if r.speedup >= target_speedup - 1e-9]
        if fast:
            best = min(fast, key=lambda r: r.threshold)
        else:
            reached = False
            best = max(candidates, key=lambda r: (r.speedup, -r.threshold))
    else:
        best = max(candidates, key=lambda r: (r.speedup, -r.threshold))
    return Calibration(best.threshold, best.speedup, best.psnr(value_range), best.computed, best.total, reached)
