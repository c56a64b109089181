"""What one batch of tiles needs from a sampler call, worked out without a model.

The ComfyUI adapter turns a :class:`runner.TileBatch` into VAE encode -> sampler -> VAE
decode. Everything in that step that is plain tensor and conditioning math lives here, so
it can be tested on the CPU and the adapter only calls ComfyUI:

- :class:`TileConditioner` crops the prompts to the tiles of a batch and splits the batch
  where areas / GLIGEN boxes crop differently (ComfyUI applies those to a whole call);
- :func:`tile_noise` gives every tile the noise ComfyUI would give it for its seed;
- :func:`pass_sigmas` is the custom schedule a pass runs (a seam fix runs only its tail).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import cond as usdu_cond
from .runner import TileBatch


@dataclass(frozen=True)
class Canvas:
    """The picture the tiles come from: ``width x height`` pixels upscaled from a
    ``source_w x source_h`` image; ``factor`` is the VAE's pixels per latent."""

    width: int
    height: int
    source_w: int
    source_h: int
    factor: int = 8


@dataclass
class TileCall:
    """One sampler call: the tiles, their cropped prompts and, when several tiles share the
    call, each tile's SDXL size values (for the per-tile conditioning vector)."""

    batch: TileBatch
    positive: list
    negative: list
    sizes: list[dict[str, int]] | None


class TileConditioner:
    """Crops a whole-picture ``positive`` / ``negative`` pair to the tiles of each batch."""

    def __init__(self, positive: list, negative: list, canvas: Canvas) -> None:
        self.positive = positive
        self.negative = negative
        self.canvas = canvas
        # Areas / GLIGEN boxes apply to a whole sampler call: only tiles on which they crop
        # identically may share one.
        self.single = usdu_cond.needs_single_tiles(positive) or usdu_cond.needs_single_tiles(negative)

    def geometries(self, batch: TileBatch) -> list[usdu_cond.TileGeometry]:
        """Where each tile of ``batch`` sits on the canvas and what size the model sees."""
        c = self.canvas
        th, tw = batch.pixels.shape[1:3]
        return [
            usdu_cond.TileGeometry(job.crop, c.width, c.height, c.source_w, c.source_h, tw, th, c.factor)
            for job in batch.jobs
        ]

    def calls(self, batch: TileBatch) -> Iterator[TileCall]:
        """The sampler calls of ``batch`` in tile order (one unless areas force a split);
        their decoded tiles, concatenated, are the batch's result."""
        geoms = self.geometries(batch)
        runs = [(0, len(batch.jobs))]
        if self.single and len(batch.jobs) > 1:
            runs = usdu_cond.split_by_scalars([self.positive, self.negative], geoms)
        for a, b in runs:
            part = batch if (a, b) == (0, len(batch.jobs)) else sub_batch(batch, a, b)
            yield self._call(part, geoms[a:b])

    def _call(self, batch: TileBatch, geoms: list[usdu_cond.TileGeometry]) -> TileCall:
        images = batch.images
        positive = usdu_cond.crop_conditioning(self.positive, geoms, images)
        negative = usdu_cond.crop_conditioning(self.negative, geoms, images)
        sizes = usdu_cond.tile_size_values(geoms) if len(geoms) > 1 else None
        return TileCall(batch, positive, negative, sizes)


def sub_batch(batch: TileBatch, start: int, end: int) -> TileBatch:
    """Tiles ``start..end-1`` of ``batch`` (pixels are job-major: every image of a job together)."""
    images = batch.images
    return TileBatch(
        batch.jobs[start:end],
        batch.pixels[start * images : end * images],
        batch.seeds[start:end],
        batch.denoise,
        batch.pass_name,
        images,
    )


def tile_noise(latent: torch.Tensor, seeds: list[int], images: int) -> torch.Tensor:
    """CPU fp32 noise like ComfyUI's ``prepare_noise``, one seed per tile, from a private
    generator (the global torch RNG is left alone)."""
    chunks = []
    for k, seed in enumerate(seeds):
        part = latent[k * images : (k + 1) * images]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        chunks.append(torch.randn(part.shape, dtype=torch.float32, layout=part.layout, generator=gen, device="cpu"))
    return torch.cat(chunks, dim=0)


def shorten_sigmas(sigmas: torch.Tensor, fraction: float) -> torch.Tensor:
    """The last ``fraction`` of a custom schedule's steps (a denoise for SIGMAS)."""
    if fraction >= 1.0:
        return sigmas
    steps = sigmas.shape[-1] - 1
    keep = max(1, round(steps * fraction))
    return sigmas[-(keep + 1) :]


def pass_sigmas(sigmas: torch.Tensor, batch: TileBatch) -> torch.Tensor:
    """The custom schedule for ``batch``'s pass: the whole schedule for the redraw (the
    schedule itself says how much is redrawn), the tail the seam-fix denoise asks for."""
    fraction = 1.0 if batch.pass_name == "redraw" else batch.denoise
    return shorten_sigmas(sigmas, fraction)
