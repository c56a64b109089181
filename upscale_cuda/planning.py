"""Tile planning for a super-resolution model: tile size, overlap, padding and blend weights.

Everything here is pure arithmetic on sizes plus small weight tensors, so it is tested on
CPU without a model. Terms used throughout (all in input, low-resolution pixels):

- ``tile``: the side of the square window the model sees (edge tiles are shifted back
  inside the image rather than cut short, so every tile of a run has one shape and a
  compiled model compiles once).
- ``overlap``: how far two neighbouring tiles overlap. The outer quarter of it on each
  side is *context* that gets weight 0 (the model's output next to a tile border is
  wrong because it saw padding there); the middle half is a linear cross-fade. For a
  local CNN whose receptive-field radius is at most ``overlap // 4`` the tiled result
  therefore equals the whole-image result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..torch_utils import Tile, round_up, tile_grid

OPTIMIZATION_LEVELS: tuple[str, ...] = ("balanced", "speed", "memory")
"""Node/CLI choices; the first is the default."""

# Share of the free device memory one model call may plan to use.
MEMORY_SHARE = {"speed": 0.85, "balanced": 0.7, "memory": 0.35}
# Upper bound of LR pixels per model call (tiles x tile pixels or frames x frame pixels)
# when batching: beyond ~2 MP a call already saturates a large GPU, so more only costs memory.
_MAX_BATCH_PIXELS = {"speed": 4 * 1024 * 1024, "balanced": 2 * 1024 * 1024, "memory": 512 * 512}
MIN_TILE = 64
"""Smallest tile the planner or the OOM fallback will use (unless the model needs more)."""


@dataclass(frozen=True)
class ModelTraits:
    """The facts about a model that tiling needs (read once from the spandrel descriptor)."""

    scale: int
    in_channels: int
    out_channels: int
    minimum: int = 0
    multiple_of: int = 1
    square: bool = False
    tiling: str = "supported"  # supported / discouraged / internal
    arch: str = "unknown"
    receptive_field: int | None = None  # LR px, when known exactly (local CNNs)

    def padding(self, width: int, height: int) -> tuple[int, int]:
        """Bottom/right padding (pad_w, pad_h) that makes ``width x height`` acceptable."""
        w = round_up(max(self.minimum, width), self.multiple_of)
        h = round_up(max(self.minimum, height), self.multiple_of)
        if self.square:
            w = h = max(w, h)
        return w - width, h - height


def auto_overlap(traits: ModelTraits) -> int:
    """Overlap (LR px) used when the user leaves it at 0.

    Local CNNs with a known receptive field get ``4 x RF`` (context quarter >= RF, so tiles
    reproduce the whole image exactly), capped at 128; other arches get 32 px (ComfyUI's
    value) or 64 px for arches that need global context.
    """
    if traits.receptive_field is not None:
        value = min(4 * traits.receptive_field, 128)
    elif traits.tiling == "discouraged":
        value = 64
    else:
        value = 32
    return round_up(value, traits.multiple_of)


def bytes_per_pixel(traits: ModelTraits, element_size: int) -> float:
    """Rough device memory one input pixel costs during a forward pass.

    Same shape of estimate as ComfyUI's (activations scale with the output size), with a
    factor measured for RRDB-23 (the heaviest common arch: ~8.7 KB per input pixel in fp16).
    """
    return 384.0 * 3 * element_size * max(traits.scale, 1)


@dataclass(frozen=True)
class TilePlan:
    """How one frame is cut: ``tile_h x tile_w`` tiles (equal shape) with ``overlap``."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    tiles: tuple[Tile, ...]
    pad_h: int  # bottom padding added to every tile to satisfy size requirements
    pad_w: int

    @property
    def whole(self) -> bool:
        return len(self.tiles) == 1

    @property
    def model_shape(self) -> tuple[int, int]:
        """Spatial shape the model is called with (what a compiled graph is specialised on)."""
        return self.tile_h + self.pad_h, self.tile_w + self.pad_w


