"""Blend masks for tile jobs, built directly in crop coordinates.

Every mask is separable or radial and computed in closed form, in float32:

- a rectangle feathered by a Gaussian blur of sigma ``blur`` is, along one axis,
  ``Phi((x - x0) / sigma) - Phi((x - x1) / sigma)`` (``Phi`` = normal CDF); sides that lie
  on or past the canvas border are not feathered, so border pixels get full weight;
- a seam tent rises linearly from 0 at the window's edge to 1 on the seam;
- an intersection mask falls linearly with the elliptic distance from the grid corner.

Masks are 0 outside the job's window and never exceed 1.
"""

from __future__ import annotations

import math

import torch

from .planner import MASK_RADIAL, MASK_RECT, MASK_TENT_X, MASK_TENT_Y, Box, TileJob


def _centres(start: int, stop: int, device, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(start, stop, device=device, dtype=dtype) + 0.5


def _rect_profile(coords: torch.Tensor, lo: int, hi: int, limit: int, sigma: float) -> torch.Tensor:
    """1-D weights of the feathered interval ``[lo, hi)`` on a canvas axis ``[0, limit)``."""
    if sigma <= 0:
        # coords are pixel centres inside the canvas, so sides on the border need no special case
        return ((coords >= lo) & (coords < hi)).to(coords.dtype)
    inv = 1.0 / (sigma * math.sqrt(2.0))
    rise = torch.ones_like(coords) if lo <= 0 else 0.5 * (1.0 + torch.erf((coords - lo) * inv))
    fall = torch.ones_like(coords) if hi >= limit else 0.5 * (1.0 + torch.erf((hi - coords) * inv))
    return (rise * fall).clamp_(0.0, 1.0)


def _tent_profile(coords: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """1-D tent: 0 at ``lo`` and ``hi``, 1 at their midpoint, 0 outside."""
    half = (hi - lo) / 2.0
    if half <= 0:
        return torch.zeros_like(coords)
    mid = (lo + hi) / 2.0
    return (1.0 - (coords - mid).abs() / half).clamp_(0.0, 1.0)


def job_mask(job: TileJob, width: int, height: int, device=None) -> torch.Tensor:
    """``[crop.h, crop.w]`` float32 weights of ``job`` on a ``width x height`` canvas."""
    return build_mask(job.mask, job.region, job.crop, job.blur, width, height, device)


def build_mask(kind: str, region: Box, crop: Box, blur: float, width: int, height: int, device=None) -> torch.Tensor:
    """Mask of shape ``kind`` for window ``region``, sampled on the pixels of ``crop``."""
    xs = _centres(crop.x0, crop.x1, device)
    ys = _centres(crop.y0, crop.y1, device)
    if kind == MASK_RECT:
        wy = _rect_profile(ys, region.y0, region.y1, height, blur)
        wx = _rect_profile(xs, region.x0, region.x1, width, blur)
        return wy[:, None] * wx[None, :]
    if kind == MASK_TENT_Y:
        wy = _tent_profile(ys, region.y0, region.y1)
        wx = _rect_profile(xs, region.x0, region.x1, width, blur)
        return wy[:, None] * wx[None, :]
    if kind == MASK_TENT_X:
        wy = _rect_profile(ys, region.y0, region.y1, height, blur)
        wx = _tent_profile(xs, region.x0, region.x1)
        return wy[:, None] * wx[None, :]
    if kind == MASK_RADIAL:
        cx, cy = (region.x0 + region.x1) / 2.0, (region.y0 + region.y1) / 2.0
        rx, ry = max(region.w / 2.0, 1e-6), max(region.h / 2.0, 1e-6)
        dist = torch.sqrt(((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2)
        return (1.0 - dist).clamp_(0.0, 1.0)
    raise ValueError(f"unknown mask kind {kind!r}")
