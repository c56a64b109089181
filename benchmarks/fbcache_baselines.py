"""Whole-step caches from the literature, re-implemented for the First Block Cache benchmark.

Written from the papers' descriptions (no code taken from their repositories), as ComfyUI
``DIFFUSION_MODEL`` wrappers around the whole network, so they run on any model the benchmark
builds. A skipped call runs no block at all.

- :class:`MagCache` (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache",
  arXiv 2506.09045). The residual of a step is ``output - input`` of the network. One
  calibration run records the ratio of the mean per-position L2 norm of each step's residual to
  the previous step's (the "magnitude ratio", which stays close to 1 for most of the schedule).
  While sampling, the ratios of the steps since the last computed one are multiplied; their
  distance from 1 is added up as the estimated error. A step is skipped (input + cached residual)
  while that error stays below the threshold and at most ``max_skips`` steps in a row; the first
  ``retention`` fraction of steps is always computed.
- :class:`TaylorSeerWholeStep` (Liu et al., "From Reusing to Forecasting: Accelerating Diffusion
  Models with TaylorSeers", arXiv 2503.06923). Every ``interval``-th step (after ``warmup``
  computed steps) is computed; on a computed step the derivatives of the network output are
  updated by backward finite differences over the distance to the previous computed step; a
  skipped step ``k`` steps later gets the Taylor series ``sum_n D_n k^n / n!`` up to ``order``.
  The paper forecasts every attention and MLP output inside the blocks; here the whole network
  output is forecast, which costs no block on a forecast step.

Both count calls as steps: with batched cond/uncond (the benchmark's case) one call is one step.

Also here, for a design question of our own cache rather than a competitor:
:class:`QuantityForecastWholeStep` skips whole steps on a fixed plan like ``skip_whole_step`` does,
but forecasts a flow model's noise prediction ``x + (1 - sigma) v`` or its denoised latent instead
of its velocity ``v`` (what the node forecasts, ``(x - denoised) / sigma``), with the node's own
forecast weights.
"""

from __future__ import annotations

import math

import torch

KEY = "fbcache_bench_baseline"


def _options(args: tuple, kwargs: dict) -> dict:
    if isinstance(kwargs.get("transformer_options"), dict):
        return kwargs["transformer_options"]
    return next((a for a in reversed(args) if isinstance(a, dict) and "sample_sigmas" in a), {})


def _residual_magnitude(r: torch.Tensor) -> float:
    """Mean over positions of the L2 norm over channels (dim 1)."""
    return r.float().norm(dim=1).mean().item()


