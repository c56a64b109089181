"""Ultimate SD Upscale end to end, with the model-specific parts passed in as functions.

``upscale_then_redraw`` = normalise the range -> scale to the canvas (upscale model if
given, then Lanczos to the exact size) -> plan tiles -> :func:`runner.run_passes`.
The ComfyUI adapter supplies ``process`` (VAE + sampler) and ``model_fn`` (the upscale
model); tests supply plain tensor functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .. import torch_utils
from . import checks, planner, runner, upscale

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsduSettings:
    """Every knob of the node that is not a ComfyUI object."""

    plan: planner.PlanSettings
    upscale_by: float = 2.0
    normalize: str = "minmax"
    seed: int = 0
    tile_seed: str = "same"
    batch_size: int = 1  # 0 = automatic (:func:`resolve_batch_size`)
    batching: str = "exact"


AUTO_EAGER_BATCH = 4
"""Tiles per sampler call that ``batch_size`` 0 means when the model's calls run eagerly."""


def resolve_batch_size(batch_size: int, graphs: bool, batching: str = "exact") -> int:
    """``batch_size``, or for 0 (automatic) what suits the run: 1 tile per call when the
    denoiser's calls are replayed as CUDA graphs and the picture must be exact (each call is
    then one launch, so batching buys less, and the picture is exactly the one-tile-at-a-time
    picture: batched convolutions pick other kernels, whose rounding 20 steps carry into
    visible differences), else :data:`AUTO_EAGER_BATCH` (host-bound eager steps gain most from
    batching; ``fast`` batching has already given up that exactness)."""
    if batch_size > 0:
        return batch_size
    return 1 if graphs and batching == "exact" else AUTO_EAGER_BATCH


def check_settings(settings: UsduSettings) -> None:
    """Raise ``ValueError`` (naming the input, value and fix) for a setting no canvas can
    honour: unknown choices, and numbers that are NaN/Inf, fractional or out of range
    (NaN passes every ``<`` check and used to fail later as a raw library error)."""
    p = settings.plan
    if p.mode_type not in planner.MODE_TYPES:
        raise ValueError(f"mode_type: unknown value {p.mode_type!r}; choose one of {', '.join(planner.MODE_TYPES)}")
    if p.seam_fix_mode not in planner.SEAM_FIX_MODES:
        raise ValueError(
            f"seam_fix_mode: unknown value {p.seam_fix_mode!r}; choose one of {', '.join(planner.SEAM_FIX_MODES)}"
        )
    if settings.tile_seed not in runner.TILE_SEED_MODES:
        raise ValueError(
            f"tile_seed: unknown value {settings.tile_seed!r}; choose one of {', '.join(runner.TILE_SEED_MODES)}"
        )
    if settings.batching not in runner.BATCHING_MODES:
        raise ValueError(
            f"batching: unknown value {settings.batching!r}; choose one of {', '.join(runner.BATCHING_MODES)}"
        )
    if settings.normalize not in torch_utils.NORMALIZE_MODES:
        raise ValueError(
            f"normalize: unknown value {settings.normalize!r}; choose one of {', '.join(torch_utils.NORMALIZE_MODES)}"
        )
    checks.check_upscale_by(settings.upscale_by)
    checks.check_seed(settings.seed)
    for name, value, lo in (
        ("tile_width", p.tile_width, 8),
        ("tile_height", p.tile_height, 8),
        ("batch_size", settings.batch_size, 0),
        ("tile_padding", p.padding, 0),
        ("seam_fix_padding", p.seam_fix_padding, 0),
        ("seam_fix_width", p.seam_fix_width, 0),
    ):
        checks.check_number(name, value, minimum=lo, integer=True)
    for name, value in (("mask_blur", p.mask_blur), ("seam_fix_mask_blur", p.seam_fix_mask_blur)):
        checks.check_number(name, value, minimum=0, fix="use 0 (hard edges) or more")
    for name, value in (("denoise", p.denoise), ("seam_fix_denoise", p.seam_fix_denoise)):
        checks.check_number(
            name, value, minimum=0.0, maximum=1.0, fix="use a value between 0 (no change) and 1 (redraw fully)"
        )


