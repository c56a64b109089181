"""Per-tile conditioning: crop everything spatial in a CONDITIONING to the tile.

A CONDITIONING is a list of ``[tensor, dict]`` pairs. The user built it for the whole
picture; a tile only sees part of it, so every spatial entry is cropped (pure math on
tensors and tuples; ControlNet objects are handled by duck typing: ``copy()``,
``cond_hint_original``, ``previous_controlnet``, ``set_previous_controlnet``):

- ``area`` ``(h, w, y, x)`` in latent units of the *source* image (8 px each) or
  ``("percentage", h, w, y, x)``: mapped to the canvas, intersected with the crop, shifted
  and converted to the tile's latent units; an entry whose area misses the tile is dropped;
- ``mask`` (any resolution, covering the picture): cut to the crop, padded like the tile;
- ControlNet hints (the whole ``previous_controlnet`` chain): ``cond_hint_original`` cut
  to the crop and resized to the tile, objects copied (the user's are never modified);
- ``gligen`` boxes: like areas; boxes that miss the tile are dropped;
- ``reference_latents`` (Flux Kontext, Qwen edit): cut to the crop, resized to the tile's
  latent size;
- SDXL size conditioning: ``width``/``height`` = the canvas (the picture the tile comes
  from), ``crop_w``/``crop_h`` = the tile's offset in it, ``target_width``/``target_height``
  = the tile's real (unpadded) size.

With several tiles in one sampler call, tensor-valued entries (hints, masks, reference
latents) are stacked along the batch, one slice per tile. Scalar entries cannot differ
per batch item in a CONDITIONING:

- SDXL size conditioning: the entry carries the first tile's values (what the model's
  conditioning encoder reads); :func:`per_tile_rows` then rebuilds the encoded vector
  (ComfyUI's ``y``/ADM) once per tile with the model's own encoder and stacks the rows,
  one per sample, so every tile of the batch gets its own crop/size values (the adapter
  does this inside the sampler, where the encoded vectors exist);
- areas and GLIGEN boxes change which part of the latent the model sees, not a vector,
  so they cannot be given per sample: tiles share a call only when these crop to the
  same values for all of them (:func:`split_by_scalars`); others are sampled apart.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .planner import Box

logger = logging.getLogger(__name__)

SDXL_SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


@dataclass(frozen=True)
class TileGeometry:
    """Where a tile sits: ``crop`` on a ``canvas_w x canvas_h`` canvas that was upscaled
    from a ``source_w x source_h`` image; the model sees ``tile_w x tile_h`` pixels (the
    crop replicate-padded to a multiple of ``factor``)."""

    crop: Box
    canvas_w: int
    canvas_h: int
    source_w: int
    source_h: int
    tile_w: int
    tile_h: int
    factor: int = 8


# ---------------------------------------------------------------------------
# Boxes (area, GLIGEN)
# ---------------------------------------------------------------------------


def crop_area(area: Sequence, g: TileGeometry) -> tuple[int, int, int, int] | None:
    """An ``area`` entry in the tile's latent units ``(h, w, y, x)``, or None if it misses.

    Absolute areas are in latent units of the source image (what ComfyUI's area nodes
    write for the picture the user conditioned); percentage areas are fractions of it.
    """
    if len(area) == 5 and area[0] == "percentage":
        _, fh, fw, fy, fx = area
        x0, y0 = fx * g.canvas_w, fy * g.canvas_h
        x1, y1 = x0 + fw * g.canvas_w, y0 + fh * g.canvas_h
    elif len(area) == 4:
        h, w, y, x = (float(v) for v in area)
        sx, sy = g.canvas_w / g.source_w, g.canvas_h / g.source_h
        x0, y0 = x * g.factor * sx, y * g.factor * sy
        x1, y1 = (x + w) * g.factor * sx, (y + h) * g.factor * sy
    else:
        raise ValueError(f"conditioning area {tuple(area)!r}: expected (h, w, y, x) or ('percentage', h, w, y, x)")
    return _box_to_tile_latent(x0, y0, x1, y1, g)


def _box_to_tile_latent(x0: float, y0: float, x1: float, y1: float, g: TileGeometry):
    c = g.crop
    ix0, iy0 = max(x0, c.x0), max(y0, c.y0)
    ix1, iy1 = min(x1, c.x1), min(y1, c.y1)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    lx0 = int((ix0 - c.x0) // g.factor)
    ly0 = int((iy0 - c.y0) // g.factor)
    lx1 = -int(-(ix1 - c.x0) // g.factor)
    ly1 = -int(-(iy1 - c.y0) // g.factor)
    return (max(ly1 - ly0, 1), max(lx1 - lx0, 1), ly0, lx0)


def crop_gligen(gligen: tuple, g: TileGeometry) -> tuple | None:
    """A ``("position", model, [(pooled, h, w, y, x), ...])`` entry cropped to the tile
    (boxes in latent units of the source image); None when no box touches the tile."""
    kind, model, boxes = gligen
    sx, sy = g.canvas_w / g.source_w, g.canvas_h / g.source_h
    kept = []
    for pooled, h, w, y, x in boxes:
        box = _box_to_tile_latent(
            x * g.factor * sx, y * g.factor * sy, (x + w) * g.factor * sx, (y + h) * g.factor * sy, g
        )
        if box is not None:
            kept.append((pooled, *box))
    return (kind, model, kept) if kept else None


# ---------------------------------------------------------------------------
# Images and latents (mask, ControlNet hint, reference latents)
# ---------------------------------------------------------------------------


def _scaled_box(c: Box, from_w: int, from_h: int, to_w: int, to_h: int) -> tuple[int, int, int, int]:
    """``c`` (on a ``from`` grid) on a ``to_w x to_h`` grid, rounded outward, at least 1 px."""
    x0 = int(c.x0 * to_w // from_w)
    y0 = int(c.y0 * to_h // from_h)
    x1 = max(-int(-c.x1 * to_w // from_w), x0 + 1)
    y1 = max(-int(-c.y1 * to_h // from_h), y0 + 1)
    return x0, y0, min(x1, to_w), min(y1, to_h)


def _resize(t: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    if tuple(t.shape[-2:]) == (h, w):
        return t
    if mode == "nearest-exact":
        return F.interpolate(t, size=(h, w), mode=mode)
    shrink = t.shape[-2] > h or t.shape[-1] > w
    return F.interpolate(t, size=(h, w), mode=mode, align_corners=False, antialias=shrink)


def crop_image_like(t: torch.Tensor, g: TileGeometry, out_h: int, out_w: int, pad_h: int, pad_w: int, mode: str):
    """Cut the part of ``[N, C, H, W]`` ``t`` (covering the whole canvas) under the crop,
    resize it to ``out_h x out_w`` and replicate-pad it on the bottom/right by
    ``pad_h``/``pad_w`` (the tile's own padding)."""
    h, w = t.shape[-2:]
    x0, y0, x1, y1 = _scaled_box(g.crop, g.canvas_w, g.canvas_h, w, h)
    part = _resize(t[..., y0:y1, x0:x1].float(), out_h, out_w, mode)
    if pad_h or pad_w:
        part = F.pad(part, (0, pad_w, 0, pad_h), mode="replicate")
    return part.to(t.dtype)


def crop_mask(mask: torch.Tensor, g: TileGeometry) -> torch.Tensor:
    """A conditioning mask (``[H, W]`` or ``[B, H, W]``) cut to the tile, tile-sized."""
    m = mask if mask.ndim == 3 else mask[None]
    out = crop_image_like(m[:, None], g, g.crop.h, g.crop.w, g.tile_h - g.crop.h, g.tile_w - g.crop.w, "bilinear")[:, 0]
    return out if mask.ndim == 3 else out[0]


def crop_hint(hint: torch.Tensor, g: TileGeometry, mode: str = "bilinear") -> torch.Tensor:
    """A ControlNet hint ``[B, C, H, W]`` (covering the picture) cut to the tile, tile-sized."""
    return crop_image_like(hint, g, g.crop.h, g.crop.w, g.tile_h - g.crop.h, g.tile_w - g.crop.w, mode)


def crop_latent(latent: torch.Tensor, g: TileGeometry) -> torch.Tensor:
    """A reference latent ``[B, C, h, w]`` (covering the picture) cut to the tile's latent size."""
    lh, lw = g.tile_h // g.factor, g.tile_w // g.factor
    ch, cw = max(g.crop.h // g.factor, 1), max(g.crop.w // g.factor, 1)
    squeeze = latent.ndim == 5  # [B, C, T, h, w] video-style latents: crop every frame
    t = latent.flatten(1, 2) if squeeze else latent
    out = crop_image_like(t, g, ch, cw, lh - ch, lw - cw, "bilinear")
    return out.unflatten(1, latent.shape[1:3]) if squeeze else out


# ---------------------------------------------------------------------------
# Whole conditioning lists
# ---------------------------------------------------------------------------


def _batch_of(t: torch.Tensor, images: int) -> torch.Tensor:
    """Repeat a batch-1 tensor to ``images``; leave batch-``images`` tensors alone."""
    if t.shape[0] == images:
        return t
    if t.shape[0] == 1:
        return t.expand(images, *t.shape[1:])
    return t[:images] if t.shape[0] > images else t.repeat(-(-images // t.shape[0]), *([1] * (t.ndim - 1)))[:images]


def _stack(parts: list[torch.Tensor], images: int) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    return torch.cat([_batch_of(p, images) for p in parts], dim=0)


def _crop_controlnet(control, geoms: Sequence[TileGeometry], images: int, memo: dict):
    """Copy of a ControlNet chain with every hint cut to the tiles (stacked per tile)."""
    if control is None:
        return None
    key = id(control)
    if key in memo:
        return memo[key]
    new = control.copy() if hasattr(control, "copy") else copy.copy(control)
    hint = getattr(control, "cond_hint_original", None)
    if isinstance(hint, torch.Tensor) and hint.ndim == 4:
        mode = "nearest-exact" if getattr(control, "upscale_algorithm", "") == "nearest-exact" else "bilinear"
        new.cond_hint_original = _stack([crop_hint(hint, g, mode) for g in geoms], images)
    prev = _crop_controlnet(getattr(control, "previous_controlnet", None), geoms, images, memo)
    if hasattr(new, "set_previous_controlnet"):
        new.set_previous_controlnet(prev)
    else:
        new.previous_controlnet = prev
    memo[key] = new
    return new


def check_batch(cond: list, images: int, name: str) -> None:
    """Raise ``ValueError`` when a conditioning is empty or its batch (the prompt tensor
    or the pooled prompt) cannot pair with ``images`` images."""
    if not cond:
        raise ValueError(f"{name}: the CONDITIONING is empty; connect a text encoder output (e.g. CLIP Text Encode)")
    for i, entry in enumerate(cond):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], dict):
            raise ValueError(f"{name}: entry {i} is not a [tensor, dict] pair; connect a CONDITIONING output")
        for what, t in (("", entry[0]), (" pooled_output", entry[1].get("pooled_output"))):
            if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] not in (1, images):
                raise ValueError(
                    f"{name}: conditioning {i}{what} has batch {t.shape[0]} but the image batch is {images}; "
                    f"encode the prompt once (batch 1) or once per image ({images})"
                )


def check_conditioning(cond: object, images: int, name: str) -> None:
    """:func:`check_batch` plus the prompt tensors themselves: a CONDITIONING that is not a
    list, whose prompt is not a tensor or holds no token, or holds NaN/Inf (a text encoder
    that overflowed) would only fail inside the sampler or give a black picture."""
    if not isinstance(cond, list):
        raise ValueError(
            f"{name}: expected a CONDITIONING, got {type(cond).__name__}; connect a text encoder output "
            "(e.g. CLIP Text Encode)"
        )
    check_batch(cond, images, name)
    for i, (prompt, extra) in enumerate(cond):
        if not isinstance(prompt, torch.Tensor):
            raise ValueError(
                f"{name}: conditioning {i} holds a {type(prompt).__name__}, not a tensor; "
                "connect a text encoder output (e.g. CLIP Text Encode)"
            )
        if prompt.numel() == 0:
            raise ValueError(
                f"{name}: conditioning {i} is empty (shape {tuple(prompt.shape)}); "
                "connect a text encoder output (e.g. CLIP Text Encode) that encodes at least one token"
            )
        for what, t in (("", prompt), (" pooled_output", extra.get("pooled_output"))):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"{name}: conditioning {i}{what} holds {bad} NaN/Inf value(s); the text encoder (or a "
                    "conditioning node) overflowed - run the text encoder in fp32 or re-create the prompt"
                )


