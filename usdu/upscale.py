"""The first stage: scale the picture to the canvas size (model and/or Lanczos), in float.

- :func:`lanczos_resize`: separable Lanczos-3 on tensors (antialiased when shrinking,
  like PIL's ``LANCZOS``), computed as two small matrix products on the image's device.
  The result is clamped to [0, 1] because Lanczos overshoots at hard edges.

The super-resolution model itself runs through the pack's one upscale engine
(``upscale_cuda``), called by the ComfyUI adapter.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

LANCZOS_A = 3


def _lanczos_kernel(x: torch.Tensor, a: int = LANCZOS_A) -> torch.Tensor:
    out = torch.sinc(x) * torch.sinc(x / a)
    return torch.where(x.abs() < a, out, torch.zeros_like(out))


def lanczos_matrix(in_size: int, out_size: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """``[out_size, in_size]`` resampling weights (rows sum to 1), edge pixels clamped."""
    scale = in_size / out_size
    support = LANCZOS_A * max(scale, 1.0)
    stretch = max(scale, 1.0)  # widen the kernel when shrinking: antialiasing
    centres = (torch.arange(out_size, device=device, dtype=dtype) + 0.5) * scale - 0.5
    taps = int(math.ceil(support)) * 2 + 1
    first = torch.floor(centres - support + 0.5).to(torch.long)
    idx = first[:, None] + torch.arange(taps, device=device)[None, :]
    weights = _lanczos_kernel((idx.to(dtype) - centres[:, None]) / stretch)
    weights = weights / weights.sum(dim=1, keepdim=True)
    mat = torch.zeros(out_size, in_size, device=device, dtype=dtype)
    mat.scatter_add_(1, idx.clamp(0, in_size - 1), weights)
    return mat


def lanczos_resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize a ``[B, H, W, C]`` image to ``width x height`` with Lanczos-3; float32 out."""
    b, h, w, c = image.shape
    x = image.to(torch.float32)
    if (h, w) == (height, width):
        return x.clone()
    my = lanczos_matrix(h, height, device=image.device).to(torch.float32)
    mx = lanczos_matrix(w, width, device=image.device).to(torch.float32)
    # [B,H,W,C] -> rows: (out_h x H) @ (H x W*C), then columns.
    t = torch.einsum("oh,bhwc->bowc", my, x)
    t = torch.einsum("pw,bowc->bopc", mx, t)
    return t.clamp_(0.0, 1.0).contiguous()