class MagCache:
    """MagCache's magnitude-ratio skip rule (see the module docstring)."""

    def __init__(self, ratios: list[float], threshold: float, max_skips: int = 4, retention: float = 0.2) -> None:
        self.ratios, self.threshold, self.max_skips, self.retention = ratios, threshold, max_skips, retention
        self.reset()

    def reset(self) -> None:
        self.index = 0
        self.ratio = 1.0
        self.error = 0.0
        self.skips = 0
        self.residual: torch.Tensor | None = None

    def wrapper(self, executor, *args, **kwargs):
        x = args[0]
        i = self.index
        self.index += 1
        steps = len(self.ratios)
        if self.residual is not None and i >= math.ceil(self.retention * steps) and i < steps:
            self.ratio *= self.ratios[i]
            self.error += abs(1.0 - self.ratio)
            self.skips += 1
            if self.error < self.threshold and self.skips <= self.max_skips:
                return x + self.residual
        out = executor(*args, **kwargs)
        self.residual = out - x
        self.ratio, self.error, self.skips = 1.0, 0.0, 0
        return out

    @staticmethod
    def calibration_wrapper(record: list[float]):
        """A wrapper that appends each call's magnitude ratio to ``record`` (first call: 1.0)."""
        last: dict[str, float] = {}

        def wrapper(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            magnitude = _residual_magnitude(out - args[0])
            record.append(magnitude / last["m"] if "m" in last else 1.0)
            last["m"] = magnitude
            return out

        return wrapper


class TaylorSeerWholeStep:
    """TaylorSeer's fixed-interval Taylor forecast of the network output (see the module docstring)."""

    def __init__(self, interval: int, order: int = 2, warmup: int = 3) -> None:
        self.interval, self.order, self.warmup = interval, order, warmup
        self.reset()

    def reset(self) -> None:
        self.index = 0
        self.last_full = -1
        self.derivatives: list[torch.Tensor] = []

    def _computes(self, i: int) -> bool:
        return i < self.warmup or (i - self.warmup) % self.interval == 0

    def wrapper(self, executor, *args, **kwargs):
        i = self.index
        self.index += 1
        if self._computes(i) or not self.derivatives:
            out = executor(*args, **kwargs)
            distance = i - self.last_full if self.last_full >= 0 else 1
            new = [out]
            for n in range(1, self.order + 1):
                if len(self.derivatives) < n:
                    break
                new.append((new[n - 1] - self.derivatives[n - 1]) / distance)
            self.derivatives, self.last_full = new, i
            return out
        k = i - self.last_full
        out = self.derivatives[0].clone()
        for n in range(1, len(self.derivatives)):
            out = out + self.derivatives[n] * (k**n / math.factorial(n))
        return out


class QuantityForecastWholeStep:
    """Whole-step skips on a fixed plan (steps not in ``computed`` skipped, one call per step) on a
    flow model (ComfyUI ``CONST`` sampling: ``x = sigma * noise + (1 - sigma) * x0``), forecasting
    another quantity than the node's velocity ``v = (x - denoised) / sigma`` by ``hit_residual``'s
    step-index rule over the computed steps: ``space`` "noise" (the noise prediction
    ``x + (1 - sigma) v``; a skip returns the denoised latent ``(x - sigma * noise) / (1 - sigma)``
    it implies) or "denoised" (the model's ``x0`` prediction itself, forecast as it is). ``forecast``:
    the pack's ``fbcache.forecast`` module (its ``step_weights`` and ``combine``, as the node's
    whole-step skips use them). An ``APPLY_MODEL`` wrapper (``x`` and ``sigma`` are its first two
    arguments)."""

    LEVEL = "apply_model"
    SPACES = ("noise", "denoised")

    def __init__(self, computed: set[int], hit_residual: str, forecast, space: str = "noise") -> None:
        if space not in self.SPACES:
            raise ValueError(f"space must be one of {self.SPACES}, got {space!r}")
        self.computed, self.hit_residual, self.forecast, self.space = set(computed), hit_residual, forecast, space
        self.reset()

    def reset(self) -> None:
        self.index = 0
        self.history: list[tuple[int, torch.Tensor]] = []

    def wrapper(self, executor, x, sigma, *args, **kwargs):
        i = self.index
        self.index += 1
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)
        if i not in self.computed and self.history:
            weights = self.forecast.step_weights(self.hit_residual, [float(p) for p, _ in self.history], float(i))
            value = self.forecast.combine([t for _, t in self.history], weights)
            return value if self.space == "denoised" else (x - s * value) / (1 - s)
        denoised = executor(x, sigma, *args, **kwargs)
        kept = denoised if self.space == "denoised" else x + (1 - s) * (x - denoised) / s
        self.history = (self.history + [(i, kept)])[-3:]
        return denoised


def attach(patcher, method):
    """``patcher`` cloned with ``method`` (MagCache / TaylorSeerWholeStep around the network,
    QuantityForecastWholeStep around ``apply_model``), reset at the start of every sampling run."""
    from comfy.patcher_extension import WrappersMP

    m = patcher.clone()

    def outer(executor, *args, **kwargs):
        method.reset()
        return executor(*args, **kwargs)

    level = WrappersMP.APPLY_MODEL if getattr(method, "LEVEL", "") == "apply_model" else WrappersMP.DIFFUSION_MODEL
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer)
    m.add_wrapper_with_key(level, KEY, method.wrapper)
    return m


def calibrate_magcache(patcher, run) -> list[float]:
    """MagCache's magnitude ratios from one uncached run: ``run(model)`` samples once."""
    from comfy.patcher_extension import WrappersMP

    record: list[float] = []
    m = patcher.clone()
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, MagCache.calibration_wrapper(record))
    run(m)
    return record