def needs_single_tiles(cond: list) -> bool:
    """True when an entry holds a per-tile *scalar* (area, GLIGEN boxes): ComfyUI applies
    those to the whole batch, so tiles share one sampler call only when these crop to the
    same values for all of them (see :func:`scalar_signature`, :func:`split_by_scalars`)."""
    return any("area" in d or "gligen" in d for _, d in cond)


def scalar_signature(cond: list, g: TileGeometry) -> tuple:
    """What the whole-batch entries of ``cond`` (areas, GLIGEN boxes) become for tile ``g``;
    tiles with equal signatures can be sampled in one call exactly."""
    sig = []
    for _, d in cond:
        area = crop_area(d["area"], g) if "area" in d else ()
        boxes: tuple | None = ()
        if "gligen" in d:
            gl = crop_gligen(d["gligen"], g)
            boxes = None if gl is None else tuple((id(b[0]), *b[1:]) for b in gl[2])
        sig.append((area, boxes))
    return tuple(sig)


def split_by_scalars(conds: Sequence[list], geoms: Sequence[TileGeometry]) -> list[tuple[int, int]]:
    """``[start, end)`` runs of consecutive tiles whose areas / GLIGEN boxes (in every
    conditioning of ``conds``) crop identically: each run can share one sampler call."""
    if not any(needs_single_tiles(c) for c in conds):
        return [(0, len(geoms))] if geoms else []
    sigs = [tuple(scalar_signature(c, g) for c in conds) for g in geoms]
    runs: list[tuple[int, int]] = []
    for k, sig in enumerate(sigs):
        if runs and sigs[runs[-1][0]] == sig:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def crop_conditioning(cond: list, geoms: Sequence[TileGeometry], images: int, *, sdxl_sizes: bool = True) -> list:
    """A new CONDITIONING for ``len(geoms)`` tiles sampled together (job-major batch of
    ``len(geoms) * images``). The input list, dicts, tensors and ControlNets are unchanged."""
    if not geoms:
        raise ValueError("crop_conditioning needs at least one tile")
    first = geoms[0]
    if len(geoms) > 1 and needs_single_tiles(cond):
        first_sig = scalar_signature(cond, first)
        if any(scalar_signature(cond, g) != first_sig for g in geoms[1:]):
            raise ValueError(
                "conditioning areas or GLIGEN boxes crop differently for these tiles; "
                "crop them one tile at a time (see split_by_scalars)"
            )
    memo: dict = {}
    out = []
    for tensor, d in cond:
        n = dict(d)
        if "area" in d:
            area = crop_area(d["area"], first)
            if area is None:
                continue
            n["area"] = area
        if "gligen" in d:
            gl = crop_gligen(d["gligen"], first)
            if gl is None:
                n.pop("gligen")
            else:
                n["gligen"] = gl
        if isinstance(d.get("mask"), torch.Tensor):
            n["mask"] = _stack([crop_mask(d["mask"], g) for g in geoms], images)
        if d.get("control") is not None:
            n["control"] = _crop_controlnet(d["control"], geoms, images, memo)
        refs = d.get("reference_latents")
        if isinstance(refs, (list, tuple)) and refs:
            n["reference_latents"] = [
                _stack([crop_latent(r, g) for g in geoms], images) if isinstance(r, torch.Tensor) else r for r in refs
            ]
        if sdxl_sizes:
            n.update(sdxl_size_values(first))
        out.append([tensor, n])
    if not out:
        # Every entry had an area outside this tile: sample the tile with the prompts
        # unrestricted rather than with no conditioning at all.
        logger.debug("USDU: no conditioning area touches tile %s; using the entries without areas", first.crop)
        out = [[t, {k: v for k, v in d.items() if k not in ("area", "strength")}] for t, d in cond]
        if sdxl_sizes:
            for _, d in out:
                d.update(sdxl_size_values(first))
    return out


