"""What a skipped block span adds back: its residual reused, extrapolated, or forecast by a Taylor expansion.

Pure math on the residuals of the last computed steps; the holder keeps the history.

- ``reuse``: the last computed residual as it is (order 0; classic First Block Cache).
- ``extrapolate``: a straight line in sigma through the last two computed residuals,
  ``r1 + w (r1 - r0)``, ``w = (sigma - s1) / (s1 - s0)`` clamped to ``[0, MAX_EXTRAPOLATION]``.
- ``taylor1`` / ``taylor2``: a Taylor expansion in the *step index* about the last computed step,
  ``r(x) = r_n + r'(x_n) (x - x_n) + r''(x_n) (x - x_n)^2 / 2``, with the derivatives taken from
  divided differences of the last 2 (3) computed residuals. With unevenly spaced computed steps (a
  cache computes some steps and skips others) divided differences are the exact derivatives of the
  polynomial through those points, so the forecast is that polynomial evaluated at the current step.
  It is written as Lagrange weights, ``sum_i w_i r_i``: the weights are host floats and the
  tensors are combined in one pass. Sigma moves very unevenly along common schedules (karras);
  the step index moves evenly, which is what a low-order polynomial extrapolates well.
- ``fit1``: a straight line in the step index fitted by least squares to the last 3 computed
  residuals (``taylor1`` passes exactly through the last 2). The fit does not follow the
  step-to-step wobble of single computed steps, and the forecast joins the next computed step
  with a smaller jump; multistep samplers (dpmpp_2m), which difference consecutive predictions,
  are sensitive to such jumps (``docs/fbcache.md``: on the toy UNet with dpmpp_2m a 3x plan
  skipping whole steps kept 2.3 dB more with it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HIT_RESIDUALS = ("reuse", "extrapolate", "taylor1", "taylor2", "fit1")
"""Choices of ``hit_residual`` (see the module docstring)."""

MAX_EXTRAPOLATION = 2.0
"""Largest ``extrapolate`` weight ``w`` (two computed-step spacings ahead): beyond that a linear
prediction is a guess, and ``max_consecutive_hits`` normally stops long runs of hits anyway."""

MAX_FORECAST_GAPS = 3.0
"""A Taylor forecast reaches at most this many last computed-step spacings beyond the last computed
step; further away it holds the value at that distance (a polynomial diverges quickly)."""


def history_length(hit_residual: str) -> int:
    """How many computed residuals of a slot ``hit_residual`` needs (1 reuse, 2 extrapolate/taylor1, 3 taylor2/fit1)."""
    return {"reuse": 1, "extrapolate": 2, "taylor1": 2, "taylor2": 3, "fit1": 3}[hit_residual]


def taylor_order(hit_residual: str) -> int:
    """The polynomial order of a step-index forecast (0 for reuse and the sigma-based extrapolate)."""
    return {"taylor1": 1, "taylor2": 2, "fit1": 1}.get(hit_residual, 0)


def lagrange_weights(points: Sequence[float], x: float) -> list[float]:
    """Weights ``w_i`` with ``p(x) = sum_i w_i y_i`` for the polynomial through ``(points[i], y_i)``.

    ``points`` must be distinct. Equal to the Taylor expansion about any of the points with
    divided-difference derivatives (the same polynomial).
    """
    weights = []
    for i, xi in enumerate(points):
        w = 1.0
        for j, xj in enumerate(points):
            if j != i:
                w *= (x - xj) / (xi - xj)
        weights.append(w)
    return weights


def forecast_position(points: Sequence[float], x: float) -> float:
    """``x`` clamped to ``[last point, last point + MAX_FORECAST_GAPS * last spacing]``."""
    last = points[-1]
    if len(points) < 2:
        return last
    reach = MAX_FORECAST_GAPS * abs(points[-1] - points[-2])
    return min(max(x, last), last + reach)


def combine(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]`` (the last tensor first, so one term is exact when its weight is 1)."""
    out = torch.mul(tensors[-1], weights[-1])
    for t, w in zip(tensors[:-1], weights[:-1], strict=True):
        out.add_(t, alpha=w)
    return out


def _last_distinct(points: Sequence[float], count: int) -> list[int]:
    """Indices (oldest first) of the last ``count`` distinct values of ``points``."""
    use: list[int] = []
    for i in range(len(points) - 1, -1, -1):
        if len(use) == count:
            break
        if all(points[i] != points[j] for j in use):
            use.append(i)
    use.reverse()
    return use


def taylor_weights(points: Sequence[float], x: float, order: int) -> list[float]:
    """Weights over ``points`` (oldest first) of an order-``order`` forecast at ``x``.

    Uses the last ``order + 1`` distinct points (fewer if fewer are known: the order drops);
    the weights of unused older points are 0.
    """
    use = _last_distinct(points, order + 1)
    chosen = [points[i] for i in use]
    weights = [0.0] * len(points)
    for i, w in zip(use, lagrange_weights(chosen, forecast_position(chosen, x)), strict=True):
        weights[i] = w
    return weights


def fit_weights(points: Sequence[float], x: float) -> list[float]:
    """Weights over ``points`` (oldest first) of the least-squares line through the last 3 distinct
    points, evaluated at ``x`` (clamped like :func:`forecast_position`): ``1/n + (x - m)(x_i - m) / S``,
    ``m`` the points' mean and ``S`` the sum of their squared deviations. Fewer points: the
    polynomial through them (two: ``taylor1``)."""
    use = _last_distinct(points, 3)
    if len(use) < 3:
        return taylor_weights(points, x, len(use) - 1)
    chosen = [points[i] for i in use]
    at = forecast_position(chosen, x)
    mean = sum(chosen) / len(chosen)
    spread = sum((p - mean) ** 2 for p in chosen)
    weights = [0.0] * len(points)
    for i, p in zip(use, chosen, strict=True):
        weights[i] = 1.0 / len(chosen) + (at - mean) * (p - mean) / spread
    return weights


def step_weights(hit_residual: str, points: Sequence[float], x: float) -> list[float]:
    """Weights over ``points`` of ``hit_residual``'s step-index forecast at ``x`` (``taylor1``,
    ``taylor2``, ``fit1``; ``reuse``: the last point)."""
    if hit_residual == "fit1":
        return fit_weights(points, x)
    return taylor_weights(points, x, taylor_order(hit_residual))


def extrapolation_weight(sigma: float, s1: float, s0: float) -> float:
    """``extrapolate``'s ``w = (sigma - s1) / (s1 - s0)`` clamped to ``[0, MAX_EXTRAPOLATION]``."""
    weight = (sigma - s1) / (s1 - s0)
    return min(max(weight, 0.0), MAX_EXTRAPOLATION)


def step_position(schedule: Sequence[float], sigma: float) -> float:
    """Where ``sigma`` lies on a descending sigma ``schedule``, in steps (piecewise linear).

    ``schedule[i]`` is at ``i``; a sigma between two entries gets the fractional index (second
    evaluations of Heun/DPM-2 land between steps). Outside the schedule it is clamped to the ends.
    """
    if not schedule:
        return 0.0
    if sigma >= schedule[0]:
        return 0.0
    for i in range(len(schedule) - 1):
        hi, lo = schedule[i], schedule[i + 1]
        if hi >= sigma >= lo:
            return float(i) if hi == lo else i + (hi - sigma) / (hi - lo)
    return float(len(schedule) - 1)
