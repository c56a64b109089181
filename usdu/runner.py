"""The tiled img2img loop: crop, hand tiles to a sampling function, blend back in float.

The loop knows nothing about models. The caller passes ``process(batch) -> pixels``
that turns a batch of crops into redrawn crops (VAE encode, sample, decode in the
ComfyUI adapter; the identity in tests). Everything else happens here, on tensors:

- the canvas stays float32 ``[B, H, W, C]`` from start to end: no 8-bit round trip;
- each crop is padded (replicate) to a multiple of the VAE factor and cut back after;
- a tile is blended with ``canvas.lerp(tile, mask)``, which leaves a pixel bit-for-bit
  unchanged wherever the tile equals the canvas: with an identity ``process`` the output
  is exactly the input, whatever the masks, padding and order;
- ``check_cancel`` runs before every batch and may raise: the loop then stops and nothing
  is returned, so a cancelled run can never pass for a complete one.

Batching (``exact``, the default) only puts tiles in one ``process`` call when none of them
reads pixels another one writes (:func:`schedule`): the picture is then the one that tiles
processed one at a time in the pass's order give, and ``batch_size`` only changes the speed.
``fast`` batches consecutive tiles regardless: every tile of a batch is cut before any is
pasted back, so seams see the unredrawn neighbour (more tiles per call, another picture).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import torch_utils
from .checks import nonfinite_hint
from .masks import job_mask
from .planner import LATENT_MULTIPLE, Box, TileJob, TilePass

logger = logging.getLogger(__name__)

TILE_SEED_MODES: tuple[str, ...] = ("same", "per tile")
BATCHING_MODES: tuple[str, ...] = ("exact", "fast")
SEED_MAX = 2**64 - 1


def tile_seed(seed: int, job_index: int, mode: str) -> int:
    """Seed for a tile: ``seed`` for every tile (``same``, upstream behaviour) or
    ``seed + index`` wrapped to 64 bits (``per tile``: no repeated noise pattern)."""
    if mode == "same":
        return int(seed)
    if mode == "per tile":
        return (int(seed) + int(job_index)) & SEED_MAX
    raise ValueError(f"tile_seed: unknown value {mode!r}; choose one of {', '.join(TILE_SEED_MODES)}")


@dataclass
class TileBatch:
    """What ``process`` receives: ``len(jobs)`` tiles of every image of the batch."""

    jobs: list[TileJob]
    pixels: torch.Tensor
    """``[len(jobs) * B, h, w, C]`` float32, job-major (all images of job 0 first), ``h``
    and ``w`` multiples of :data:`LATENT_MULTIPLE` (crops are replicate-padded)."""
    seeds: list[int]
    denoise: float
    pass_name: str
    images: int
    """``B``, the number of images in the canvas batch."""


ProcessFn = Callable[[TileBatch], torch.Tensor]


def group_jobs(jobs: Sequence[TileJob], batch_size: int) -> list[list[TileJob]]:
    """Consecutive jobs in groups of up to ``batch_size`` whose crops have one size."""
    groups: list[list[TileJob]] = []
    for job in jobs:
        last = groups[-1] if groups else None
        if last is not None and len(last) < batch_size and (last[0].crop.w, last[0].crop.h) == (job.crop.w, job.crop.h):
            last.append(job)
        else:
            groups.append([job])
    return groups


def _pad_to(t: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Replicate-pad a ``[N, h, w, C]`` tensor on the bottom/right to multiples of ``multiple``."""
    h, w = t.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return t, 0, 0
    padded = torch.nn.functional.pad(t.permute(0, 3, 1, 2), (0, pw, 0, ph), mode="replicate")
    return padded.permute(0, 2, 3, 1).contiguous(), ph, pw


def write_box(job: TileJob, width: int, height: int) -> Box | None:
    """Canvas box of the pixels ``job`` can change (where its mask is not exactly 0), or
    None when it changes none. Computed from the mask itself, so it is exact for every
    mask shape and blur."""
    mask = job_mask(job, width, height)
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return None
    c = job.crop
    return Box(c.x0 + int(cols[0]), c.y0 + int(rows[0]), c.x0 + int(cols[-1]) + 1, c.y0 + int(rows[-1]) + 1)


def _overlap(a: Box | None, b: Box | None) -> bool:
    return a is not None and b is not None and a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def levels(jobs: Sequence[TileJob], width: int, height: int) -> list[int]:
    """Wave number of every job: a job comes after every earlier job whose written pixels it
    reads or whose read pixels it writes. Jobs of one wave neither read nor write each other's
    pixels, so running a wave as one batch gives what running its jobs one by one gives, and
    running the waves in order keeps every conflicting pair in the pass's order."""
    writes = [write_box(j, width, height) for j in jobs]
    wave: list[int] = []
    for k, job in enumerate(jobs):
        level = 0
        for i in range(k):
            if _overlap(writes[i], job.crop) or _overlap(jobs[i].crop, writes[k]):
                level = max(level, wave[i] + 1)
        wave.append(level)
    return wave


