"""DDPM noise schedule, training targets and loss weights for SD1.5 / SDXL.

Both models were trained with the "scaled_linear" DDPM schedule (beta 0.00085 .. 0.012 over 1000
steps); ComfyUI's discrete model sampling for them uses the same betas, so a LoRA trained here
sees exactly the noise levels the sampler will ask for.
"""

from __future__ import annotations

import torch

NUM_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
PREDICTIONS = ("eps", "v")


def alphas_cumprod(
    num_timesteps: int = NUM_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """``alpha_bar[t]`` of the scaled_linear schedule (betas linear in sqrt space), float64 [T]."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(timesteps.device)[timesteps].to(torch.float32)
    return out.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """``sqrt(a) * x0 + sqrt(1 - a) * noise`` with ``a = alpha_bar[t]`` per sample (fp32)."""
    a = _gather(acp, timesteps, x0)
    return a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise.float()


def target(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, acp: torch.Tensor, prediction: str
) -> torch.Tensor:
    """What the model must predict: the noise (``eps``) or the velocity ``sqrt(a)*noise - sqrt(1-a)*x0`` (``v``)."""
    if prediction == "eps":
        return noise.float()
    if prediction == "v":
        a = _gather(acp, timesteps, x0)
        return a.sqrt() * noise.float() - (1.0 - a).sqrt() * x0.float()
    raise ValueError(f"prediction={prediction!r} is not supported; use one of {PREDICTIONS}")


def snr(timesteps: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a / (1 - a)`` per timestep (fp32)."""
    a = acp.to(timesteps.device)[timesteps]
    return (a / (1.0 - a)).to(torch.float32)


def min_snr_weights(timesteps: torch.Tensor, acp: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``min(snr, gamma) / snr`` for eps,
    ``min(snr, gamma) / (snr + 1)`` for v-prediction; all ones when ``gamma <= 0`` (off)."""
    if gamma <= 0:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    s = snr(timesteps, acp)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if prediction == "v" else clipped / s


def mse_per_sample(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32, one value per batch item."""
    diff = pred.float() - tgt.float()
    return diff.pow(2).flatten(1).mean(dim=1)
