"""Cache state of one sampling run: the skip decision and the cached residuals.

A :class:`FBCacheHolder` lives in ``model_options["transformer_options"]`` of a cloned
ModelPatcher. The adapter clones it at the start of every sampling run (so nothing is kept
between prompts), calls :meth:`FBCacheHolder.begin_run` with the run's sigmas, and resets it at
the end. The hooks in :mod:`.hooks` call it in this order for every model call:

1. :meth:`FBCacheHolder.begin_call` with the call's ``transformer_options`` (conditioning keys, sigma);
2. :meth:`FBCacheHolder.decide` with the residual of the first ``n_first`` blocks: hit or miss, one host
   sync (none in a planned run on a one-call-per-step sampler: :meth:`FBCacheHolder.count_steps`);
3. on a miss :meth:`FBCacheHolder.store` for every cached residual and :meth:`FBCacheHolder.finish_compute`
   once the last block ran; on a hit :meth:`FBCacheHolder.cached` to read them back (reused,
   extrapolated or forecast, see :mod:`.forecast`);
4. :meth:`FBCacheHolder.end_call`.

With ``skip_whole_step`` in a run deciding ahead, the ``APPLY_MODEL`` wrapper asks
:meth:`FBCacheHolder.skip_whole` first: a planned skip then runs no block and returns a forecast
of the whole prediction, and after a computed call :meth:`FBCacheHolder.record_whole` keeps its
prediction for those forecasts.

State is kept per conditioning (``transformer_options["uuids"]``, falling back to
``cond_or_uncond``), whether ComfyUI batches cond and uncond into one call or runs them
separately, and per *call variant*: guidance nodes such as ComfyUI's Perturbed-Attention
Guidance and Skip Layer Guidance call the model a second time per step for the same
conditioning with other patches (a replaced attention or skipped blocks), and ComfyUI's context
windows call it once per window of a video. Those calls share this holder but compute something
else, so they get their own reference and residuals (keyed by the identity of the patches they
run with and the window's frames) instead of being compared with, and skipped against, the
normal call. The first-block reference is updated on computed calls only, so consecutive hits
are always compared with the last computed step and drift cannot hide.

With a speed or quality target the skipped steps are planned (:mod:`.calibration`): the first
run of a (sampler, sigma schedule, latent shape) computes every step and records what the plan
needs; later runs of the same patched model compute the planned steps and skip the others (a
planned skip whose first-blocks distance is far above the calibration's is computed anyway:
the plan's threshold is that guard). The plans live in
a dict that the holder attached to the node's model shares with its per-run clones, so they
belong to that patched model and go away with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .calibration import (
    Calibration,
    CallTrace,
    PlanSearch,
    ReplaySettings,
    plan_position,
    sample_stride,
    strided_sample,
)
from .forecast import (
    HIT_RESIDUALS,
    MAX_EXTRAPOLATION,
    combine,
    extrapolation_weight,
    history_length,
    step_position,
    step_weights,
    taylor_order,
)
from .quality_check import MAX_CHECKS, check_plans
from .sampler_update import UpdateProbe

logger = logging.getLogger(__name__)

__all__ = ["CACHE_MODES", "HIT_RESIDUALS", "HOLDER_KEY", "MAX_EXTRAPOLATION", "FBCacheHolder", "validate_settings"]

CACHE_MODES = ("tail", "per_block")
"""``tail``: one residual spans the cached blocks (per block stack). ``per_block``: every
skipped block adds back its own residual from the last computed step."""

HOLDER_KEY = "speedkit_fbcache"
"""Key of the holder in ``transformer_options``."""

_SIGMA_RTOL = 1e-5

MAX_CALL_VARIANTS = 8
"""Call variants (patch sets x context windows) with their own cache state in one run. A node
that builds new patch functions for every call would otherwise add a variant (and its cached
residuals) per call; beyond this, the least recently used variant's state is dropped (its next
call is computed)."""

AHEAD_SAMPLERS = frozenset(
    f"sample_{name}"
    for name in (
        "euler", "euler_ancestral", "euler_ancestral_RF", "euler_cfg_pp", "euler_ancestral_cfg_pp", "lms",
        "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
        "lcm", "ipndm", "ipndm_v", "deis", "ddpm", "er_sde", "gradient_estimation",
    )
)  # fmt: skip
"""Samplers (ComfyUI's k-diffusion function names) that call the model once per step, at the
schedule's sigma of that step, and report every step to the callback: there the sigma of a call
is known on the host without reading the GPU (see :meth:`FBCacheHolder.count_steps`)."""

MULTISTEP_SAMPLERS = frozenset(
    f"sample_{name}"
    for name in (
        "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
        "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
        "res_multistep_ancestral_cfg_pp",
    )
)  # fmt: skip
"""Samplers whose update combines the current prediction with earlier ones: on a flow model their
runs drift further from the estimate at a lower CFG scale than single-step samplers' (below)."""

ESTIMATE_CFG_LIMITS = {"flow_multistep": 2.5, "flow": 3.5, "noise": math.inf}
"""Above these CFG scales a quality target's estimated PSNR was often several dB too high on the
benchmark's trained flow toys (docs/fbcache.md, "Guidance scale"; estimate and measurement on the
same peak, the run's value range): a skipped step's error changes what the model predicts on the
following steps, which strong guidance amplifies and an estimate from one uncached run cannot
see. Up to these scales no plan's estimate was more than 3 dB too high on the flow toys (CFG 1-2
with every sampler, 3 with euler); above, with dpmpp_2m up to 18 dB. On the eps UNet no plan's
estimate was too high at CFG 3-7 (it was 1.3 dB or more too low): no limit. A quality target above
them, with ``check_quality`` off (or its runs failing), gets a caveat in the log and the report."""

ESTIMATE_CAVEAT = (
    "the estimated PSNR is likely too high: at CFG {cfg:g} {where} the benchmark's models lost several dB more "
    "than estimated; check_quality measures it instead"
)


def estimate_caveat(flow: bool, cfg: float, sampler: str, multistep: bool | None = None) -> str:
    """Why a quality target's estimate may not hold for this run ("" when it held in the benchmark).

    ``multistep``: whether the sampler's updates combined earlier predictions, as read from the
    calibration run (:class:`~fbcache.sampler_update.UpdateProbe`); None: by its name.
    """
    multistep = flow and (sampler in MULTISTEP_SAMPLERS if multistep is None else multistep)
    limit = ESTIMATE_CFG_LIMITS["flow_multistep" if multistep else "flow" if flow else "noise"]
    if cfg <= limit:
        return ""
    name = sampler.removeprefix("sample_")
    where = (
        f"with {name or 'this sampler'}, which reuses earlier predictions, on a flow model"
        if multistep
        else "on a flow model"
    )
    return ESTIMATE_CAVEAT.format(cfg=cfg, where=where)


AHEAD_LAG = 2
"""Decided-ahead calls whose GPU values (sigma check, first-blocks distances) may stay unread: the
values of call ``k`` are read when call ``k + AHEAD_LAG`` decides. The host then runs up to that
many calls ahead of the GPU, which hides a skipped step's host work behind the GPU work of the
steps before it; a planned skip that the guard would have refused is noticed that many calls late."""

MAX_TARGET_SPEEDUP = 20.0
MAX_TARGET_PSNR = 100.0


class VariantKey(NamedTuple):
    """State key of a conditioning in a model call that runs with other patches, or on another
    context window, than the first calls of the run (variant 0 keeps the plain key)."""

    key: Hashable
    variant: int


def _hashable(value) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return id(value)
    return value


def patch_fingerprint(transformer_options: dict) -> Hashable:
    """What identifies the patch set of a call: every ``patches_replace`` entry (name, block, function)
    and every ``patches`` list, by identity of the functions (ComfyUI copies these dicts per call,
    but the functions a node registered stay the same objects)."""
    parts: list = []
    replace = transformer_options.get("patches_replace") or {}
    for name, entries in replace.items():
        if isinstance(entries, dict):
            try:  # functions hash by identity; one C-level pass
                parts.append((name, frozenset(entries.items())))
            except TypeError:  # an unhashable patch object: fall back to identities
                parts.append((name, frozenset((_hashable(k), id(fn)) for k, fn in entries.items())))
    patches = transformer_options.get("patches") or {}
    for name, fns in patches.items():
        if isinstance(fns, (list, tuple)):
            parts.append((name, tuple(id(fn) for fn in fns)))
    return frozenset(parts)


def context_window_key(transformer_options: dict) -> Hashable:
    """The latent frames of this call when ComfyUI's context windows split a video (else None):
    every window is a different part of the video, so it needs its own reference and residuals."""
    window = transformer_options.get("context_window")
    if window is None:
        return None
    indices = getattr(window, "index_list", None)
    if indices is None:
        return id(window)
    return (getattr(window, "dim", None), tuple(int(i) for i in indices))


def validate_settings(
    residual_diff_threshold: float,
    start_percent: float,
    end_percent: float,
    max_consecutive_hits: int,
    cache_mode: str,
    hit_residual: str = "reuse",
    n_first: int = 1,
    n_last: int = 0,
    min_steps: int = 0,
    target_speedup: float = 0.0,
    target_psnr: float = 0.0,
) -> None:
    """Raise ``ValueError`` naming the bad input, its value, the constraint and the fix."""
    if not math.isfinite(residual_diff_threshold) or residual_diff_threshold < 0:
        raise ValueError(
            f"residual_diff_threshold={residual_diff_threshold!r} must be a finite number >= 0 "
            "(0 turns caching off; typical values 0.05-0.3)."
        )
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r} must lie in [0, 1] (fraction of the sampling schedule).")
    if start_percent > end_percent:
        raise ValueError(
            f"start_percent={start_percent} is after end_percent={end_percent}: the caching window would be "
            "empty. Set start_percent <= end_percent (e.g. 0.1 and 0.9)."
        )
    if max_consecutive_hits < -1:
        raise ValueError(
            f"max_consecutive_hits={max_consecutive_hits} must be -1 (unlimited), 0 (never skip) or a positive count."
        )
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={cache_mode!r} is not one of {CACHE_MODES}.")
    if hit_residual not in HIT_RESIDUALS:
        raise ValueError(f"hit_residual={hit_residual!r} is not one of {HIT_RESIDUALS}.")
    if not isinstance(n_first, int) or n_first < 1:
        raise ValueError(f"n_first={n_first!r} must be an integer >= 1 (the first block always runs: it decides).")
    if not isinstance(n_last, int) or n_last < 0:
        raise ValueError(f"n_last={n_last!r} must be an integer >= 0 (0 = no block after the cached span runs).")
    if not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps={min_steps!r} must be an integer >= 0 (0 = cache runs of any length).")
    if not math.isfinite(target_speedup) or not (target_speedup == 0 or 1.0 < target_speedup <= MAX_TARGET_SPEEDUP):
        raise ValueError(
            f"target_speedup={target_speedup!r} must be 0 (off) or a speedup above 1 and at most "
            f"{MAX_TARGET_SPEEDUP:g} (e.g. 2.5)."
        )
    if not math.isfinite(target_psnr) or not (0 <= target_psnr <= MAX_TARGET_PSNR):
        raise ValueError(
            f"target_psnr={target_psnr!r} must be 0 (off) or an estimated PSNR in dB up to {MAX_TARGET_PSNR:g} "
            "(e.g. 30)."
        )