def sdxl_size_values(g: TileGeometry) -> dict[str, int]:
    """SDXL micro-conditioning for a tile: picture size, the tile's offset and real size."""
    return {
        "width": g.canvas_w,
        "height": g.canvas_h,
        "crop_w": g.crop.x0,
        "crop_h": g.crop.y0,
        "target_width": g.crop.w,
        "target_height": g.crop.h,
    }


def tile_size_values(geoms: Sequence[TileGeometry]) -> list[dict[str, int]]:
    """:func:`sdxl_size_values` of every tile of a batch, in batch order."""
    return [sdxl_size_values(g) for g in geoms]


def per_tile_rows(
    encode: Callable[[dict], torch.Tensor | None],
    entry: dict,
    sizes: Sequence[dict],
    images: int,
    current: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Per-sample rows of an encoded conditioning vector for tiles sampled together.

    ``encode(params)`` is the model's encoder of one conditioning entry (ComfyUI's
    ``encode_adm``); it is called with ``entry`` as it is (the reference) and updated by
    each tile's ``sizes``. The elements that change between the reference and a tile are
    the size-dependent ones; tile ``k``'s row takes those from its own encoding and every
    other element from ``current`` (the vector the sampler already holds for the entry;
    default: the reference encoding). Rows are repeated to ``images`` per tile,
    job-major (all images of tile 0 first), the layout of the latent batch, so row
    ``k * images + i`` is the row image ``i`` gets when tile ``k`` is sampled alone.

    ``current`` may come from another entry than ``entry`` (ComfyUI gives the negative
    prompt copies of positive area entries that keep the negative's vector): that is
    fine as long as it agrees with the reference on every size-dependent element, which
    is checked. Returns None when there is nothing to do or it cannot be done exactly:
    the encoder returns None, the same vector for every tile (the model ignores the
    sizes), vectors of another shape than ``current``, or ``current`` disagrees with the
    reference on a size-dependent element.
    """
    ref = encode(dict(entry))
    if not isinstance(ref, torch.Tensor) or not sizes:
        return None
    base = ref if current is None else current.to(device=ref.device, dtype=ref.dtype)
    if base.shape != ref.shape:
        return None
    encoded = []
    for s in sizes:
        y = encode({**entry, **s})
        if not isinstance(y, torch.Tensor) or y.shape != ref.shape:
            return None
        encoded.append(y)
    changed = [y != ref for y in encoded]
    sized = torch.stack(changed).any(dim=0)
    if not bool(sized.any()):
        return None
    if bool((sized & (base != ref)).any()):
        return None
    rows = [torch.where(c, y, base) for c, y in zip(changed, encoded, strict=True)]
    return torch.cat([_batch_of(r, images) for r in rows], dim=0)
