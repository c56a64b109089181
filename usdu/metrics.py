"""Seam visibility: how much stronger the image changes across tile borders than beside them."""

from __future__ import annotations

import torch

BASELINE_OFFSETS: tuple[int, ...] = (-32, -24, -16, -8, 8, 16, 24, 32)
"""Parallel lines the border lines are compared with (pixels; multiples of 8 so a 2x or
4x upscale's pixel phase is the same as on the border)."""


def _luma(image: torch.Tensor) -> torch.Tensor:
    x = image.to(torch.float32)
    if x.shape[-1] >= 3:
        return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return x[..., 0]


def _lines(size: int, tile: int, offset: int) -> list[int]:
    """Indices ``i`` of steps ``(i, i+1)`` for borders at ``k * tile`` shifted by ``offset``."""
    out = []
    for k in range(1, -(-size // tile)):
        i = k * tile - 1 + offset
        if 0 <= i < size - 1:
            out.append(i)
    return out


def seam_visibility_ratio(image: torch.Tensor, tile_width: int, tile_height: int) -> float:
    """Mean |luminance step| across the tile grid's borders (``x = k * tile_width``,
    ``y = k * tile_height``) divided by the mean step across parallel lines 8-32 px away,
    for a ``[B, H, W, C]`` image. About 1.0: seams invisible; above ~1.3: visible.
    NaN when the grid has no interior border.
    """
    y = _luma(image)
    dx = (y[:, :, 1:] - y[:, :, :-1]).abs()
    dy = (y[:, 1:, :] - y[:, :-1, :]).abs()
    h, w = y.shape[1], y.shape[2]

    def mean_step(offset: int) -> tuple[float, int]:
        cols, rows = _lines(w, tile_width, offset), _lines(h, tile_height, offset)
        total = dx[:, :, cols].sum() + dy[:, rows, :].sum()
        count = dx[:, :, cols].numel() + dy[:, rows, :].numel()
        return float(total), count

    border, n_border = mean_step(0)
    base = [mean_step(o) for o in BASELINE_OFFSETS]
    n_base = sum(c for _, c in base)
    if n_border == 0 or n_base == 0:
        return float("nan")
    mean_base = sum(t for t, _ in base) / n_base
    return (border / n_border) / mean_base if mean_base > 0 else float("inf")