def validate(settings: UsduSettings, canvas_w: int, canvas_h: int) -> None:
    """Raise ``ValueError`` (naming the input, value, limit and fix) for settings the
    canvas cannot honour (after :func:`check_settings`)."""
    check_settings(settings)
    p = settings.plan
    if p.tile_width > canvas_w or p.tile_height > canvas_h:
        raise ValueError(
            f"tile_width x tile_height: the {p.tile_width}x{p.tile_height} tile is larger than the "
            f"{canvas_w}x{canvas_h} canvas; set tile_width <= {canvas_w} and tile_height <= {canvas_h} "
            "(or upscale more)"
        )
    if p.seam_fix_mode == "Band Pass" and not 0 < p.seam_fix_width <= min(p.tile_width, p.tile_height):
        raise ValueError(
            f"seam_fix_width: {p.seam_fix_width} must be between 1 and the tile size "
            f"({min(p.tile_width, p.tile_height)}) for Band Pass"
        )


def scale_to_canvas(
    image: torch.Tensor,
    canvas_w: int,
    canvas_h: int,
    model_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B, canvas_h, canvas_w, C]`` float32 in [0, 1]: the upscale
    model first (when given), then Lanczos to the exact canvas size."""
    x = image
    if model_fn is not None:
        x = model_fn(x)
        if not bool(torch.isfinite(x).all()):
            # Lanczos would spread each NaN over its neighbours and every tile would decode to black.
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"upscale_model: the upscale model returned {bad} NaN/Inf value(s) for this image; "
                "the model file is broken or does not suit this image - try another upscale model"
            )
    return upscale.lanczos_resize(x, canvas_w, canvas_h)


def upscale_then_redraw(
    image: torch.Tensor,
    settings: UsduSettings,
    process: runner.ProcessFn,
    *,
    model_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
    multiple: int = planner.LATENT_MULTIPLE,
    check_cancel: Callable[[], None] | None = None,
    on_batch_done: Callable[[int, int], None] | None = None,
    on_canvas: Callable[[torch.Tensor], None] | None = None,
    precision: Mapping[str, torch.dtype | None] | None = None,
    image_name: str = "image",
) -> torch.Tensor:
    """The whole node on tensors; returns ``[B, H', W', C]`` float32 in [0, 1].

    ``device`` is where the canvas lives while tiles are blended (the GPU in ComfyUI).
    ``on_canvas`` sees the upscaled canvas before any tile is redrawn (tests use it).
    ``precision`` (compute dtype of the model and VAE, when known) only words the warning
    about tiles that decode to NaN/Inf; ``image_name`` is the input named in errors.
    Every input is checked before the first pixel is touched.
    """
    checks.check_image(image, image_name)
    check_settings(settings)
    h, w = image.shape[1:3]
    if settings.upscale_by == 1.0 and model_fn is None:
        canvas_w, canvas_h = w, h  # refine only: keep the exact size, tiles are padded instead
    else:
        canvas_w, canvas_h = planner.canvas_size(w, h, settings.upscale_by)
    validate(settings, canvas_w, canvas_h)
    x = image.to(device) if device is not None else image
    x = torch_utils.normalize_range(x, settings.normalize, name=image_name)
    if settings.normalize == "off":
        checks.check_unit_range(x, image_name)
    canvas = scale_to_canvas(x, canvas_w, canvas_h, model_fn)
    if on_canvas is not None:
        on_canvas(canvas)
    passes = planner.plan(canvas_w, canvas_h, settings.plan)
    logger.debug(
        "USDU: %dx%d -> %dx%d, passes %s",
        w,
        h,
        canvas_w,
        canvas_h,
        [(p.name, len(p.jobs)) for p in passes],
    )
    out = runner.run_passes(
        canvas,
        passes,
        process,
        seed=settings.seed,
        tile_seed_mode=settings.tile_seed,
        batch_size=resolve_batch_size(settings.batch_size, graphs=False),
        batching=settings.batching,
        multiple=multiple,
        check_cancel=check_cancel,
        on_batch_done=on_batch_done,
        precision=precision,
    )
    return out.clamp_(0.0, 1.0)
