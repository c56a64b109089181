"""What one skipped step costs, measured and as estimated from the uncached run alone.

Used by ``fbcache_quality.py --methods skip_sensitivity``. For every step from the fourth on, one
run skips exactly that step whole (``fit1`` forecast, forced) and its PSNR against the uncached
run is measured. Two estimates of the same number come from the uncached run only:

- ``single_step``: the node's quality model (``fbcache/calibration.py``): the guided prediction's
  forecast error, times the sigma step, times how much of an error at that noise level survives
  to the end. It treats every sampler as a single-step one (euler).
- ``sampler_aware``: the sampler's own update, ``x[k+1] = a x[k] + b D[k] + c D[k-1]`` (``D`` the
  guided denoised prediction), identified per step by least squares from the uncached trajectory
  (exact for euler, where ``c`` is 0, and dpmpp_2m), then a unit error in ``D`` at the skipped
  step propagated through it to the end, with the denoiser answering a change of its input as a
  Gaussian-data denoiser does (``1 / (1 + sigma^2)`` for eps models, ``(1 - t) / ((1 - t)^2 +
  t^2)`` for flow models).

Both use the PSNR's peak-to-peak range of the measured PSNR (2). Where the sampler-aware estimate
misses as much as the single-step one, the extra cost of a skip under a multistep sampler does not
come from the update's arithmetic but from the trained model's response to the changed latent,
which no estimate from one uncached run can see.
"""

from __future__ import annotations

import importlib
import math

import torch

RESIDUAL = "fit1"
FIRST_STEP = 3


def _psnr_of(error: float, peak_to_peak: float = 2.0) -> float:
    return 99.0 if error <= 0 else 20 * math.log10(peak_to_peak / error)


def _trajectory(bench, sampler: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The uncached run's latents ``x[0..N]`` and guided denoised predictions ``D[0..N-1]`` (float64)."""
    xs: list[torch.Tensor] = []
    ds: list[torch.Tensor] = []

    def callback(step, x0, x, total_steps):
        xs.append(x.detach().double().clone())
        ds.append(x0.detach().double().clone())

    out, _ = bench.sample(bench.patcher, sampler, callback=callback)
    xs.append(out.double())  # bench.sample returns the model's space, the sampler's
    return xs, ds


def update_coefficients(xs: list[torch.Tensor], ds: list[torch.Tensor]) -> list[tuple[float, float, float, float]]:
    """Per step ``(a, b, c, relative residual)`` of ``x[k+1] = a x[k] + b D[k] + c D[k-1]``."""
    found = []
    for k in range(len(ds)):
        columns = [xs[k].reshape(-1), ds[k].reshape(-1)] + ([ds[k - 1].reshape(-1)] if k else [])
        a = torch.stack(columns, 1)
        y = xs[k + 1].reshape(-1)
        solution = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1)
        residual = ((a @ solution - y).norm() / y.norm().clamp_min(1e-30)).item()
        values = solution.tolist() + [0.0]
        found.append((values[0], values[1], values[2], residual))
    return found


def gaussian_response(sigma: float, flow: bool) -> float:
    """How a Gaussian-data (unit variance) denoiser's output moves with its input at ``sigma``."""
    if flow:
        t = min(max(sigma, 0.0), 1.0)
        return (1 - t) / ((1 - t) ** 2 + t**2)
    return 1.0 / (1.0 + sigma * sigma)


def propagated_gain(coefficients, sigmas: list[float], step: int, flow: bool) -> float:
    """The final latent's change per unit error in ``D[step]``, through the identified updates."""
    n = len(coefficients)
    dx = [0.0] * (n + 1)
    dd = [0.0] * n
    for k in range(n):
        dd[k] = gaussian_response(sigmas[k], flow) * dx[k] + (1.0 if k == step else 0.0)
        a, b, c, _ = coefficients[k]
        dx[k + 1] = a * dx[k] + b * dd[k] + (c * dd[k - 1] if k else 0.0)
    return abs(dx[n])


def skip_sensitivity(bench, sampler: str) -> None:
    """Record one ``skip_sensitivity`` row per skipped step (measured PSNR and both estimates)."""
    import comfy.samplers

    calibration = importlib.import_module(bench.fbc.__name__ + ".calibration")
    forecast = importlib.import_module(bench.fbc.__name__ + ".forecast")
    flow = bench.kind == "dit"
    xs, ds = _trajectory(bench, sampler)
    n = len(ds)
    scheduler = bench.schedulers.get(sampler, "normal")
    sigmas = comfy.samplers.calculate_sigmas(bench.model.model_sampling, scheduler, n).double().tolist()
    coefficients = update_coefficients(xs, ds)
    predictions = [(xs[k] - ds[k]) / max(sigmas[k], 1e-6) for k in range(n)]
    keep = forecast.history_length(RESIDUAL)
    for step in range(FIRST_STEP, n):
        history = list(range(max(0, step - keep), step))
        weights = forecast.step_weights(RESIDUAL, [float(h) for h in history], float(step))
        miss = sum(w * predictions[h] for w, h in zip(weights, history, strict=True)) - predictions[step]
        rms = miss.pow(2).mean().sqrt().item()
        single = abs(sigmas[step + 1] - sigmas[step]) * calibration.survival(sigmas[step], flow) * rms
        aware = propagated_gain(coefficients, sigmas, step, flow) * sigmas[step] * rms
        out, t = bench.forced_plan(sampler, [k for k in range(n) if k != step], RESIDUAL)
        a, b, c, residual = coefficients[step]
        bench.record(
            sampler,
            "skip_sensitivity",
            step,
            out,
            t,
            0.0,
            estimate_single_step_db=round(_psnr_of(single), 2),
            estimate_sampler_aware_db=round(_psnr_of(aware), 2),
            update=[round(a, 4), round(b, 4), round(c, 4)],
            update_fit_residual=round(residual, 6),
        )
