"""The first stage: scale the picture to the canvas size (model and/or Lanczos), in float.

- :func:`lanczos_resize`: separable Lanczos-3 on tensors (antialiased when shrinking,
  like PIL's ``LANCZOS``), computed as two small matrix products on the image's device.
  The result is clamped to [0, 1] because Lanczos overshoots at hard edges.
- :func:`model_upscale`: run an image-to-image super-resolution model over overlapping
  tiles and blend them with feathered weights on the compute device; the model is any
  callable ``[N, C, h, w] -> [N, C, h*s, w*s]``. Tile size halves on out-of-memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from .. import torch_utils

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


def model_upscale(
    image: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    scale: int,
    *,
    tile: int = 512,
    overlap: int = 32,
    min_tile: int = 128,
    check_cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Upscale ``[B, H, W, C]`` by an integer-scale model, tile by tile, blending on the
    image's device; returns float32 ``[B, H*scale, W*scale, C]`` clamped to [0, 1]."""
    while True:
        try:
            return _model_upscale_tiles(image, model, scale, tile, overlap, check_cancel)
        except Exception as exc:  # noqa: BLE001 - only OOM is retried, anything else re-raised
            if not torch_utils.is_oom_error(exc) or tile // 2 < min_tile:
                raise
            tile //= 2
            logger.warning("USDU: upscale model ran out of memory; retrying with %d px tiles", tile)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _model_upscale_tiles(image, model, scale, tile, overlap, check_cancel) -> torch.Tensor:
    b, h, w, c = image.shape
    x = torch_utils.bhwc_to_bchw(image.to(torch.float32))
    out = torch.zeros(b, c, h * scale, w * scale, device=image.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, h * scale, w * scale, device=image.device, dtype=torch.float32)
    tiles = torch_utils.tile_grid(h, w, tile, overlap)
    for t in tiles:
        if check_cancel is not None:
            check_cancel()
        y = model(x[:, :, t.y0 : t.y1, t.x0 : t.x1])
        if y.shape[-2:] != (t.h * scale, t.w * scale):
            raise RuntimeError(
                f"upscale_model: a {t.h}x{t.w} tile came back {tuple(y.shape[-2:])}, expected x{scale}; "
                "the model's scale attribute does not match what it does"
            )
        st = torch_utils.Tile(t.y0 * scale, t.x0 * scale, t.h * scale, t.w * scale)
        m = torch_utils.feather_mask(st, h * scale, w * scale, overlap * scale, device=out.device)
        out[:, :, st.y0 : st.y1, st.x0 : st.x1] += y.to(out.device, torch.float32) * m
        weight[:, :, st.y0 : st.y1, st.x0 : st.x1] += m
    out /= weight
    return torch_utils.bchw_to_bhwc(out.clamp_(0.0, 1.0)).contiguous()