@dataclass
class KeyStats:
    """Counters of one conditioning: model evaluations computed and skipped."""

    computed: int = 0
    skipped: int = 0
    consecutive_hits: int = 0
    diffs: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.computed + self.skipped


@dataclass
class _Reference:
    """First-block residual of a computed call of one conditioning, its mean |.| and its step."""

    residual: torch.Tensor
    denominator: torch.Tensor  # 0-dim, stays on the device: no sync when it is formed
    step: float = 0.0
    sigma: float | None = None


@dataclass
class _Computed:
    """Residual(s) of one slot from one computed call, with the call's sigma and step."""

    tensors: dict[str, torch.Tensor | None]
    sigma: float | None
    step: float = 0.0


@dataclass
class _Pending:
    """GPU values of a call decided ahead, read ``AHEAD_LAG`` calls later (see :meth:`FBCacheHolder.decide`)."""

    values: torch.Tensor  # [sigma?, distance per measured key], copied to the host without waiting
    event: torch.cuda.Event | None  # set when the copy is done (None: a CPU tensor, ready now)
    keys: tuple[Hashable, ...]
    measured: list[int]
    sigma_guess: float | None
    sigma_on_device: bool  # values[0] is the call's sigma
    planned_hit: bool  # a calibrated plan's skip: the guard checks its distances
    step: float


@dataclass
class _Call:
    keys: tuple[Hashable, ...]
    sigma: torch.Tensor | float | None
    hit: bool | None = None
    sigma_value: float | None = None  # host copy of the call's sigma, set by decide()
    step: float = 0.0  # position on the run's schedule in steps, set by decide()
    variant: int = 0  # patch set / context window variant (see FBCacheHolder._variant)
    scratch: dict = field(default_factory=dict)  # per-call tensors of the hooks (anchors, block-0 input)
    trace: CallTrace | None = None  # calibration run: what this call records
    guidance: dict = field(default_factory=dict)  # calibration run: cond_or_uncond per key
    trace_parts: dict = field(default_factory=dict)  # calibration run: span samples per (key, slot kind, stream)


