"""Tile planner: which pixels each tile redraws, what it sees, and in which order.

Everything is plain integer geometry on a ``height x width`` canvas, so it can be tested
by hand. A *job* is one tile of one pass:

- ``region``: the pixels the tile is meant to change (its mask is built around it);
- ``crop``: the pixels sent to the model: the region plus ``padding`` context on every
  side, clipped to the canvas. With uniform tiles every crop of a pass has the same size
  (shifted inward at the canvas borders instead of shrinking), so tiles are denoised at
  one scale, 1:1 with the canvas; nothing is resampled.

Passes (the upstream node's modes, same geometry, our own code):

- redraw ``Linear``: row-major grid of ``ceil(H/tile_h) x ceil(W/tile_w)`` tiles;
  ``Chess``: the tiles with ``(row + col)`` even first, then the odd ones; ``None``: no redraw.
- seam fix ``Half Tile``: a tile-sized job centred on every interior seam, with a
  tent mask peaking on the seam; ``Half Tile + Intersections`` adds a job with a radial
  mask on every interior grid corner; ``Band Pass``: a ``seam_fix_width`` wide band along
  every interior seam, cut along its length into tile-sized pieces so no job is as long
  as the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODE_TYPES: tuple[str, ...] = ("Linear", "Chess", "None")
SEAM_FIX_MODES: tuple[str, ...] = ("None", "Band Pass", "Half Tile", "Half Tile + Intersections")
LATENT_MULTIPLE = 8
"""Crops are grown to a multiple of this (the VAE's spatial compression) when the canvas allows."""


@dataclass(frozen=True)
class Box:
    """Half-open pixel box ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    def clip(self, width: int, height: int) -> Box:
        return Box(max(self.x0, 0), max(self.y0, 0), min(self.x1, width), min(self.y1, height))

    def contains(self, other: Box) -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and self.x1 >= other.x1 and self.y1 >= other.y1


# Mask shapes (see masks.py): rectangle feathered by a Gaussian blur, tent across a seam,
# radial fall-off around a grid corner.
MASK_RECT = "rect"
MASK_TENT_Y = "tent_y"  # tent peaking on a horizontal seam, rectangle in x
MASK_TENT_X = "tent_x"  # tent peaking on a vertical seam, rectangle in y
MASK_RADIAL = "radial"


@dataclass(frozen=True)
class TileJob:
    """One tile of one pass."""

    index: int
    """Global position in the run (0-based), used for per-tile seeds and progress."""
    pass_name: str
    region: Box
    """The mask's window in canvas pixels; may reach past the canvas (the last row or
    column of a grid that does not divide the canvas). Pixels outside it are untouched."""
    crop: Box
    """What the model sees: inside the canvas, contains ``region`` clipped to the canvas."""
    mask: str
    blur: float
    """Gaussian sigma (pixels) applied to the mask's rectangular sides; 0 = hard edge."""
    denoise: float


@dataclass(frozen=True)
class TilePass:
    """A list of jobs that share denoise, mask blur and (with uniform tiles) crop size."""

    name: str
    jobs: tuple[TileJob, ...]
    denoise: float
    batchable: bool = True


@dataclass(frozen=True)
class PlanSettings:
    """The planner's inputs (the node's geometry knobs)."""

    tile_width: int = 512
    tile_height: int = 512
    padding: int = 32
    mask_blur: float = 8
    mode_type: str = "Linear"
    denoise: float = 0.2
    seam_fix_mode: str = "None"
    seam_fix_denoise: float = 1.0
    seam_fix_width: int = 64
    seam_fix_mask_blur: float = 8
    seam_fix_padding: int = 16
    force_uniform_tiles: bool = True


def grid_shape(width: int, height: int, tile_width: int, tile_height: int) -> tuple[int, int]:
    """``(rows, cols)`` of the redraw grid: ``ceil(H / tile_h), ceil(W / tile_w)``."""
    return math.ceil(height / tile_height), math.ceil(width / tile_width)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _fit_span(start: int, length: int, size: int, limit: int) -> tuple[int, int]:
    """Place a span of ``size`` centred on ``[start, start+length)`` inside ``[0, limit)``."""
    size = min(size, limit)
    lo = start + (length - size) // 2
    lo = min(max(lo, 0), limit - size)
    return lo, lo + size


def crop_for(region: Box, padding: int, width: int, height: int, uniform_size: tuple[int, int] | None) -> Box:
    """The crop fed to the model for ``region``.

    Uniform: a ``uniform_size`` box (clipped to the canvas) centred on the region and
    shifted inside the canvas. Otherwise: the region grown by ``padding``, clipped, then
    grown to a multiple of :data:`LATENT_MULTIPLE` where the canvas has room.
    """
    if uniform_size is not None:
        cw, ch = uniform_size
        x0, x1 = _fit_span(region.x0, region.w, cw, width)
        y0, y1 = _fit_span(region.y0, region.h, ch, height)
        return Box(x0, y0, x1, y1)
    padded = Box(region.x0 - padding, region.y0 - padding, region.x1 + padding, region.y1 + padding).clip(width, height)
    x0, x1 = _fit_span(padded.x0, padded.w, _round_up(padded.w, LATENT_MULTIPLE), width)
    y0, y1 = _fit_span(padded.y0, padded.h, _round_up(padded.h, LATENT_MULTIPLE), height)
    # Growing to a multiple of 8 must never drop part of the padded region.
    x0, x1 = min(x0, padded.x0), max(x1, padded.x1)
    y0, y1 = min(y0, padded.y0), max(y1, padded.y1)
    return Box(x0, y0, x1, y1)