def schedule(
    jobs: Sequence[TileJob], batch_size: int, mode: str = "exact", width: int = 0, height: int = 0
) -> list[list[TileJob]]:
    """The ``process`` calls of one pass, in order: ``fast`` = consecutive jobs of one crop
    size (:func:`group_jobs`); ``exact`` = the jobs of each wave of :func:`levels` (pass
    order kept within a wave), split by crop size into groups of up to ``batch_size``."""
    if mode == "fast":
        return group_jobs(jobs, batch_size)
    if mode != "exact":
        raise ValueError(f"batching: unknown value {mode!r}; choose one of {', '.join(BATCHING_MODES)}")
    if batch_size == 1:
        return [[j] for j in jobs]
    wave = levels(jobs, width, height)
    groups: list[list[TileJob]] = []
    for level in sorted(set(wave)):
        by_size: dict[tuple[int, int], list[TileJob]] = {}
        for job, lv in zip(jobs, wave, strict=True):
            if lv == level:
                by_size.setdefault((job.crop.w, job.crop.h), []).append(job)
        for members in by_size.values():
            groups += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return groups


def count_batches(
    passes: Sequence[TilePass], batch_size: int, mode: str = "exact", width: int = 0, height: int = 0
) -> int:
    """How many ``process`` calls a run makes (for progress bars)."""
    return sum(len(schedule(p.jobs, batch_size, mode, width, height)) for p in passes if p.denoise > 0)


def run_passes(
    canvas: torch.Tensor,
    passes: Sequence[TilePass],
    process: ProcessFn,
    *,
    seed: int = 0,
    tile_seed_mode: str = "same",
    batch_size: int = 1,
    batching: str = "exact",
    multiple: int = LATENT_MULTIPLE,
    check_cancel: Callable[[], None] | None = None,
    on_batch_done: Callable[[int, int], None] | None = None,
    precision: Mapping[str, torch.dtype | None] | None = None,
) -> torch.Tensor:
    """Run every pass over ``canvas`` (``[B, H, W, C]``); returns a new float32 tensor.

    Passes with ``denoise == 0`` are skipped: they could not change anything but would
    still pay a VAE round trip. ``on_batch_done(done, total)`` reports progress.
    ``precision`` (``{"model": dtype, "VAE": dtype}``, None = unknown) words the warning
    about tiles that decode to NaN/Inf (:func:`checks.nonfinite_hint`). A batch that runs
    out of memory is split in halves and retried (with ``exact`` batching the picture does
    not change).
    """
    if canvas.ndim != 4:
        raise ValueError(f"canvas: expected [B, H, W, C], got shape {tuple(canvas.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    out = canvas.to(torch.float32).clone()
    height, width = out.shape[1], out.shape[2]
    # every pass's calls, scheduled once (the wave analysis builds each tile's mask)
    plans = [(p, schedule(p.jobs, batch_size, batching, width, height)) for p in passes if p.denoise > 0]
    for p in passes:
        if p.denoise <= 0:
            logger.debug("USDU: pass %s skipped (denoise 0)", p.name)
    total = sum(len(groups) for _, groups in plans)
    done = 0
    profiler = torch_utils.StepProfiler(f"usdu_b{batch_size}", wait=1, active=2)
    for tile_pass, groups in plans:
        for group in groups:
            if check_cancel is not None:
                check_cancel()
            _run_group(out, group, tile_pass, process, seed, tile_seed_mode, multiple, precision)
            done += 1
            profiler.step()
            if on_batch_done is not None:
                on_batch_done(done, total)
    profiler.close()
    return out


def _run_group(
    out: torch.Tensor,
    group: list[TileJob],
    tile_pass: TilePass,
    process: ProcessFn,
    seed: int,
    tile_seed_mode: str,
    multiple: int,
    precision: Mapping[str, torch.dtype | None] | None,
) -> None:
    """Cut, process and blend back one group of tiles (halved and retried on out-of-memory)."""
    images, height, width = out.shape[0], out.shape[1], out.shape[2]
    crops = [out[:, j.crop.y0 : j.crop.y1, j.crop.x0 : j.crop.x1, :] for j in group]
    pixels, ph, pw = _pad_to(torch.cat(crops, dim=0), multiple)
    batch = TileBatch(
        jobs=list(group),
        pixels=pixels,
        seeds=[tile_seed(seed, j.index, tile_seed_mode) for j in group],
        denoise=tile_pass.denoise,
        pass_name=tile_pass.name,
        images=images,
    )
    try:
        result = process(batch)
    except Exception as exc:
        if len(group) == 1 or not torch_utils.is_oom_error(exc):
            raise
        del batch, pixels, crops
        if out.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(group) // 2
        logger.warning("USDU: %d tiles per call ran out of memory; retrying %d at a time", len(group), half)
        _run_group(out, group[:half], tile_pass, process, seed, tile_seed_mode, multiple, precision)
        _run_group(out, group[half:], tile_pass, process, seed, tile_seed_mode, multiple, precision)
        return
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != tuple(pixels.shape):
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise RuntimeError(
            f"tile sampling returned {got} for tiles of shape {tuple(pixels.shape)}; "
            "the VAE or model changed the tile size (is the VAE's compression factor 8?)"
        )
    result = result.to(device=out.device, dtype=torch.float32)
    if not bool(torch.isfinite(result).all()):
        logger.warning(
            "USDU: tile(s) %s of pass %s decoded to NaN/Inf (%s); the bad pixels are replaced by 0",
            [j.index for j in group],
            tile_pass.name,
            nonfinite_hint(precision),
        )
        result = torch.nan_to_num(result, nan=0.0, posinf=1.0, neginf=0.0)
    h, w = pixels.shape[1] - ph, pixels.shape[2] - pw
    for k, job in enumerate(group):
        tile = result[k * images : (k + 1) * images, :h, :w, :]
        mask = job_mask(job, width, height, device=out.device)[None, :, :, None]
        view = out[:, job.crop.y0 : job.crop.y1, job.crop.x0 : job.crop.x1, :]
        view.lerp_(tile, mask)
