"""The USDU nodes' widget values -> checked :class:`pipeline.UsduSettings`.

Every input is checked here, before a model is cloned or a tile sampled, in the order the
errors should be reported (missing VAE / model first, then the image, the prompts, the
sampler numbers, then the tiling settings). ComfyUI objects are only tested for presence
and, for conditioning, walked as plain lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import checks, pipeline, planner
from . import cond as usdu_cond

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRun:
    """What the adapter needs besides the ComfyUI objects: the settings, and whether the
    connected SAMPLER + SIGMAS replace sampler_name / steps / denoise."""

    settings: pipeline.UsduSettings
    custom: bool


def node_run(
    *,
    image: object,
    model: object,
    vae: object,
    positive: object,
    negative: object,
    upscale_by: float,
    seed: int,
    steps: int,
    cfg: float,
    denoise: float,
    mode_type: str,
    tile_width: int,
    tile_height: int,
    mask_blur: int,
    tile_padding: int,
    seam_fix_mode: str,
    seam_fix_denoise: float,
    seam_fix_width: int,
    seam_fix_mask_blur: int,
    seam_fix_padding: int,
    force_uniform_tiles: bool,
    batch_size: int,
    normalize: str,
    tile_seed: str,
    batching: str = "exact",
    custom_sampler: object = None,
    custom_sigmas: torch.Tensor | None = None,
    image_name: str = "image",
) -> NodeRun:
    """Check every input (``ValueError`` naming the input, the value and the fix) and
    build the run's settings. A lone SAMPLER or SIGMAS is ignored with a warning; with
    both, the redraw denoise is 1 (the schedule says how much is redrawn) and a schedule
    of 0 steps redraws nothing."""
    if vae is None:
        raise ValueError("vae: no VAE connected; connect the VAE that matches the model (e.g. from Load Checkpoint)")
    if model is None:
        raise ValueError("model: no MODEL connected; connect a diffusion model")
    checks.check_image(image, image_name)
    images = image.shape[0]
    for name, c in (("positive", positive), ("negative", negative)):
        usdu_cond.check_conditioning(c, images, name)
    custom = custom_sampler is not None and custom_sigmas is not None
    if (custom_sampler is None) != (custom_sigmas is None):
        logger.warning("USDU: custom_sampler and custom_sigmas must both be connected; using sampler_name/steps")
    checks.check_number("cfg", cfg, fix="use a finite guidance scale between 0 and 100 (typically 1 to 10)")
    redraw_denoise, seam_denoise = denoise, seam_fix_denoise
    if not custom:
        checks.check_number("steps", steps, minimum=1, integer=True, fix="use 1 or more sampling steps")
    else:
        redraw_denoise = 1.0  # the schedule itself says how much is redrawn
        if checks.check_sigmas(custom_sigmas, "custom_sigmas") == 0:
            logger.warning("USDU: custom_sigmas holds a single sigma (0 steps): no tile is redrawn")
            redraw_denoise = seam_denoise = 0.0

    settings = pipeline.UsduSettings(
        plan=planner.PlanSettings(
            tile_width=tile_width,
            tile_height=tile_height,
            padding=tile_padding,
            mask_blur=mask_blur,
            mode_type=mode_type,
            denoise=redraw_denoise,
            seam_fix_mode=seam_fix_mode,
            seam_fix_denoise=seam_denoise,
            seam_fix_width=seam_fix_width,
            seam_fix_mask_blur=seam_fix_mask_blur,
            seam_fix_padding=seam_fix_padding,
            force_uniform_tiles=force_uniform_tiles,
        ),
        upscale_by=upscale_by,
        normalize=normalize,
        seed=seed,
        tile_seed=tile_seed,
        batch_size=batch_size,
        batching=batching,
    )
    pipeline.check_settings(settings)
    return NodeRun(settings, custom)
