"""Reading from a run's own steps whether its sampler reuses earlier predictions (CPU, no ComfyUI)."""

from __future__ import annotations

import math

import torch

from fbcache.sampler_update import UpdateProbe

STEPS = 20


def _denoiser():
    """A fixed nonlinear 'model': the prediction of x at sigma."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) / 8

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return torch.tanh(x.reshape(-1, 64) @ w).reshape(x.shape) / (1 + sigma)

    return denoise


def _sigmas() -> list[float]:
    return [14.0 * (1 - k / STEPS) ** 2 + 0.03 for k in range(STEPS)] + [0.0]


def _run(update, noise_scale: float = 0.0) -> UpdateProbe:
    """Sample with ``update(x, denoised, history, sigma, sigma_next)``, reporting each step as ComfyUI's callback does."""
    probe = UpdateProbe()
    denoise = _denoiser()
    sigmas = _sigmas()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g) * sigmas[0]
    history: list[torch.Tensor] = []
    for k in range(STEPS):
        d = denoise(x, sigmas[k])
        probe.record(k, d, x)
        x = update(x, d, history, sigmas[k], sigmas[k + 1])
        history.append(d)
        if noise_scale:
            x = x + noise_scale * sigmas[k + 1] * torch.randn(x.shape, generator=g)
    return probe


def _euler(x, d, history, s, s_next):
    return x + (s_next - s) * (x - d) / s


def _two_step(x, d, history, s, s_next):
    """The shape of dpmpp_2m: exponential integrator on a combination of this and the last prediction."""
    if not history or s_next == 0:
        return _euler(x, d, history, s, s_next)
    h = math.log(s / s_next)
    combined = 1.5 * d - 0.5 * history[-1]
    return (s_next / s) * x - math.expm1(-h) * combined


def _four_step(x, d, history, s, s_next):
    """Adams-Bashforth of order 4 on the derivative (ipndm's form): earlier latents enter too."""
    derivs = getattr(_four_step, "derivs", None)
    if derivs is None or not history:
        derivs = _four_step.derivs = []
    derivs.append((x - d) / s)
    coeffs = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    c = coeffs[min(len(derivs), 4)]
    return x + (s_next - s) * sum(ci * derivs[-1 - i] for i, ci in enumerate(c))


def _heun(x, d, history, s, s_next):
    """Two model calls per step, the second one unseen by the callback."""
    if s_next == 0:
        return _euler(x, d, history, s, s_next)
    predicted = _euler(x, d, history, s, s_next)
    d2 = _denoiser()(predicted, s_next)
    return x + (s_next - s) * ((x - d) / s + (predicted - d2) / s_next) / 2


def test_single_step_updates_read_as_single_step():
    assert _run(_euler).multistep() is False


def test_updates_that_reuse_earlier_predictions_read_as_multistep():
    assert _run(_two_step).multistep() is True
    assert _run(_four_step).multistep() is True


def test_fresh_noise_or_unseen_model_calls_leave_it_undecided():
    """Ancestral/SDE samplers and samplers with a second model call per step fit neither form
    exactly: the caller falls back to the sampler's name."""
    assert _run(_euler, noise_scale=0.3).multistep() is None
    assert _run(_two_step, noise_scale=0.3).multistep() is None
    assert _run(_heun).multistep() is None


def test_unreadable_steps_leave_it_undecided_and_never_raise(monkeypatch):
    """The probe runs inside the sampler's callback: an error there must not stop the sampling."""
    nan = _run(_two_step)
    nan._rows[5] = nan._rows[5] * float("nan")
    assert nan.multistep() is None

    def broken(*args, **kwargs):
        raise RuntimeError("an unusual tensor")

    probe = UpdateProbe()
    monkeypatch.setattr(probe, "_record", broken)
    x = torch.randn(1, 4, 8, 8)
    for k in range(STEPS):
        probe.record(k, x * 0.5, x)  # does not raise
    assert probe.multistep() is None


def test_too_few_steps_or_no_tensors_leave_it_undecided():
    probe = UpdateProbe()
    x = torch.randn(1, 4, 8, 8)
    for k in range(4):
        probe.record(k, x * 0.5, x)
    assert probe.multistep() is None
    empty = UpdateProbe()
    empty.record(0, None, x)  # another sampler's callback without tensors: ignored
    assert empty.multistep() is None
    tiny = UpdateProbe()  # fewer values than the fits need to be overdetermined: nothing recorded
    for k in range(STEPS):
        tiny.record(k, torch.full((1, 4, 2, 2), 0.5 * k), torch.full((1, 4, 2, 2), float(k)))
    assert tiny._rows == [] and tiny.multistep() is None


def test_a_restarted_run_starts_over():
    """Steps that are not consecutive (the sampler started again): only the new run counts."""
    probe = _run(_two_step)
    x = torch.randn(2, 4, 8, 8)
    for k in range(3):
        probe.record(k, x * 0.5, x)  # a new run's first three steps: too few on their own
    assert probe.multistep() is None


def test_recording_keeps_a_small_subsample_and_leaves_the_inputs_alone():
    probe = UpdateProbe()
    x = torch.randn(1, 16, 64, 64)
    d = torch.randn(1, 16, 64, 64)
    before = (x.clone(), d.clone())
    probe.record(0, d, x)
    assert torch.equal(x, before[0]) and torch.equal(d, before[1])
    assert probe._rows[0].shape == (2, 256)
