"""Validation loss on held-out images: the same loss as training, made deterministic.

The training loss of one step depends on the random timestep and noise drawn for it, so its
curve is too noisy to show over-fitting. Validation instead scores held-out images at fixed
timesteps with fixed noise (:data:`TIMESTEPS`, seeds derived from the image's position), so
two points of the curve differ only because the LoRA changed: a validation loss that rises
while the training loss falls is over-fitting.
"""

from __future__ import annotations

import torch

TIMESTEPS = (100, 300, 500, 700, 900)
"""Spread over the 1000-step schedule: fine detail to composition."""
SPLIT_MAX = 0.5


def split_holdout(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices of ``count`` images: ``round(count * fraction)`` (at least
    one) images held out, chosen by ``seed``; ``fraction == 0`` holds out none."""
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= SPLIT_MAX):
        raise ValueError(
            f"validation_split: {fraction!r} is out of range; use 0 (off) to {SPLIT_MAX} (e.g. 0.1 = one image in ten)"
        )
    if fraction == 0:
        return list(range(count)), []
    held = max(1, round(count * fraction))
    if count - held < 1:
        raise ValueError(
            f"validation_split: holding out {held} of {count} image(s) leaves none to train on; "
            "add images or set validation_split to 0"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[held:]), sorted(order[:held])


def fixed_noise(shape: tuple[int, ...], image_index: int, timestep: int) -> torch.Tensor:
    """The noise image ``image_index`` gets at ``timestep``, the same at every evaluation."""
    gen = torch.Generator().manual_seed(1_000_003 * (image_index + 1) + timestep)
    return torch.randn(shape, generator=gen)
