"""Plan which steps to compute for a speed or quality target from one fully computed sampling run.

Why a full run: what a skipped step costs depends on the steps computed around it (its forecast
is made from them). A run in which every step is computed records, for every model call, a
strided sample of the first blocks' residual, of the cached span's residual and of the model's
prediction. From those samples the error of skipping any step, forecast from any earlier
computed steps, can be estimated without running the model again, and a search (see
:func:`plan`) picks the steps to compute: where a skip is cheap (the middle of sampling, on most
models) it skips, where it is expensive (the first steps and the last few) it computes. The
plan is replayed on the record with the live rule (:func:`replay`: window,
``max_consecutive_hits``, the cond/uncond keys of a call deciding together, the same forecast
``hit_residual``), which also gives the largest first-blocks distance of a planned skip: a later
run computes a planned skip anyway when its distance is far above that (:data:`PLAN_GUARD`).

Why not a calibrated threshold: a threshold on the first block's change skips where that change
is small, and that is not where skips are cheap (near the end of sampling the first block barely
moves while a skip costs the most); and a threshold chosen on one run's images skips more or
fewer steps on other images. A plan gives the requested speed in model calls whenever
``max_consecutive_hits`` allows it (``docs/fbcache.md``).

The quality estimate is a model, not a measurement. On a skipped call it takes the larger of
two estimates of the error in the model's prediction (on the recorded samples): the forecast of
the span's residual against the true one, scaled like the residual itself (times the
prediction's RMS over the residual's RMS); and the same forecast made of the prediction itself
against the true prediction. The first misses errors the last layers amplify: near the end of
sampling a wrong residual costs far more of the output than its size says, and the second sees
that (on the trained toy UNet it brought the estimated cost of a single skip in the last 4 of 30
steps within 1-5 dB of the measured PSNR, from 7-12 dB too optimistic). Where a step has a cond and an
uncond prediction, they are combined as classifier-free guidance combines them,
``uncond + cfg (cond - uncond)``, so errors that differ between the two are amplified by the CFG
scale. The step then moves the latent by that error times the sigma step, damped by how much of
an error at that noise level survives to the end (``1`` at sigma 0; for a unit-variance latent
the probability-flow ODE scales an error at ``sigma`` by ``1 / sqrt(1 + sigma^2)`` (eps models)
or ``1 / sqrt((1 - t)^2 + t^2)`` (flow models)). Added up over the run this is an RMS error of
the final latent, reported as a PSNR against the uncached result with the calibration run's own
value range as the peak. A sum of errors is an upper bound when later steps correct part of an
earlier error; ``docs/fbcache.md`` compares the estimate with measured PSNR.

Pure logic, deterministic: the same traces and settings give the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from .forecast import extrapolation_weight, step_weights, taylor_order

SAMPLE_ELEMENTS = 65536
"""Elements per conditioning kept of each recorded residual (a strided sample)."""

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


def psnr_of(rms_error: float, value_range: float) -> float:
    """PSNR of an RMS error with ``value_range`` (the run's max - min) as the peak; inf for no error.
    The one definition of the node's PSNR: the estimate, the plans and the quality check use it."""
    if rms_error <= 0:
        return math.inf
    return 20 * math.log10(max(value_range, 1e-12) / rms_error)


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
    output: dict[Hashable, torch.Tensor] = field(default_factory=dict)  # the prediction per key (sample)
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
    whole_step: bool = False  # a skip runs no block: its error is the prediction's forecast error alone


@dataclass(frozen=True)
class Replay:
    """Outcome of one threshold (or plan) on the recorded run."""

    threshold: float
    computed: int
    total: int
    error: float  # estimated RMS error of the final latent
    max_distance: float = 0.0  # largest first-blocks distance of a skipped call

    @property
    def speedup(self) -> float:
        return self.total / self.computed if self.computed else 1.0

    def psnr(self, value_range: float) -> float:
        return psnr_of(self.error, value_range)


@dataclass(frozen=True)
class Calibration:
    """What was chosen for one (sampler, schedule, latent shape) and what it predicts.

    With a ``plan`` (the steps to compute, as positions on the schedule) the plan decides and
    ``threshold`` is its guard: a planned skip whose first-blocks distance exceeds it is computed
    anyway. Without one, ``threshold`` is the decision rule's threshold.
    """

    threshold: float
    speedup: float
    psnr: float
    computed: int
    total: int
    reached: bool  # False when nothing met the targets (the closest choice is used)
    plan: tuple[float, ...] = ()
    caveat: str = ""  # why the estimated PSNR may not hold for this run (said with every report)
    measured_psnr: float | None = None  # PSNR of a run with this plan against the calibration run (quality check)
    checks: str = ""  # what the quality check ran, for the report

    def describe(self) -> str:
        if math.isinf(self.psnr):
            psnr = "no skipped step"
        elif self.measured_psnr is not None:
            psnr = (
                f"measured PSNR {self.measured_psnr:.1f} dB against the calibration run (estimated {self.psnr:.1f} dB)"
            )
        else:
            psnr = f"estimated PSNR {self.psnr:.1f} dB"
        note = f" [{self.caveat}]" if self.caveat else ""
        if self.checks:
            note += f" [quality check: {self.checks}]"
        if self.plan:
            steps = ", ".join(f"{p:g}" for p in self.plan)
            return (
                f"plan computing steps {steps}: {self.computed} of {self.total} model calls computed, "
                f"{self.speedup:.2f}x, {psnr} (a planned skip is computed anyway above distance "
                f"{self.threshold:.4g}){note}"
            )
        return (
            f"threshold {self.threshold:.4g}: {self.computed} of {self.total} model calls computed, "
            f"{self.speedup:.2f}x, {psnr}{note}"
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
    return step_weights(hit_residual, [h[0] for h in history], step)


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


def _misses(
    call: CallTrace, key: Hashable, spans: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor | None], weights
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A skipped call's two error estimates for ``key`` (see the module docstring): the span
    residual's forecast error scaled to the prediction, and the prediction's own forecast error
    (None when a prediction was not recorded)."""
    true = call.span[key]
    gain = float(call.output_rms.get(key, 1.0)) / max(true.pow(2).mean().sqrt().item(), 1e-12)
    from_span = (_combine(spans, weights) - true) * gain
    out = call.output.get(key)
    if out is None or any(o is None or o.shape != out.shape for o in outputs):
        return from_span, None
    return from_span, _combine(outputs, weights) - out


def _estimate(
    errors: dict[Hashable, tuple[int | None, torch.Tensor, torch.Tensor | None]], cfg: float, whole_step: bool = False
) -> float:
    """RMS error of one step's guided prediction: the larger of the two estimates (``whole_step``:
    the prediction's own forecast error, which is then all a skip adds, where it was recorded)."""
    if any(b is None for _, _, b in errors.values()):
        return _step_error({k: (kind, a) for k, (kind, a, _) in errors.items()}, cfg)
    by_output = _step_error({k: (kind, b) for k, (kind, _, b) in errors.items()}, cfg)
    if whole_step:
        return by_output
    return max(_step_error({k: (kind, a) for k, (kind, a, _) in errors.items()}, cfg), by_output)


def plan_position(step: float) -> float:
    """A call's schedule position as a plan stores it (rounded, so host float noise cannot miss it)."""
    return round(step, 6)


def replay(
    calls: Sequence[CallTrace],
    threshold: float,
    settings: ReplaySettings,
    keep: int,
    plan: frozenset[float] | None = None,
) -> Replay:
    """Run the decision rule with ``threshold`` over the recorded ``calls``; ``keep`` = history length.

    With ``plan`` (schedule positions to compute) a call is skipped where the plan skips it and
    its distance is below ``threshold`` (the live rule of a planned run).
    """
    refs: dict[Hashable, list[tuple[float, float | None, torch.Tensor, float]]] = {}
    spans: dict[Hashable, list[torch.Tensor]] = {}
    outputs: dict[Hashable, list[torch.Tensor | None]] = {}
    streak: dict[Hashable, int] = {}
    computed = total = 0
    max_distance = 0.0
    # per sigma: conditioning -> (cond_or_uncond, the two error estimates of its prediction), and the sigma step
    steps: dict[float | None, tuple[float, dict]] = {}
    for call in calls:
        keys = call.keys
        total += len(keys)
        sigma = call.sigma
        in_window = sigma is None or (settings.end_sigma < sigma <= settings.start_sigma * (1 + _SIGMA_RTOL))
        hit = bool(keys) and in_window and all(k in refs for k in keys)
        if plan is not None and plan_position(call.step) in plan:
            hit = False
        distances = []
        if hit:
            for k in keys:
                history = refs[k]
                if settings.forecast_decision and taylor_order(settings.hit_residual):
                    w = _weights(settings.hit_residual, [(h[0], h[1]) for h in history], call.step, sigma)
                    expected = _combine([h[2] for h in history], w)
                else:
                    expected = history[-1][2]
                d = (call.decision[k] - expected).abs().mean().item() / history[-1][3]
                distances.append(d)
                limit_ok = settings.max_consecutive_hits < 0 or streak.get(k, 0) < settings.max_consecutive_hits
                if not (d < threshold and limit_ok):
                    hit = False
                    break
        if hit:
            max_distance = max([max_distance, *distances])
        step = steps.setdefault(sigma, (call.dsigma, {}))[1]
        for k in keys:
            if hit:
                history = refs[k]
                w = _weights(settings.hit_residual, [(h[0], h[1]) for h in history], call.step, sigma)
                step[k] = (call.guidance.get(k), *_misses(call, k, spans[k], outputs[k], w))
                streak[k] = streak.get(k, 0) + 1
            else:
                zero = torch.zeros_like(call.span[k])
                out = call.output.get(k)
                step[k] = (call.guidance.get(k), zero, None if out is None else torch.zeros_like(out))
        if not hit:
            computed += len(keys)
            for k in keys:
                sample = call.decision[k]
                denominator = max(sample.abs().mean().item(), 1e-12)
                refs.setdefault(k, []).append((call.step, sigma, sample, denominator))
                spans.setdefault(k, []).append(call.span[k])
                outputs.setdefault(k, []).append(call.output.get(k))
                del refs[k][:-keep], spans[k][:-keep], outputs[k][:-keep]
                streak[k] = 0
    error = 0.0
    for sigma, (dsigma, errors) in steps.items():
        if errors:
            error += abs(dsigma) * survival(sigma, settings.flow) * _estimate(errors, settings.cfg, settings.whole_step)
    return Replay(threshold, computed, total, error, max_distance)


PLAN_GUARD = 2.0
"""A planned skip is computed anyway when its first-blocks distance is above this many times the
largest distance of the plan's skips in the calibration run: a later run far from the
calibration's content (another prompt, image or LoRA) is not skipped blindly."""


@dataclass
class _Step:
    """The recorded calls at one schedule position (cond and uncond may be separate calls)."""

    position: float
    sigma: float | None
    dsigma: float
    calls: list[CallTrace] = field(default_factory=list)

    def span(self, key: Hashable) -> torch.Tensor | None:
        for call in self.calls:
            if key in call.keys:
                return call.span.get(key)
        return None

    def output(self, key: Hashable) -> torch.Tensor | None:
        for call in self.calls:
            if key in call.keys:
                return call.output.get(key)
        return None


class _PlanErrors:
    """The estimated error a skipped step adds given the computed steps its forecast uses (memoized:
    the plan search asks for the same (step, history) pairs many times)."""

    def __init__(self, steps: Sequence[_Step], settings: ReplaySettings) -> None:
        self.steps, self.settings = steps, settings
        self._memo: dict[tuple[int, tuple[int, ...]], float] = {}

    def __call__(self, index: int, history: tuple[int, ...]) -> float:
        found = self._memo.get((index, history))
        if found is None:
            found = self._memo[(index, history)] = self._error(index, history)
        return found

    def _error(self, index: int, history: tuple[int, ...]) -> float:
        step, past = self.steps[index], [self.steps[i] for i in history]
        points = [(p.position, p.sigma) for p in past]
        weights = _weights(self.settings.hit_residual, points, step.position, step.sigma)
        errors: dict = {}
        for call in step.calls:
            for k in call.keys:
                spans = [p.span(k) for p in past]
                if any(s is None or s.shape != call.span[k].shape for s in spans):
                    return math.inf  # the plan cannot skip here (that conditioning has no history)
                errors[k] = (call.guidance.get(k), *_misses(call, k, spans, [p.output(k) for p in past], weights))
        if not errors:
            return 0.0
        return (
            abs(step.dsigma)
            * survival(step.sigma, self.settings.flow)
            * _estimate(errors, self.settings.cfg, self.settings.whole_step)
        )


def _steps_of(calls: Sequence[CallTrace]) -> list[_Step]:
    steps: dict[float, _Step] = {}
    for call in calls:
        position = plan_position(call.step)
        entry = steps.get(position)
        if entry is None:
            entry = steps[position] = _Step(position, call.sigma, call.dsigma)
        entry.calls.append(call)
    return list(steps.values())


PLAN_ELEMENTS = 16384
"""Elements of each recorded sample the plan search uses (every k-th): it evaluates thousands of
(step, history) pairs, and a quarter of the record ranks plans the same way at a quarter of the cost."""

MAX_PLANNED_RUN = 6
"""A plan skips at most this many steps in a row (fewer where ``max_consecutive_hits`` says so):
longer runs are never worth their forecast error, and the bound keeps the search small."""


def _best_plans(
    steps: Sequence[_Step], errors: _PlanErrors, keep: int, fixed: set[int], run_cap: int
) -> dict[int, tuple[float, list[int]]]:
    """For every number of computed steps: the least estimated error of any plan and its steps.

    Dynamic programming over (computed steps so far, the last ``keep`` computed steps): the
    forecast of a skipped step depends only on those, so the error of a plan is a sum of terms
    each fixed by such a state. Exact for the estimate (a greedy search, dropping one computed
    step at a time, gets stuck where every single further skip would break the run limit).
    """
    n = len(steps)
    next_fixed = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        next_fixed[i] = i if i in fixed else next_fixed[i + 1]
    # layers[m]: state (last computed steps) -> (error so far, previous state)
    layers: list[dict[tuple[int, ...], tuple[float, tuple[int, ...] | None]]] = [{}, {(0,): (0.0, None)}]
    best: dict[int, tuple[float, list[int]]] = {}
    for m in range(1, n + 1):
        layer = layers[m]
        if not layer:
            break
        following: dict[tuple[int, ...], tuple[float, tuple[int, ...] | None]] = {}
        finals: list[tuple[float, tuple[int, ...]]] = []
        for state, (err, _) in layer.items():
            b = state[-1]
            limit = min(b + run_cap + 1, next_fixed[b + 1], n - 1) if b + 1 < n else b
            hits = 0.0
            for c in range(b + 1, limit + 1):
                new = (*state, c)[-keep:]
                total = err + hits
                if total < following.get(new, (math.inf, None))[0]:
                    following[new] = (total, state)
                hits += errors(c, state)  # c skipped instead: forecast from this state
                if not math.isfinite(hits):
                    break
            # the run may end here: the steps after b are skipped
            if n - 1 - b <= run_cap and next_fixed[b + 1] >= n:
                tail = sum(errors(i, state) for i in range(b + 1, n))
                if math.isfinite(tail):
                    finals.append((err + tail, state))
        if finals:
            total, state = min(finals)
            chosen: list[int] = []
            level, cursor = m, state
            while cursor is not None:
                chosen.append(cursor[-1])
                cursor = layers[level][cursor][1]
                level -= 1
            best[m] = (total, sorted(chosen))
        layers.append(following)
    return best


class PlanSearch:
    """The least-error plans of one calibration run for every number of computed steps (see
    :func:`_best_plans`), and the choice among them for a target.

    Built once per calibration; :meth:`choose` picks for the targets, and a quality check
    (``fbcache/quality_check.py``) asks it for plans with more or fewer computed steps when a
    measured run disagrees with the estimate.
    """

    def __init__(self, calls: Sequence[CallTrace], settings: ReplaySettings, keep: int, value_range: float) -> None:
        usable = [c for c in calls if c.keys and all(k in c.decision and k in c.span for k in c.keys)]
        if not usable:
            raise ValueError("no recorded calls to plan from")
        self.calls = [_to_cpu(c) for c in usable]
        self.settings = settings
        self.keep = keep
        self.value_range = value_range
        self.steps = _steps_of(self.calls)
        fixed = {0} | {
            i
            for i, st in enumerate(self.steps)
            if st.sigma is not None and not (settings.end_sigma < st.sigma <= settings.start_sigma * (1 + _SIGMA_RTOL))
        }
        self._calls_at = [sum(len(c.keys) for c in st.calls) for st in self.steps]
        limit = settings.max_consecutive_hits
        run_cap = MAX_PLANNED_RUN if limit < 0 else min(limit, MAX_PLANNED_RUN)
        self.plans = _best_plans(self.steps, _PlanErrors(self.steps, settings), keep, fixed, run_cap)

    @property
    def counts(self) -> list[int]:
        """The numbers of computed steps with a feasible plan, ascending."""
        return sorted(self.plans)

    @property
    def all_steps(self) -> int:
        """Steps of the schedule (a plan computing all of them skips nothing)."""
        return len(self.steps)

    def speedup(self, count: int) -> float:
        """Model calls of the run over those the plan with ``count`` computed steps computes."""
        if count >= self.all_steps:
            return 1.0
        return sum(self._calls_at) / sum(self._calls_at[i] for i in self.plans[count][1])

    def psnr(self, count: int) -> float:
        """The estimated PSNR of the plan with ``count`` computed steps (inf: nothing skipped)."""
        if count >= self.all_steps:
            return math.inf
        err = self.plans[count][0]
        return psnr_of(err, self.value_range)

    def choose_count(self, target_speedup: float = 0.0, target_psnr: float = 0.0) -> int:
        """The number of computed steps :meth:`choose` takes for these targets."""
        counts = self.counts
        fast = [m for m in counts if target_speedup > 0 and self.speedup(m) >= target_speedup - 1e-9]
        good = [m for m in counts if target_psnr > 0 and self.psnr(m) >= target_psnr]
        if target_speedup > 0 and target_psnr > 0:
            ok = [m for m in fast if m in good]
            return max(ok) if ok else (min(good) if good else max(counts))
        if target_speedup > 0:
            return max(fast) if fast else min(counts)
        return min(good) if good else max(counts)

    def calibration(self, count: int, target_speedup: float = 0.0, target_psnr: float = 0.0) -> Calibration:
        """The plan with ``count`` computed steps replayed with the live rule, as a :class:`Calibration`
        (``count`` at or above :attr:`all_steps`: every step computed)."""
        if count >= self.all_steps:
            positions = frozenset(st.position for st in self.steps)
        else:
            positions = frozenset(self.steps[i].position for i in self.plans[count][1])
        checked = replay(self.calls, math.inf, self.settings, self.keep, plan=positions)
        psnr = checked.psnr(self.value_range)
        reached = (target_speedup <= 0 or checked.speedup >= target_speedup - 1e-9) and (
            target_psnr <= 0 or psnr >= target_psnr
        )
        guard = PLAN_GUARD * checked.max_distance if checked.max_distance > 0 else math.inf
        return Calibration(
            guard, checked.speedup, psnr, checked.computed, checked.total, reached, tuple(sorted(positions))
        )

    def choose(self, target_speedup: float = 0.0, target_psnr: float = 0.0) -> Calibration:
        """The plan for the targets (see :func:`plan`)."""
        return self.calibration(self.choose_count(target_speedup, target_psnr), target_speedup, target_psnr)


def plan(
    calls: Sequence[CallTrace],
    settings: ReplaySettings,
    keep: int,
    value_range: float,
    target_speedup: float = 0.0,
    target_psnr: float = 0.0,
) -> Calibration:
    """Choose which steps to compute for the targets (the least estimated error; see :func:`_best_plans`).

    Speed target: the plan with the most computed steps that still reaches the speed (in model
    calls). Quality target: the plan with the fewest computed steps whose estimated PSNR is at
    least the target. Both: that speed, unless it costs more quality than the target (then the
    fastest plan that keeps it; ``reached`` is False). Steps outside the start/end window and the
    first step are always computed; runs of skips respect ``max_consecutive_hits`` (and at most
    :data:`MAX_PLANNED_RUN`). Which steps matter differs a lot along a schedule (a skip near the
    end of sampling costs far more than one in the middle), and a threshold on the first block's
    change cannot see that; the plan does, from the recorded run. The plan's guard distance (see
    :data:`PLAN_GUARD`) is returned as the calibration's threshold.
    """
    return PlanSearch(calls, settings, keep, value_range).choose(target_speedup, target_psnr)


def _to_cpu(call: CallTrace) -> CallTrace:
    """The trace with its samples on the CPU, thinned to about :data:`PLAN_ELEMENTS`: the search reads
    them thousands of times (no device syncs)."""

    def cpu(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().cpu()
                if v.ndim == 1 and v.numel() > PLAN_ELEMENTS:
                    v = v[:: -(-v.numel() // PLAN_ELEMENTS)].clone()
            out[k] = v
        return out

    return CallTrace(
        call.keys,
        call.sigma,
        call.step,
        call.dsigma,
        decision=cpu(call.decision),
        span=cpu(call.span),
        output_rms=cpu(call.output_rms),
        output=cpu(call.output),
        guidance=dict(call.guidance),
    )