class FBCacheHolder:
    """Settings plus per-run state of the First Block Cache (see the module docstring)."""

    def __init__(
        self,
        residual_diff_threshold: float,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        max_consecutive_hits: int = -1,
        cache_mode: str = "tail",
        verbose: bool = False,
        force_pattern: Sequence[bool] | None = None,
        hit_residual: str = "reuse",
        n_first: int = 1,
        n_last: int = 0,
        min_steps: int = 0,
        target_speedup: float = 0.0,
        target_psnr: float = 0.0,
        forecast_decision: bool | None = None,
        decide_ahead: bool = True,
        skip_whole_step: bool = False,
        check_quality: bool = True,
    ) -> None:
        validate_settings(
            residual_diff_threshold,
            start_percent,
            end_percent,
            max_consecutive_hits,
            cache_mode,
            hit_residual,
            n_first,
            n_last,
            min_steps,
            target_speedup,
            target_psnr,
        )
        self.hit_residual = hit_residual
        self.threshold = float(residual_diff_threshold)
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.max_consecutive_hits = int(max_consecutive_hits)
        self.cache_mode = cache_mode
        self.verbose = verbose
        # Benchmarks and tests: hit/miss by evaluation index of each conditioning instead of the
        # threshold (the reference and residual bookkeeping still apply).
        self.force_pattern = tuple(bool(v) for v in force_pattern) if force_pattern else None
        # A planned (or forced) run decides without waiting for the GPU (see count_steps); False keeps
        # every decision, and the plan's guard, waiting for it.
        self.decide_ahead = bool(decide_ahead)
        # Skips known in advance (a run deciding ahead) run no block at all: the whole prediction is
        # forecast (see skip_whole); the plan's guard, which needs the first blocks, is then not checked.
        self.skip_whole_step = bool(skip_whole_step)
        # A quality target's first run samples again with candidate plans and keeps the fastest whose
        # measured PSNR holds (fbcache/quality_check.py); False: the estimate alone decides.
        self.check_quality = bool(check_quality)
        # Blocks always computed before (deciding) and after the cached span. The adapter lowers
        # them to what the network allows (see hooks.cached_span) before the first run.
        self.n_first = int(n_first)
        self.n_last = int(n_last)
        self.min_steps = int(min_steps)
        self.target_speedup = float(target_speedup)
        self.target_psnr = float(target_psnr)
        # Taylor forecasts compare the first blocks' residual with its own forecast instead of with the
        # last computed one: what decides is then how well the trajectory follows the forecast, which is
        # what a forecast hit relies on (None = on for taylor1/taylor2; benchmarks/fbcache_quality.py).
        self.forecast_decision = (
            taylor_order(hit_residual) > 0 if forecast_decision is None else bool(forecast_decision)
        )
        self._forecast_decision_setting = forecast_decision
        self.flow = False  # flow-matching model (the adapter sets it): used by the quality estimate
        self.cfg = 1.0  # the run's CFG scale (the adapter sets it per run): used by the quality estimate
        self.start_sigma = math.inf
        self.end_sigma = -math.inf
        self.active = False
        self.description = ""  # what the adapter attached to, for the report
        self.report_node_id: str | None = None  # UI node that shows the report
        # Thresholds chosen for the targets, per (sampler, schedule, latent shape): shared by the
        # holder attached to a patched model and its per-run clones (see the module docstring).
        self.calibrations: dict[Hashable, Calibration] = {}
        self.reset()

    @property
    def targeted(self) -> bool:
        """True when the threshold is chosen for a speed or quality target."""
        return self.target_speedup > 0 or self.target_psnr > 0

    # ------------------------------------------------------------------ lifecycle
    def clone(self) -> FBCacheHolder:
        """A holder with the same settings and fresh state (one per sampling run); shares the calibrations."""
        new = type(self)(
            self.threshold,
            self.start_percent,
            self.end_percent,
            self.max_consecutive_hits,
            self.cache_mode,
            self.verbose,
            self.force_pattern,
            self.hit_residual,
            self.n_first,
            self.n_last,
            self.min_steps,
            self.target_speedup,
            self.target_psnr,
            self._forecast_decision_setting,
            self.decide_ahead,
            self.skip_whole_step,
            self.check_quality,
        )
        new.flow = self.flow
        new.description = self.description
        new.report_node_id = self.report_node_id
        new.calibrations = self.calibrations
        return new

    def prepare(self, percent_to_sigma: Callable[[float], float]) -> FBCacheHolder:
        """Turn the percent window into sigmas with the model's own schedule and mark the run active."""
        self.start_sigma = float(percent_to_sigma(self.start_percent))
        self.end_sigma = float(percent_to_sigma(self.end_percent))
        self.active = True
        return self

    def begin_run(self, sigmas: Sequence[float] | None, sampler: str = "", shape: Sequence[int] = ()) -> str:
        """Set up a sampling run from its sigma schedule (host floats); returns what the run does.

        ``"off"``: fewer steps than ``min_steps`` (the holder goes inactive for the run);
        ``"calibrating"``: a target is set and this (sampler, schedule, shape) has no plan
        yet, so every call is computed and recorded; ``"calibrated"``: the plan (and its guard
        threshold) is used; ``"manual"``: the given threshold is used.
        """
        self.schedule = [float(s) for s in sigmas] if sigmas is not None else None
        self._plan = None
        steps = len(self.schedule) - 1 if self.schedule else 0
        if self.schedule is not None and self.min_steps and steps < self.min_steps:
            self.active = False
            self.run_mode = "off"
            self.off_reason = (
                f"First Block Cache is off for this run: {steps} steps, fewer than min_steps {self.min_steps} "
                "(a distilled or few-step schedule has no step to spare; set min_steps to 0 to cache anyway)."
            )
            logger.info(self.off_reason)
            return self.run_mode
        self._ahead_ok = False
        if not self.targeted or self.force_pattern is not None:
            self.run_mode = "manual"
            self._ahead_ok = self.force_pattern is not None and self._may_decide_ahead(sampler)
            return self.run_mode
        self._calibration_key = (sampler, tuple(round(s, 6) for s in self.schedule or ()), tuple(shape))
        found = self.calibrations.get(self._calibration_key)
        if found is None:
            self.run_mode = "calibrating"
            self._trace = []
            # an unchecked quality target's caveat depends on whether the sampler reuses earlier predictions
            self._update_probe = UpdateProbe() if self.target_psnr > 0 and not self.check_quality else None
            logger.info(
                "First Block Cache: target %s: this run (%s, %d steps) computes every step to plan the skips.",
                self._target_text(),
                sampler or "sampler",
                steps,
            )
        else:
            self.run_mode = "calibrated"
            self.threshold = found.threshold
            self.calibration = found
            self._plan = frozenset(found.plan) if found.plan else None
            self._ahead_ok = self._plan is not None and self._may_decide_ahead(sampler)
        return self.run_mode

    def _may_decide_ahead(self, sampler: str) -> bool:
        return self.decide_ahead and bool(self.schedule) and len(self.schedule) > 1 and sampler in AHEAD_SAMPLERS

    def _target_text(self) -> str:
        parts = []
        if self.target_speedup > 0:
            parts.append(f"{self.target_speedup:g}x")
        if self.target_psnr > 0:
            parts.append(f"PSNR >= {self.target_psnr:g} dB")  # the plan's description says measured or estimated
        return " and ".join(parts)

    def finish_calibration(
        self, value_range: float, measure: Callable[[Calibration], float | None] | None = None
    ) -> Calibration | None:
        """After a calibrating run: plan the skipped steps, keep the plan for later runs, return it.

        ``value_range``: max - min of the run's latent, the peak of the estimated PSNR (2, the
        range of a [-1, 1] signal, when unknown). ``measure``: for a quality target, samples the
        calibration run's inputs again with a candidate plan and returns its PSNR against the
        calibration run (``fbcache/quality_check.py``); without it (or when its runs fail) the
        estimate decides, with its caveat where the benchmark found it optimistic. Called once
        per run (later calls return the same calibration).
        """
        if self.calibration is not None and self.run_mode == "calibrating":
            return self.calibration
        value_range = value_range if value_range > 0 else 2.0
        if self.run_mode != "calibrating":
            return None
        settings = ReplaySettings(
            self.max_consecutive_hits,
            self.start_sigma,
            self.end_sigma,
            self.hit_residual,
            self.forecast_decision,
            self.flow,
            self.cfg,
            self.skip_whole_step and self._may_decide_ahead(self._calibration_key[0]),
        )
        calls = [c for c in self._trace if c.span]
        if not calls:
            logger.warning(
                "First Block Cache: the calibration run recorded nothing; the threshold stays %s.", self.threshold
            )
            return None
        search = PlanSearch(calls, settings, history_length(self.hit_residual), value_range)
        found = search.choose(self.target_speedup, self.target_psnr)
        checked = None
        if self.target_psnr > 0 and self.check_quality and measure is not None:
            logger.info(
                "First Block Cache: target_psnr %g: checking the plan by sampling this run's inputs again with it "
                "(at most %d more runs, in this first run only).",
                self.target_psnr,
                MAX_CHECKS,
            )
            checked = check_plans(search, self.target_speedup, self.target_psnr, measure)
        if checked is not None:
            found = checked[0]
            logger.info("First Block Cache: target_psnr %g: %s.", self.target_psnr, found.checks)
        elif self.target_psnr > 0:
            sampler = self._calibration_key[0]
            multistep = self._update_probe.multistep() if self._update_probe is not None else None
            logger.info(
                "First Block Cache: the calibration run's steps read %s as %s.",
                sampler.removeprefix("sample_") or "the sampler",
                "undecided (its name decides)" if multistep is None else "multistep" if multistep else "single-step",
            )
            caveat = estimate_caveat(self.flow, self.cfg, sampler, multistep)
            if caveat:
                found = replace(found, caveat=caveat)
                logger.warning("First Block Cache: target_psnr %g: %s.", self.target_psnr, caveat)
        self.calibrations[self._calibration_key] = found
        self.calibration = found
        self.threshold = found.threshold
        return found

    def trial(self, candidate: Calibration) -> FBCacheHolder:
        """A holder for one check run of ``candidate``: this calibration run's sampler, schedule and
        latent shape, planned by ``candidate``. It sees only the candidate (never the shared
        calibrations), so a check run leaves nothing behind."""
        new = self.clone()
        new.calibrations = {self._calibration_key: candidate}
        new.cfg = self.cfg
        new.start_sigma, new.end_sigma, new.active = self.start_sigma, self.end_sigma, True
        new.report_node_id = None
        sampler, _, shape = self._calibration_key
        new.begin_run(self.schedule, sampler, shape)
        return new

    def reset(self) -> None:
        """Drop every cached tensor and counter (run start/end, shape/dtype/device change, sigma up)."""
        self._refs: dict[Hashable, list[_Reference]] = {}
        self._stores: dict[tuple[Hashable, ...], dict[Hashable, list[_Computed]]] = {}
        # skip_whole_step: the predictions of the last computed calls, per batch composition
        self._whole: dict[tuple[Hashable, ...], list[_Computed]] = {}
        self.whole_skips = 0
        self.last_call: _Call | None = None
        self._complete: set[tuple[Hashable, ...]] = set()
        self._signature: tuple | None = None
        self._last_sigma: float | None = None
        self.stats: dict[Hashable, KeyStats] = {}
        self._labels: dict[Hashable, str] = {}
        self._variants: dict[Hashable, int] = {}  # (patch fingerprint, context window) -> variant number
        self._variant_last_use: dict[int, int] = {}
        self._variant_labels: dict[int, str] = {}
        self._calls = 0
        self._warned: set[str] = set()
        self.resets = 0
        self.control_computes = 0  # model calls computed because ControlNet residuals were present
        # DiT hooks: whether blocks may write into their input tensor (None = not known yet: copy).
        self.copy_inputs: bool | None = None
        self.call: _Call | None = None
        self.schedule: list[float] | None = None
        self.run_mode = "manual"
        self.off_reason = ""
        self.calibration: Calibration | None = None
        self._calibration_key: Hashable = None
        self._trace: list[CallTrace] = []
        self._update_probe: UpdateProbe | None = None  # calibration runs: how the sampler updates its latent
        self._plan: frozenset[float] | None = None  # calibrated runs: the schedule positions to compute
        self.value_range = 0.0  # calibration runs: the run's latent value range (the adapter sets it)
        # Deciding ahead of the GPU (see count_steps): allowed for this run, steps reported, why it stopped.
        self._ahead_ok = False
        self._counting = False
        self._steps_done = 0
        self._pending: list[_Pending] = []
        self.ahead_stopped = ""

    def _soft_reset(self, reason: str) -> None:
        """Forget the cache but keep the run's counters (they describe the whole run)."""
        logger.info("First Block Cache: cache reset (%s)", reason)
        self._refs.clear()
        self._stores.clear()
        self._whole.clear()
        self._complete.clear()
        self._last_sigma = None
        self.resets += 1
        for st in self.stats.values():
            st.consecutive_hits = 0

    # ------------------------------------------------------------------ per call
    @torch.compiler.disable  # host-side bookkeeping (patch fingerprints, counters): traced, it would recompile
    def begin_call(self, transformer_options: dict) -> _Call:
        """Start one model call; keys come from ``uuids`` (or ``cond_or_uncond``), sigma from ``sigmas``."""
        cond_or_uncond = transformer_options.get("cond_or_uncond") or ()
        variant = self._variant(transformer_options)
        keys = tuple(self._qualify(k, variant) for k in (transformer_options.get("uuids") or cond_or_uncond))
        for key, kind in zip(keys, cond_or_uncond, strict=False):
            label = {0: "cond", 1: "uncond"}.get(kind, f"cond_or_uncond={kind}")
            self._labels.setdefault(key, f"{label} ({self._variant_labels[variant]})" if variant else label)
        self.call = self.last_call = _Call(keys=keys, sigma=transformer_options.get("sigmas"), variant=variant)
        if self.run_mode == "calibrating":
            self.call.guidance = dict(zip(keys, cond_or_uncond, strict=False))
        return self.call

    @staticmethod
    def _qualify(key: Hashable, variant: int) -> Hashable:
        return VariantKey(key, variant) if variant else key

    def _variant(self, transformer_options: dict) -> int:
        """Number of this call's patch set and context window in the run (0: those the run started with)."""
        self._calls += 1
        patches, window = patch_fingerprint(transformer_options), context_window_key(transformer_options)
        fingerprint = (patches, window)
        variant = self._variants.get(fingerprint)
        if variant is None:
            fresh = len(self._variant_last_use) < MAX_CALL_VARIANTS
            if fresh:
                variant = len(self._variant_last_use)
            else:  # reuse the least recently used number other than 0, dropping its state
                variant = min((v for v in self._variant_last_use if v), key=self._variant_last_use.__getitem__)
                self._drop_variant(variant)
                self.warn_once(
                    f"more than {MAX_CALL_VARIANTS} different patch sets / context windows in one run (a node builds "
                    "new patch functions per call, or many context windows?): the least recently used one's cache is "
                    "dropped, so such calls are mostly computed"
                )
            self._variants[fingerprint] = variant
            if variant:
                self._variant_labels[variant] = f"{self._describe_variant(patches, window)} #{variant}"
                if fresh:
                    logger.info(
                        "First Block Cache: model calls with a different set of patches (e.g. Perturbed-Attention or "
                        "Skip Layer Guidance) or on another context window keep their own cache state (%s).",
                        self._variant_labels[variant],
                    )
        self._variant_last_use[variant] = self._calls
        return variant

    def _describe_variant(self, patches: Hashable, window: Hashable) -> str:
        """How a call variant differs from variant 0, for the report."""
        first_patches, first_window = next((f for f, v in self._variants.items() if v == 0), (patches, window))
        parts = []
        if window is not None and window != first_window:
            frames = window[1] if isinstance(window, tuple) else ()
            parts.append(f"context window {frames[0]}-{frames[-1]}" if frames else "another context window")
        if patches != first_patches:
            parts.append("calls with other patches")
        return ", ".join(parts) or "another call variant"

    def _drop_variant(self, variant: int) -> None:
        for fingerprint in [f for f, v in self._variants.items() if v == variant]:
            del self._variants[fingerprint]

        def of_variant(key) -> bool:
            return isinstance(key, VariantKey) and key.variant == variant

        for key in [k for k in self._labels if of_variant(k)]:
            del self._labels[key]  # relabelled by the calls that take this number next
        for key in [k for k in self._refs if of_variant(k)]:
            del self._refs[key]
        for composition in [c for c in self._stores if any(of_variant(k) for k in c)]:
            del self._stores[composition]
        for composition in [c for c in self._whole if any(of_variant(k) for k in c)]:
            del self._whole[composition]
        self._complete = {c for c in self._complete if not any(of_variant(k) for k in c)}
        for key, st in self.stats.items():
            if of_variant(key):
                st.consecutive_hits = 0

    def end_call(self) -> None:
        self.call = None

    def _split(self, residual: torch.Tensor) -> tuple[tuple[Hashable, ...], tuple[torch.Tensor, ...]]:
        keys = self.call.keys if self.call is not None else ()
        if keys and residual.shape[0] % len(keys) == 0:
            return keys, residual.chunk(len(keys), dim=0)
        # The batch does not split into the announced conditionings: one state for the whole call.
        return (self._all_key(),), (residual,)

    def _all_key(self) -> Hashable:
        return self._qualify("all", self.call.variant if self.call is not None else 0)

    def _step_of(self, sigma: float | None, first_key: Hashable | None) -> float:
        """The call's position on the run's schedule in steps (the Taylor forecasts' variable).

        Without a schedule (the hooks driven outside a sampler) the first conditioning's
        evaluation count stands in for it.
        """
        if self.schedule and sigma is not None:
            return step_position(self.schedule, sigma)
        st = self.stats.get(first_key)
        return float(st.total) if st is not None else 0.0

    def _sigma_step(self, sigma: float | None) -> float:
        """How far the sampler moves sigma after a call at ``sigma``: to the next lower schedule entry."""
        if sigma is None or not self.schedule:
            return 0.0
        for s in self.schedule:
            if s < sigma * (1 - 1e-6):
                return sigma - s
        return sigma

    def _expected(self, key: Hashable, step: float) -> _Reference | torch.Tensor | None:
        """What the first blocks' residual of ``key`` is compared with: the last computed one, or
        (``forecast_decision`` with a Taylor forecast) its forecast at ``step``."""
        history = self._refs.get(key)
        if not history:
            return None
        order = taylor_order(self.hit_residual)
        if not self.forecast_decision or order == 0 or len(history) == 1:
            return history[-1].residual
        weights = step_weights(self.hit_residual, [r.step for r in history], step)
        return combine([r.residual for r in history], weights)

    # ------------------------------------------------------------------ deciding ahead of the GPU
    def count_steps(self) -> Callable[[int], None]:
        """The sampler reports its finished steps to the returned function (the adapter wraps the
        sampler callback with it). With the step count known, a run whose skips are fixed in advance
        (a calibrated plan, or a forced pattern) on a sampler of :data:`AHEAD_SAMPLERS` decides
        without reading the GPU: the sigma of a call is the schedule's entry of the step."""
        self._counting = True
        self._steps_done = 0
        probe = self._update_probe if self.run_mode == "calibrating" else None

        def step_done(index: int, denoised: torch.Tensor | None = None, x: torch.Tensor | None = None) -> None:
            self._steps_done = int(index) + 1
            if probe is not None and denoised is not None and x is not None:
                probe.record(int(index), denoised, x)  # calibration runs: how the sampler updates (no sync)

        return step_done

    @property
    def ahead(self) -> bool:
        """True while this run decides without waiting for the GPU (see :meth:`count_steps`)."""
        return self._ahead_ok and self._counting and not self.ahead_stopped

    def _stop_ahead(self, reason: str) -> None:
        if not self.ahead_stopped:
            self.ahead_stopped = reason
            logger.info("First Block Cache: decisions wait for the GPU again for the rest of this run: %s", reason)

    def _queue_pending(self, pending: _Pending) -> None:
        """Copy a call's GPU values to the host without waiting (read later by :meth:`_read_pending`)."""
        values = pending.values
        if values.device.type == "cuda":
            pending.values = values.to("cpu", non_blocking=True)
            pending.event = torch.cuda.Event()
            pending.event.record()
        self._pending.append(pending)

    def _read_pending(self, keep: int) -> None:
        """Read the values of the decided-ahead calls but the last ``keep`` (in call order, so the
        decisions do not depend on how fast the GPU is): record the distances, check that the guessed
        sigma was the call's, and stop deciding ahead when it was not or a planned skip crossed the
        guard."""
        while len(self._pending) > keep:
            p = self._pending.pop(0)
            if p.event is not None:
                p.event.synchronize()
            host = p.values.tolist()
            if p.sigma_on_device:
                sigma = host.pop(0)
                guess = p.sigma_guess
                if guess is None or abs(sigma - guess) > _SIGMA_RTOL * max(abs(guess), 1e-8) + 1e-8:
                    self._stop_ahead(f"a model call at sigma {sigma:.4g} where the schedule said {guess}")
                    self._soft_reset("a call off the schedule while deciding ahead")
            diffs = dict(zip(p.measured, host, strict=True))
            for i, d in diffs.items():
                st = self.stats.get(p.keys[i])
                if st is not None:
                    st.diffs.append(d)
            if p.planned_hit and any(d >= self.threshold for d in diffs.values()):
                self._stop_ahead(
                    f"the planned skip at step {p.step:g} was {max(diffs.values()):.4g} from its reference, past "
                    f"the calibration's guard {self.threshold:.4g} (this run strays from the calibration run)"
                )
            if self.verbose:
                logger.info(
                    "First Block Cache: step %g (decided ahead) diffs=%s",
                    p.step,
                    [round(diffs[i], 4) if i in diffs else None for i in range(len(p.keys))],
                )

    def flush(self) -> None:
        """Read every value still pending (at the end of a run, before its report)."""
        self._read_pending(0)

    def _distances(
        self, keys: tuple[Hashable, ...], chunks: Sequence[torch.Tensor], forecast_step: float | None
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Relative L1 distances (0-dim, on the device) for the keys with a reference of the same size."""
        measured: list[int] = []
        values: list[torch.Tensor] = []
        for i, (key, chunk) in enumerate(zip(keys, chunks, strict=True)):
            history = self._refs.get(key)
            if history and history[-1].residual.shape == chunk.shape:
                expected = self._expected(key, forecast_step) if forecast_step is not None else history[-1].residual
                values.append(F.l1_loss(chunk, expected).float() / history[-1].denominator)
                measured.append(i)
        return measured, values

    @torch.compiler.disable  # host-side branch and bookkeeping: torch.compile graph-breaks here cleanly
    def decide(self, residual: torch.Tensor) -> bool:
        """Compare the first blocks' residual with the reference; True = skip the cached blocks.

        One host sync: the relative L1 distances of every conditioning and the sigma travel
        together. On a miss the residual becomes the new reference (and its mean |.| the cached
        denominator); on a hit the reference stays, so the next call is compared with the last
        computed one. During a calibration run every call is computed and recorded.

        Deciding ahead (:attr:`ahead`: the skips are fixed in advance and the sampler reports its
        steps) there is no sync: the call's sigma is the schedule's, and the distances and the sigma
        are read :data:`AHEAD_LAG` calls later, for the report, a check of the sigma and the plan's guard.
        """
        if self.call is None:
            self.begin_call({})
        call = self.call
        signature = (tuple(residual.shape[1:]), residual.dtype, residual.device)
        if self._signature is not None and signature != self._signature:
            self._soft_reset(f"shape/dtype/device changed: {self._signature} -> {signature}")
        self._signature = signature

        keys, chunks = self._split(residual)
        if call.keys != keys:
            call.keys = keys
        if self._pending:
            self._read_pending(AHEAD_LAG - 1 if self.ahead else 0)  # call k's values are read by call k + LAG
        if self.ahead and self._steps_done >= len(self.schedule) - 1:
            self._stop_ahead("a model call after the schedule's last step")
        sigma = call.sigma
        ahead = self.ahead
        diffs: dict[int, float] = {}
        pending_values: torch.Tensor | None = None
        if ahead:
            sigma_guess = self.schedule[self._steps_done]
            sigma_value: float | None = sigma_guess
            measured, values = self._distances(keys, chunks, float(self._steps_done))
            if isinstance(sigma, torch.Tensor):
                values.insert(0, sigma.detach().reshape(-1).max().float().to(residual.device))
            elif sigma is not None:
                sigma_value = float(sigma)
            pending_values = torch.stack(values) if values else None
        else:
            sigma_host: float | None = None
            if not isinstance(sigma, torch.Tensor):
                sigma_host = None if sigma is None else float(sigma)
            # The forecast step is needed before the sync only for forecast decisions; it comes from the
            # host sigma of the previous sync (the same value when the sigma tensor is not yet known).
            forecast_step = None
            if self.forecast_decision and taylor_order(self.hit_residual):
                if isinstance(sigma, torch.Tensor):
                    sigma_host = float(sigma.detach().reshape(-1).max())  # one extra sync, forecast decisions only
                    sigma = sigma_host
                forecast_step = self._step_of(sigma_host, keys[0] if keys else None)
            measured, values = self._distances(keys, chunks, forecast_step)
            if isinstance(sigma, torch.Tensor):
                values.insert(0, sigma.detach().reshape(-1).max().float().to(residual.device))
            host = torch.stack(values).tolist() if values else []  # the one sync of this call
            if isinstance(sigma, torch.Tensor):
                sigma_value = host.pop(0)
            else:
                sigma_value = sigma_host
            diffs = dict(zip(measured, host, strict=True))

            if sigma_value is not None and self._last_sigma is not None:
                if sigma_value > self._last_sigma * (1 + _SIGMA_RTOL) + 1e-8:
                    self._soft_reset(f"sigma went up {self._last_sigma:.4g} -> {sigma_value:.4g}")
                    diffs = {}
                    measured = []
        if sigma_value is not None:
            self._last_sigma = sigma_value
        call.sigma_value = sigma_value
        call.step = float(self._steps_done) if ahead else self._step_of(sigma_value, keys[0] if keys else None)

        in_window = sigma_value is None or (self.end_sigma < sigma_value <= self.start_sigma * (1 + _SIGMA_RTOL))
        hit = bool(keys) and in_window and tuple(keys) in self._complete and self.run_mode != "calibrating"
        has_reference = set(measured)
        for i, key in enumerate(keys):
            st = self.stats.setdefault(key, KeyStats())
            d = diffs.get(i)
            if d is not None:
                st.diffs.append(d)
            if self.force_pattern is not None:
                wanted = self.force_pattern[st.total % len(self.force_pattern)]
            else:
                # ahead: the plan alone (its guard is checked when the distances are read)
                wanted = ahead or (d is not None and d < self.threshold)
                if self._plan is not None:  # a calibrated plan: skip where it says (its threshold is a guard)
                    wanted = wanted and plan_position(call.step) not in self._plan
            limit_ok = self.max_consecutive_hits < 0 or st.consecutive_hits < self.max_consecutive_hits
            hit = hit and i in has_reference and wanted and limit_ok
        call.hit = hit
        if ahead and pending_values is not None:
            self._queue_pending(
                _Pending(
                    pending_values,
                    None,
                    keys,
                    measured,
                    sigma_guess,
                    isinstance(sigma, torch.Tensor),
                    hit and self.force_pattern is None,
                    call.step,
                )
            )

        keep = history_length(self.hit_residual) if self.forecast_decision else 1
        for key, chunk in zip(keys, chunks, strict=True):
            st = self.stats[key]
            if hit:
                st.skipped += 1
                st.consecutive_hits += 1
            else:
                st.computed += 1
                st.consecutive_hits = 0
                chunk = chunk.detach()
                ref = _Reference(chunk, chunk.abs().mean().float().clamp_min(1e-12), call.step, sigma_value)
                history = self._refs.get(key)
                if keep > 1 and history and history[-1].residual.shape == chunk.shape and history[-1].step != call.step:
                    history.append(ref)
                    del history[:-keep]
                else:
                    self._refs[key] = [ref]
        if not hit:
            # The residuals of this composition are rewritten now; not usable until the call finishes.
            self._complete.discard(tuple(keys))
        if self.run_mode == "calibrating":
            self._record_decision(call, keys, chunks)
        if self.verbose and not ahead:
            logger.info(
                "First Block Cache: sigma=%s diffs=%s -> %s",
                sigma_value,
                [round(diffs[i], 4) if i in diffs else None for i in range(len(keys))],
                "skip" if hit else "compute",
            )
        elif self.verbose:
            logger.info("First Block Cache: step %g (decided ahead) -> %s", call.step, "skip" if hit else "compute")
        return hit

    # ------------------------------------------------------------------ whole-step skips
    @property
    def skips_whole_steps(self) -> bool:
        """True while a planned skip runs no block (``skip_whole_step`` in a run deciding ahead)."""
        return self.skip_whole_step and self.ahead and (self._plan is not None or self.force_pattern is not None)

    @torch.compiler.disable  # host-side decision and bookkeeping
    def skip_whole(self, transformer_options: dict, shape: Sequence[int]) -> torch.Tensor | None:
        """A planned skip that runs no block: the forecast noise/velocity prediction of the whole
        call (``shape``: the model input's), or None when this call is to be run.

        Only where the skips are known before the call (:attr:`skips_whole_steps`): the step comes
        from the sampler's count, so nothing is read from the GPU; the call's sigma is checked
        :data:`AHEAD_LAG` calls later like any call decided ahead. The forecast is the node's
        ``hit_residual`` rule applied to the predictions of the last computed calls of the same
        batch composition (:meth:`record_whole`); a composition without one runs (its first
        blocks may still skip the rest).
        """
        if not self.skips_whole_steps or self._steps_done >= len(self.schedule) - 1:
            return None
        step = float(self._steps_done)
        sigma_guess = self.schedule[self._steps_done]
        if not self.end_sigma < sigma_guess <= self.start_sigma * (1 + _SIGMA_RTOL):
            return None
        if self._plan is not None and plan_position(step) in self._plan:
            return None
        if self._pending:
            self._read_pending(AHEAD_LAG - 1)
            if not self.skips_whole_steps:  # a late read stopped deciding ahead
                return None
        call = self.begin_call(transformer_options)
        keys = call.keys or (self._all_key(),)
        history = self._whole.get(self._composition())
        skip = bool(history) and tuple(history[-1].tensors["eps"].shape) == tuple(shape)
        for key in keys:
            st = self.stats.setdefault(key, KeyStats())
            if self.force_pattern is not None:
                skip = skip and self.force_pattern[st.total % len(self.force_pattern)]
            skip = skip and (self.max_consecutive_hits < 0 or st.consecutive_hits < self.max_consecutive_hits)
        if not skip:
            self.end_call()
            return None
        call.step, call.sigma_value, call.hit = step, sigma_guess, True
        sigma = call.sigma
        if isinstance(sigma, torch.Tensor):
            values = sigma.detach().reshape(-1).max().float().reshape(1)
            self._queue_pending(_Pending(values, None, keys, [], sigma_guess, True, False, step))
        elif sigma is not None and abs(float(sigma) - sigma_guess) > _SIGMA_RTOL * max(abs(sigma_guess), 1e-8) + 1e-8:
            self._stop_ahead(f"a model call at sigma {float(sigma):.4g} where the schedule said {sigma_guess}")
            self._soft_reset("a call off the schedule while deciding ahead")
            self.end_call()
            return None
        self._last_sigma = sigma_guess
        for key in keys:
            st = self.stats[key]
            st.skipped += 1
            st.consecutive_hits += 1
        self.whole_skips += 1
        forecast = history[-1].tensors if len(history) == 1 else self._predict(history)
        if self.verbose:
            logger.info("First Block Cache: step %g (decided ahead) -> skip, whole step", step)
        self.end_call()
        return forecast["eps"]

    @torch.compiler.disable  # host-side bookkeeping of the prediction history
    def record_whole(self, prediction: torch.Tensor) -> None:
        """After a computed call (:meth:`skip_whole` returned None and the model ran): keep its
        noise/velocity prediction for the forecasts of later whole-step skips."""
        call = self.last_call
        if not self.skips_whole_steps or call is None or call.hit or call.sigma_value is None:
            return
        composition = tuple(call.keys) if call.keys else (self._qualify("all", call.variant),)
        history = self._whole.get(composition)
        if history and history[-1].tensors["eps"].shape != prediction.shape:
            history = None  # another latent size: start over
        entry = _Computed({"eps": prediction.detach()}, call.sigma_value, call.step)
        self._whole[composition] = _extended(history, entry, history_length(self.hit_residual))

    # ------------------------------------------------------------------ calibration records
    def _record_decision(self, call: _Call, keys: tuple[Hashable, ...], chunks: Sequence[torch.Tensor]) -> None:
        trace = CallTrace(keys, call.sigma_value, call.step, self._sigma_step(call.sigma_value))
        trace.guidance = {k: call.guidance.get(k) for k in keys}
        for key, chunk in zip(keys, chunks, strict=True):
            trace.decision[key] = strided_sample(chunk, sample_stride(chunk.numel()))
        call.trace = trace
        call.trace_parts = {}
        self._trace.append(trace)

    def _record_span(self, slot: Hashable, tensors: dict[str, torch.Tensor | None]) -> None:
        """Add this slot's residual samples to the call's span record (per_block slots of one stack add
        up to that stack's tail residual, so both modes record the same thing)."""
        call = self.call
        if call is None or call.trace is None:
            return
        kind = slot[0] if isinstance(slot, tuple) else slot
        for stream, tensor in tensors.items():
            if tensor is None:
                continue
            keys, chunks = self._split(tensor)
            for key, chunk in zip(keys, chunks, strict=True):
                sample = strided_sample(chunk, sample_stride(chunk.numel()))
                part = (key, str(kind), stream)
                old = call.trace_parts.get(part)
                call.trace_parts[part] = sample if old is None or old.shape != sample.shape else old + sample

    def _close_trace(self) -> None:
        call = self.call
        if call is None or call.trace is None:
            return
        for key in call.trace.keys:
            parts = [v for (k, _, _), v in sorted(call.trace_parts.items(), key=lambda kv: kv[0][1:]) if k == key]
            if parts:
                call.trace.span[key] = torch.cat(parts)
        call.trace_parts = {}

    def trace_count(self) -> int:
        """Calls recorded so far in a calibration run (pass it to :meth:`note_output`)."""
        return len(self._trace)

    @torch.compiler.disable
    def note_output(self, prediction: torch.Tensor, since: int) -> None:
        """Calibration runs: the RMS of a call's noise/velocity prediction, per conditioning.

        ``since`` is :meth:`trace_count` before the call: the call's record is the one added after it
        (none when its first blocks did not run through the cache).
        """
        if self.run_mode != "calibrating" or len(self._trace) <= since:
            return
        trace = self._trace[since]
        keys = trace.keys
        chunks = prediction.chunk(len(keys), dim=0) if keys and prediction.shape[0] % len(keys) == 0 else ()
        for key, chunk in zip(keys, chunks, strict=False):
            trace.output_rms[key] = chunk.detach().float().pow(2).mean().sqrt()
            trace.output[key] = strided_sample(chunk, sample_stride(chunk.numel()))

    def compute_uncached(self, transformer_options: dict, reason: str) -> None:
        """Count a model call that runs in full outside the cache (e.g. a UNet call with ControlNet).

        The call neither uses nor refreshes the cache, so the cached residuals of its
        conditionings are dropped: their next call without ``reason`` computes a fresh reference
        instead of reusing one older than this call. Other conditionings (an uncond that ComfyUI
        runs separately without the ControlNet) keep theirs. Logs ``reason`` once per run. Leaves
        no call open (the hooks inside the network see no active call and stay out of the way).
        """
        call = self.begin_call(transformer_options)
        keys = call.keys or (self._all_key(),)
        for key in keys:
            st = self.stats.setdefault(key, KeyStats())
            st.computed += 1
            st.consecutive_hits = 0
        self.control_computes += 1
        for composition in (tuple(keys), (self._all_key(),)):
            self._complete.discard(composition)
            self._stores.pop(composition, None)
            self._whole.pop(composition, None)
        self.warn_once(reason)
        self.end_call()

    # ------------------------------------------------------------------ residual store
    def _composition(self) -> tuple[Hashable, ...]:
        return self.call.keys if self.call is not None and self.call.keys else (self._all_key(),)

    @torch.compiler.disable  # host-side bookkeeping of the residual history
    def store(self, slot: Hashable, tensors: dict[str, torch.Tensor | None]) -> None:
        """Keep the residual(s) of ``slot`` (a block or a block span) from this computed call.

        ``reuse`` keeps the last computed call's; ``extrapolate``/``taylor1`` the last two and
        ``taylor2`` the last three computed calls at different sigmas.
        """
        slots = self._stores.setdefault(self._composition(), {})
        call = self.call
        sigma = call.sigma_value if call is not None else None
        step = call.step if call is not None else 0.0
        entry = _Computed(tensors, sigma, step)
        keep = history_length(self.hit_residual)
        # slots of key names only have nothing to predict: they keep one entry
        slots[slot] = _extended(slots.get(slot), entry, keep if any(t is not None for t in tensors.values()) else 1)
        if self.run_mode == "calibrating":
            self._record_span(slot, tensors)

    def cached(self, slot: Hashable) -> dict[str, torch.Tensor | None]:
        """The residual(s) of ``slot`` for this hit, from the last computed calls of this batch
        composition: reused, extrapolated in sigma, or forecast in the step index (``hit_residual``)."""
        try:
            history = self._stores[self._composition()][slot]
        except KeyError as exc:
            raise RuntimeError(
                f"First Block Cache: no cached residual for {slot!r}; the model's block layout changed "
                "between steps. Please report this with the model type."
            ) from exc
        if len(history) == 1:
            return history[-1].tensors
        return self._predict(history)

    @torch.compiler.disable  # reads this call's sigma on the host: traced, every new sigma would recompile
    def _predict(self, history: list[_Computed]) -> dict[str, torch.Tensor | None]:
        """The forecast of a slot at this call from its computed ``history`` (oldest first)."""
        call = self.call
        sigma = call.sigma_value if call is not None else None
        last = history[-1]
        if self.hit_residual == "extrapolate":
            previous = history[-2]
            if sigma is None or last.sigma is None or previous.sigma is None:
                return last.tensors
            weight = extrapolation_weight(sigma, last.sigma, previous.sigma)
            if weight == 0.0:
                return last.tensors
            out: dict[str, torch.Tensor | None] = {}
            for key, r1 in last.tensors.items():
                r0 = previous.tensors.get(key)
                # r1 + w (r1 - r0) in one kernel
                out[key] = r1 if r1 is None or r0 is None or r0.shape != r1.shape else torch.lerp(r0, r1, 1.0 + weight)
            return out
        step = call.step if call is not None else last.step
        weights = step_weights(self.hit_residual, [h.step for h in history], step)
        out = {}
        for key, r_last in last.tensors.items():
            parts = [h.tensors.get(key) for h in history]
            if r_last is None or any(p is None or p.shape != r_last.shape for p in parts):
                out[key] = r_last
            else:
                out[key] = combine(parts, weights)
        return out

    def finish_compute(self) -> None:
        """The computed call ran to the end: its residuals may now serve hits."""
        self._complete.add(self._composition())
        if self.run_mode == "calibrating":
            self._close_trace()

    def switch_mode(self, mode: str, reason: str) -> None:
        """Change the residual layout for the rest of this run (the cached residuals are dropped)."""
        if mode == self.cache_mode:
            return
        logger.info("First Block Cache: %s -> %s cache_mode for this run (%s).", self.cache_mode, mode, reason)
        self.cache_mode = mode
        self._stores.clear()
        self._complete.clear()

    def warn_once(self, message: str) -> None:
        """Log a warning the first time ``message`` comes up in this run."""
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("First Block Cache: %s", message)

    # ------------------------------------------------------------------ report
    def summary(self) -> dict:
        """Counts per conditioning, hit rate and the speedup estimate (skipped calls cost ~0)."""
        self.flush()
        per_key = {}
        computed = skipped = 0
        for idx, (key, st) in enumerate(self.stats.items()):
            label = self._labels.get(key) or _key_label(key, idx)
            if label in per_key:
                label = f"{label}#{idx}"
            per_key[label] = {"computed": st.computed, "skipped": st.skipped}
            computed += st.computed
            skipped += st.skipped
        total = computed + skipped
        return {
            "per_conditioning": per_key,
            "computed": computed,
            "skipped": skipped,
            "hit_rate": skipped / total if total else 0.0,
            "estimated_speedup": total / computed if computed else 1.0,
            "resets": self.resets,
            "control_computes": self.control_computes,
            # what the cache holds now (at the end of a run: its references and residuals, before the reset)
            "cache_MiB": round(self.memory_bytes() / 2**20, 1),
            "run_mode": self.run_mode,
            "threshold": self.threshold,
            "decided_ahead": self._ahead_ok and self._counting,
            "ahead_stopped": self.ahead_stopped,
            "whole_step_skips": self.whole_skips,
        }

    def summary_text(self) -> str:
        if self.run_mode == "off":
            return self.off_reason
        s = self.summary()
        parts = [f"{k}: {v['computed']} computed / {v['skipped']} skipped" for k, v in s["per_conditioning"].items()]
        control = (
            f"; {s['control_computes']} model calls computed in full because ControlNet was active"
            if s["control_computes"]
            else ""
        )
        blocks = (
            f", first {self.n_first} / last {self.n_last} blocks always computed"
            if (self.n_first != 1 or self.n_last)
            else ""
        )
        text = (
            f"First Block Cache{(' [' + self.description + ']') if self.description else ''}: "
            f"{'; '.join(parts) or 'no model calls'}; hit rate {s['hit_rate']:.0%}, "
            f"estimated speedup {s['estimated_speedup']:.2f}x (threshold {self.threshold:.4g}, mode {self.cache_mode}, "
            f"hit residual {self.hit_residual}{blocks}); cache memory {s['cache_MiB']:g} MiB"
            f"{control}"
        )
        if self.run_mode == "calibrating":
            text += f". Target {self._target_text()}: calibration run, every step computed"
            if self.calibration is not None:
                text += f"; chose {self.calibration.describe()} for later runs with this sampler and schedule"
                if not self.calibration.reached:
                    text += " (the target is out of reach with these settings: this is the closest)"
        elif self.run_mode == "calibrated" and self.calibration is not None:
            text += f". Target {self._target_text()}: calibrated {self.calibration.describe()}"
        if s["decided_ahead"]:
            text += (
                f". Decided ahead of the GPU until {self.ahead_stopped}"
                if self.ahead_stopped
                else ". Skips decided ahead of the GPU (no wait per step)"
            )
        if s["whole_step_skips"]:
            text += f"; {s['whole_step_skips']} skipped calls ran no block (whole prediction forecast, no guard)"
        return text

    def memory_bytes(self) -> int:
        """Bytes held by references and cached residuals (for the memory report)."""
        seen: set[int] = set()
        total = 0

        def add(t: torch.Tensor | None) -> None:
            nonlocal total
            if t is None:
                return
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()

        for history in self._refs.values():
            for ref in history:
                add(ref.residual)
        for slots in self._stores.values():
            for history in slots.values():
                for entry in history:
                    for t in entry.tensors.values():
                        add(t)
        for history in self._whole.values():
            for entry in history:
                add(entry.tensors["eps"])
        return total


def _extended(history: list[_Computed] | None, entry: _Computed, keep: int) -> list[_Computed]:
    """``history`` with ``entry`` appended, the last ``keep`` kept; a fresh history when only one is
    kept, or when ``entry`` is not at a new sigma (a forecast needs distinct points)."""
    if (
        keep > 1
        and history
        and entry.sigma is not None
        and history[-1].sigma is not None
        and history[-1].sigma != entry.sigma
    ):
        history.append(entry)
        del history[:-keep]
        return history
    return [entry]


def _key_label(key: Hashable, index: int) -> str:
    if isinstance(key, VariantKey):
        return f"{_key_label(key.key, index)} (call variant #{key.variant})"
    if key == 0:
        return "cond"
    if key == 1:
        return "uncond"
    if key == "all":
        return "all"
    return f"cond#{index}"