def _uniform(region_w: int, region_h: int, padding: int) -> tuple[int, int]:
    return (
        _round_up(region_w + 2 * padding, LATENT_MULTIPLE),
        _round_up(region_h + 2 * padding, LATENT_MULTIPLE),
    )


def redraw_order(rows: int, cols: int, mode_type: str) -> list[tuple[int, int]]:
    """``(row, col)`` cells in processing order for a redraw mode."""
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    if mode_type == "Linear":
        return cells
    if mode_type == "Chess":
        return [rc for rc in cells if (rc[0] + rc[1]) % 2 == 0] + [rc for rc in cells if (rc[0] + rc[1]) % 2 == 1]
    if mode_type == "None":
        return []
    raise ValueError(f"mode_type: unknown value {mode_type!r}; choose one of {', '.join(MODE_TYPES)}")


def plan(width: int, height: int, s: PlanSettings) -> list[TilePass]:
    """All passes for a ``width x height`` canvas, in execution order."""
    if s.seam_fix_mode not in SEAM_FIX_MODES:
        raise ValueError(f"seam_fix_mode: unknown value {s.seam_fix_mode!r}; choose one of {', '.join(SEAM_FIX_MODES)}")
    tw, th = s.tile_width, s.tile_height
    rows, cols = grid_shape(width, height, tw, th)
    passes: list[TilePass] = []
    counter = 0

    def make(name: str, regions: list[tuple[Box, str]], pad: int, blur: float, denoise: float, uniform) -> None:
        nonlocal counter
        jobs = []
        for region, mask in regions:
            crop = crop_for(region, pad, width, height, uniform if s.force_uniform_tiles else None)
            jobs.append(TileJob(counter, name, region, crop, mask, float(blur), float(denoise)))
            counter += 1
        if jobs:
            passes.append(TilePass(name, tuple(jobs), float(denoise)))

    redraw = [
        (Box(c * tw, r * th, (c + 1) * tw, (r + 1) * th), MASK_RECT) for r, c in redraw_order(rows, cols, s.mode_type)
    ]
    make("redraw", redraw, s.padding, s.mask_blur, s.denoise, _uniform(tw, th, s.padding))

    mode = s.seam_fix_mode
    if mode in ("Half Tile", "Half Tile + Intersections"):
        # A tile-sized window centred on each seam; the tent mask is 1 on the seam, 0 at
        # the window's edges (half a tile away, i.e. the middle of the neighbouring tiles).
        uni = _uniform(tw, th, s.seam_fix_padding)
        rows_jobs = [
            (Box(c * tw, (r + 1) * th - th // 2, (c + 1) * tw, (r + 1) * th + th // 2), MASK_TENT_Y)
            for r in range(rows - 1)
            for c in range(cols)
        ]
        make("seam rows", rows_jobs, s.seam_fix_padding, s.seam_fix_mask_blur, s.seam_fix_denoise, uni)
        cols_jobs = [
            (Box((c + 1) * tw - tw // 2, r * th, (c + 1) * tw + tw // 2, (r + 1) * th), MASK_TENT_X)
            for r in range(rows)
            for c in range(cols - 1)
        ]
        make("seam columns", cols_jobs, s.seam_fix_padding, s.seam_fix_mask_blur, s.seam_fix_denoise, uni)
        if mode == "Half Tile + Intersections":
            corners = [
                (
                    Box((c + 1) * tw - tw // 2, (r + 1) * th - th // 2, (c + 1) * tw + tw // 2, (r + 1) * th + th // 2),
                    MASK_RADIAL,
                )
                for r in range(rows - 1)
                for c in range(cols - 1)
            ]
            make("seam intersections", corners, s.seam_fix_padding, s.seam_fix_mask_blur, s.seam_fix_denoise, uni)
    elif mode == "Band Pass":
        bw = s.seam_fix_width
        half = bw // 2
        # Vertical seams first, then horizontal ones (upstream's order). Each band is cut
        # into pieces one tile long; the pieces' ends are feathered along the band.
        vbands = [
            (Box(c * tw - half, r * th, c * tw - half + bw, (r + 1) * th), MASK_TENT_X)
            for c in range(1, cols)
            for r in range(rows)
        ]
        make(
            "band columns",
            vbands,
            s.seam_fix_padding,
            s.seam_fix_mask_blur,
            s.seam_fix_denoise,
            _uniform(bw, th, s.seam_fix_padding),
        )
        hbands = [
            (Box(c * tw, r * th - half, (c + 1) * tw, r * th - half + bw), MASK_TENT_Y)
            for r in range(1, rows)
            for c in range(cols)
        ]
        make(
            "band rows",
            hbands,
            s.seam_fix_padding,
            s.seam_fix_mask_blur,
            s.seam_fix_denoise,
            _uniform(tw, bw, s.seam_fix_padding),
        )
    return passes


def canvas_size(width: int, height: int, upscale_by: float) -> tuple[int, int]:
    """Output size for ``upscale_by``: each side scaled and rounded to a multiple of 8.

    Raises ``ValueError`` when a side would be 0 pixels.
    """
    w = round(width * upscale_by / LATENT_MULTIPLE) * LATENT_MULTIPLE
    h = round(height * upscale_by / LATENT_MULTIPLE) * LATENT_MULTIPLE
    if w <= 0 or h <= 0:
        raise ValueError(
            f"upscale_by: {upscale_by} turns the {width}x{height} image into a {w}x{h} canvas "
            f"(sides are rounded to multiples of {LATENT_MULTIPLE}); use a larger upscale_by or a larger image"
        )
    return w, h