def align_tile(tile: int, traits: ModelTraits) -> int:
    """``tile`` rounded down to the model's ``multiple_of``, at least the model minimum and 64."""
    floor = max(MIN_TILE, traits.minimum, traits.multiple_of)
    tile = max(tile, floor)
    return max(floor, (tile // traits.multiple_of) * traits.multiple_of)


def plan_tiles(height: int, width: int, traits: ModelTraits, tile: int, overlap: int) -> TilePlan:
    """Cut a ``height x width`` frame into equal tiles of at most ``tile`` px.

    ``tile <= 0`` or a tile covering the frame means one whole-frame tile. Overlap is
    clamped to half a tile. ``tile`` should already be a multiple of the model's
    ``multiple_of`` (see :func:`align_tile`), so tiles need padding only when the frame is
    smaller than a tile.
    """
    if tile <= 0 or traits.tiling == "internal" or (tile >= height and tile >= width):
        th, tw = height, width
        tiles: tuple[Tile, ...] = (Tile(0, 0, height, width),)
        ov = 0
    else:
        th, tw = min(tile, height), min(tile, width)
        # More than half a tile of overlap would leave pixels that no tile weights.
        ov = max(0, min(overlap, min(th, tw) // 2))
        tiles = tuple(tile_grid(height, width, tile, ov))
    pad_w, pad_h = traits.padding(tw, th)
    return TilePlan(height, width, th, tw, ov, tiles, pad_h, pad_w)


def choose_tile(
    height: int,
    width: int,
    traits: ModelTraits,
    element_size: int,
    free_bytes: int,
    level: str = "balanced",
    batch: int = 1,
    reserved: int = 0,
) -> int:
    """Largest square tile (LR px) whose forward pass fits the memory budget.

    The budget is the level's share of ``free_bytes`` less ``reserved`` (memory the run
    needs besides the model calls: weights, an output batch on the same device). Returns 0
    ("whole frame") when the whole frame fits, which also covers arches that prefer not to
    be tiled (``discouraged``) and must not be (``internal``).
    """
    if level not in MEMORY_SHARE:
        raise ValueError(f"optimization_level: unknown value {level!r}; choose one of {', '.join(OPTIMIZATION_LEVELS)}")
    if traits.tiling == "internal":
        return 0
    budget = free_bytes * MEMORY_SHARE[level] - reserved
    per_px = bytes_per_pixel(traits, element_size)
    # Output accumulators (fp32 value + weight) live on the device too.
    out_per_px = 4 * (traits.out_channels + 1) * traits.scale**2
    frame_out = height * width * out_per_px
    if height * width * per_px * batch + frame_out <= budget:
        return 0
    side = math.isqrt(max(int((budget - frame_out) / (per_px * batch)), 1))
    if level == "memory":
        side = min(side, 512)
    return align_tile(side, traits)


def choose_batch(pixels_per_call: int, level: str, requested: int, items: int) -> int:
    """Tiles or frames per model call: ``requested`` if > 0, else as many as keep one
    call under the level's pixel budget (at least 1, at most ``items``)."""
    if requested > 0:
        return max(1, min(requested, items))
    limit = _MAX_BATCH_PIXELS.get(level, _MAX_BATCH_PIXELS["balanced"])
    return max(1, min(items, limit // max(pixels_per_call, 1)))


def blend_ramp(size: int, lead: int, trail: int, scale: int, device=None) -> torch.Tensor:
    """1-D weights over ``size`` output px for a tile whose leading/trailing sides overlap
    a neighbour by ``lead``/``trail`` LR px (0 = image border).

    The outer quarter of an overlap is 0 (context only), the middle half ramps linearly,
    the rest is 1. A pixel never gets weight 0 from every tile: neighbours' zero zones
    sit on opposite ends of their shared overlap.
    """
    w = torch.ones(size, device=device, dtype=torch.float32)
    for side, ov in ((0, lead), (1, trail)):
        if ov <= 0:
            continue
        zero = (ov // 4) * scale
        ramp = max((ov - 2 * (ov // 4)) * scale, 1)
        pos = torch.arange(size, device=device, dtype=torch.float32)
        if side == 1:
            pos = pos.flip(0)
        ramp_w = ((pos - zero + 0.5) / ramp).clamp(0.0, 1.0)
        ramp_w[pos < zero] = 0.0
        w = torch.minimum(w, ramp_w)
    return w


def tile_weights(plan: TilePlan, tile: Tile, scale: int, device=None) -> torch.Tensor:
    """``[h*scale, w*scale]`` blend weights of ``tile`` within ``plan``.

    Each side's ramp spans the real overlap with the neighbour on that side (tiles are
    spread evenly, so it can exceed ``plan.overlap``).
    """

    def overlaps(starts: list[int], start: int, size: int) -> tuple[int, int]:
        i = starts.index(start)
        lead = starts[i - 1] + size - start if i > 0 else 0
        trail = start + size - starts[i + 1] if i + 1 < len(starts) else 0
        return max(lead, 0), max(trail, 0)

    ys = sorted({t.y0 for t in plan.tiles})
    xs = sorted({t.x0 for t in plan.tiles})
    ly, ty = overlaps(ys, tile.y0, tile.h)
    lx, tx = overlaps(xs, tile.x0, tile.w)
    wy = blend_ramp(tile.h * scale, ly, ty, scale, device)
    wx = blend_ramp(tile.w * scale, lx, tx, scale, device)
    return wy[:, None] * wx[None, :]
