"""ComfyUI adapter for usdu/: the three Ultimate SD Upscale nodes (schemas and execute).

The tiling, masks, compositing, seeds, conditioning crops and input checks live in
``usdu/`` (no ComfyUI import). The ComfyUI side of a run (VAE encode -> sampler -> VAE
decode per batch of tiles, the upscale model, progress and Cancel) is
:mod:`.usdu_sampling`; the per-run model wrappers are :mod:`.usdu_wrappers`.

Nothing here touches ``sys.modules``, ``sys.path`` or module-level state; the MODEL is
only handed to ``comfy.sample``, so wrapper-style diffusion models (Nunchaku) work.
"""

from __future__ import annotations

from comfy_api.latest import io

from .. import torch_utils
from ..usdu import checks, planner, runner
from ..usdu import inputs as usdu_inputs
from . import residency, usdu_sampling
from .comfy_bridge import to_intermediate

MAX_RESOLUTION = 8192
SEED_MAX = 0xFFFFFFFFFFFFFFFF
WORKING_BYTES = 3 * 2**30
"""VRAM a tiled redraw needs besides the weights (tile batches, VAE, upscale model): a model
is loaded fully for the run only when this much stays free."""


# ---------------------------------------------------------------------------
# Schema (same names, defaults and ranges as the upstream node, plus ours)
# ---------------------------------------------------------------------------


def _sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def _scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


def _inputs(kind: str) -> list:
    """Inputs in upstream order. ``kind``: ``main``, ``no_upscale`` or ``custom``."""
    image_name = "upscaled_image" if kind == "no_upscale" else "image"
    inputs: list = [
        io.Image.Input(
            image_name,
            tooltip="The image to upscale and redraw (any batch size; every image gets the same tiles).",
        ),
        io.Model.Input(
            "model",
            tooltip="The diffusion model that redraws each tile (SD1.5, SDXL, Flux, Nunchaku, ...).",
        ),
        io.Conditioning.Input(
            "positive",
            tooltip="Positive prompt for the whole picture; areas, masks, ControlNet hints and GLIGEN "
            "boxes are cropped to each tile.",
        ),
        io.Conditioning.Input("negative", tooltip="Negative prompt, cropped to each tile like positive."),
        io.Vae.Input("vae", tooltip="The VAE that encodes and decodes the tiles."),
    ]
    if kind != "no_upscale":
        inputs.append(
            io.Float.Input(
                "upscale_by",
                default=2.0,
                min=checks.UPSCALE_BY_MIN,
                max=checks.UPSCALE_BY_MAX,
                step=0.05,
                tooltip="Output size = input size x this (each side rounded to a multiple of 8 px). "
                "1.0 keeps the size and only redraws.",
            )
        )
    inputs += [
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=SEED_MAX,
            control_after_generate=True,
            tooltip="Noise seed. With tile_seed 'per tile', tile i uses seed + i.",
        ),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per tile."),
        io.Float.Input(
            "cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance scale."
        ),
        io.Combo.Input("sampler_name", options=_sampler_names(), tooltip="Sampler for every tile."),
        io.Combo.Input("scheduler", options=_scheduler_names(), tooltip="Noise schedule for every tile."),
        io.Float.Input(
            "denoise",
            default=0.2,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="How much each tile is redrawn: 0 = not at all (the redraw pass is skipped), "
            "1 = from pure noise. 0.2-0.4 adds detail while keeping the picture."
            + (
                " CustomSample: ignored when custom_sampler and custom_sigmas are connected."
                if kind == "custom"
                else ""
            ),
        ),
    ]
    if kind == "main":
        inputs.append(
            io.UpscaleModel.Input(
                "upscale_model",
                tooltip="Super-resolution model applied before tiling (then Lanczos to the exact size).",
            )
        )
    inputs += [
        io.Combo.Input(
            "mode_type",
            options=list(planner.MODE_TYPES),
            default="Linear",
            tooltip="Tile order of the redraw: Linear = row by row, Chess = checkerboard (every other "
            "tile first), None = no redraw (only upscale and seam fix).",
        ),
        io.Int.Input("tile_width", default=512, min=64, max=MAX_RESOLUTION, step=8, tooltip="Tile width in pixels."),
        io.Int.Input("tile_height", default=512, min=64, max=MAX_RESOLUTION, step=8, tooltip="Tile height in pixels."),
        io.Int.Input(
            "mask_blur",
            default=8,
            min=0,
            max=64,
            step=1,
            tooltip="Feather of each tile's edges (Gaussian sigma, pixels); 0 = hard edges.",
        ),
        io.Int.Input(
            "tile_padding",
            default=32,
            min=0,
            max=MAX_RESOLUTION,
            step=8,
            tooltip="Context pixels around each tile that the model sees but that are not kept.",
        ),
        io.Combo.Input(
            "seam_fix_mode",
            options=list(planner.SEAM_FIX_MODES),
            default="None",
            tooltip="Extra pass over tile borders: Band Pass = a narrow band along each border, Half Tile "
            "= a tile centred on each border, + Intersections = also each grid corner. None = off.",
        ),
        io.Float.Input(
            "seam_fix_denoise",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Denoise of the seam-fix passes; 0 = skip them."
            + (" With custom sigmas: the fraction of the last steps used." if kind == "custom" else ""),
        ),
        io.Int.Input(
            "seam_fix_width",
            default=64,
            min=0,
            max=MAX_RESOLUTION,
            step=8,
            tooltip="Band Pass only: width of the band along each border, pixels.",
        ),
        io.Int.Input(
            "seam_fix_mask_blur",
            default=8,
            min=0,
            max=64,
            step=1,
            tooltip="Feather of the seam-fix masks' straight edges (Gaussian sigma, pixels).",
        ),
        io.Int.Input(
            "seam_fix_padding",
            default=16,
            min=0,
            max=MAX_RESOLUTION,
            step=8,
            tooltip="Context pixels around each seam-fix tile.",
        ),
        io.Boolean.Input(
            "force_uniform_tiles",
            default=True,
            tooltip="All tiles of a pass get one size (tile + 2 x padding; shifted inward at the borders) "
            "at 1:1 scale. Off: each tile is only as large as its padded area.",
        ),
        io.Boolean.Input(
            "tiled_decode",
            default=False,
            tooltip="Decode tiles with ComfyUI's tiled VAE decode (512 px): less VRAM, slower. Decoding "
            "falls back to it on out-of-memory anyway.",
        ),
        io.Int.Input(
            "batch_size",
            default=0,
            min=0,
            max=4096,
            step=1,
            tooltip="Most tiles per sampler call; 0 = automatic: 1 when the model's calls replay as CUDA "
            "graphs with batching 'exact' (the exact one-tile-at-a-time picture), else 4. More tiles per call run faster without "
            "graphs and use more VRAM; with batching 'exact' the picture matches one tile at a time up to "
            "kernel rounding.",
        ),
    ]
    if kind == "custom":
        inputs += [
            io.UpscaleModel.Input(
                "upscale_model",
                optional=True,
                tooltip="Super-resolution model; when not connected the image is scaled with Lanczos.",
            ),
            io.Sampler.Input(
                "custom_sampler",
                optional=True,
                tooltip="Sampler object (SAMPLER) used instead of sampler_name; needs custom_sigmas too.",
            ),
            io.Sigmas.Input(
                "custom_sigmas",
                optional=True,
                tooltip="Noise schedule (SIGMAS) for the redraw; needs custom_sampler too.",
            ),
        ]
    inputs += [
        io.Combo.Input(
            "normalize",
            options=list(torch_utils.NORMALIZE_MODES),
            default=torch_utils.NORMALIZE_MODES[0],
            tooltip="Range fix before tiling (the Nunchaku washed-out fix): minmax = stretch the batch to "
            "0..1; minmax per image; percentile = 0.5/99.5 percentiles to 0/1 (ignores outlier pixels); "
            "off = unchanged.",
        ),
        io.Combo.Input(
            "tile_seed",
            options=list(runner.TILE_SEED_MODES),
            default="same",
            tooltip="same = every tile uses seed (upstream behaviour); per tile = tile i uses seed + i, "
            "so no noise pattern repeats from tile to tile.",
        ),
        io.Boolean.Input(
            "cuda_graphs",
            default=True,
            optional=True,  # prompts saved before this input existed stay valid
            advanced=True,
            tooltip="Replay the model's calls for a repeated tile shape as a CUDA graph: faster at small "
            "batch sizes, same pixels. Used only on CUDA for a fully loaded model without patches or "
            "ControlNet; anything else runs as usual.",
        ),
        io.Combo.Input(
            "batching",
            options=list(runner.BATCHING_MODES),
            default="exact",
            optional=True,  # prompts saved before this input existed stay valid
            advanced=True,
            tooltip="exact = only tiles that do not overlap each other's context share a sampler call (same "
            "picture as one at a time); fast = consecutive tiles share a call, all cut before any is "
            "pasted back (fewer calls, slightly different seams).",
        ),
    ]
    return inputs


# ---------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------


def _execute(
    *,
    image,
    model,
    positive,
    negative,
    vae,
    upscale_model,
    sampler_name: str,
    scheduler: str,
    tiled_decode: bool,
    cuda_graphs: bool = True,
    custom_sampler=None,
    custom_sigmas=None,
    image_name: str = "image",
    **widgets,
) -> io.NodeOutput:
    """Check every input, then upscale and redraw; ``widgets`` are the plain-number and
    choice inputs (``upscale_by``, ``seed``, ``steps``, ``cfg``, tiling, ...)."""
    import comfy.model_management as mm

    # Every input is checked before a model is cloned or a tile sampled.
    run = usdu_inputs.node_run(
        image=image,
        model=model,
        vae=vae,
        positive=positive,
        negative=negative,
        custom_sampler=custom_sampler,
        custom_sigmas=custom_sigmas,
        image_name=image_name,
        **widgets,
    )
    factor = int(vae.spacial_compression_encode()) if hasattr(vae, "spacial_compression_encode") else 8
    device = mm.get_torch_device()
    with residency.full_residency(model, "USDU", working_bytes=WORKING_BYTES) as resident:
        sampling = usdu_sampling.Sampling(
            resident,
            vae,
            positive,
            negative,
            widgets["steps"],
            widgets["cfg"],
            sampler_name,
            scheduler,
            tiled_decode,
            custom_sampler if run.custom else None,
            custom_sigmas if run.custom else None,
        )
        out = usdu_sampling.redraw(
            image, run.settings, sampling, upscale_model, device, factor, cuda_graphs, image_name
        )
    return io.NodeOutput(to_intermediate(out))


# ---------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------

_DESCRIPTION = (
    "Tiled img2img upscaler (Ultimate SD Upscale) written for Nunchaku and every other model: "
    "normalizes the image range first (fixes washed-out Nunchaku output), upscales, then redraws the "
    "picture tile by tile with feathered float blending, per-tile conditioning crops and optional "
    "seam fixing. Same inputs as ssitu's node, plus normalize and tile_seed; no sys.modules tricks."
)


class UltimateSDUpscale(io.ComfyNode):
    """Upscale (model + Lanczos), then redraw tile by tile."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_UltimateSDUpscale",
            display_name="Ultimate SD Upscale (Nunchaku)",
            category="SpeedKit/upscaling",
            description=_DESCRIPTION,
            inputs=_inputs("main"),
            outputs=[io.Image.Output(tooltip="The upscaled, redrawn image, values in [0, 1].")],
        )

    @classmethod
    def execute(cls, image, **kwargs) -> io.NodeOutput:
        return _execute(image=image, **kwargs)


class UltimateSDUpscaleNoUpscale(io.ComfyNode):
    """Redraw an already upscaled image tile by tile (no resize)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_UltimateSDUpscaleNoUpscale",
            display_name="Ultimate SD Upscale (Nunchaku, No Upscale)",
            category="SpeedKit/upscaling",
            description=_DESCRIPTION + " This variant keeps the input size and only redraws.",
            inputs=_inputs("no_upscale"),
            outputs=[io.Image.Output(tooltip="The redrawn image, same size as upscaled_image, values in [0, 1].")],
        )

    @classmethod
    def execute(cls, upscaled_image, **kwargs) -> io.NodeOutput:
        return _execute(image=upscaled_image, image_name="upscaled_image", upscale_by=1.0, upscale_model=None, **kwargs)


class UltimateSDUpscaleCustomSample(io.ComfyNode):
    """Like the main node with SAMPLER + SIGMAS and an optional upscale model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_UltimateSDUpscaleCustomSample",
            display_name="Ultimate SD Upscale (Nunchaku, Custom Sample)",
            category="SpeedKit/upscaling",
            description=_DESCRIPTION
            + " This variant takes a SAMPLER and SIGMAS (both needed) and an optional upscale model "
            "(Lanczos when absent).",
            inputs=_inputs("custom"),
            outputs=[io.Image.Output(tooltip="The upscaled, redrawn image, values in [0, 1].")],
        )

    @classmethod
    def execute(cls, image, upscale_model=None, custom_sampler=None, custom_sigmas=None, **kwargs) -> io.NodeOutput:
        return _execute(
            image=image,
            upscale_model=upscale_model,
            custom_sampler=custom_sampler,
            custom_sigmas=custom_sigmas,
            **kwargs,
        )


NODES: list[type[io.ComfyNode]] = [UltimateSDUpscale, UltimateSDUpscaleNoUpscale, UltimateSDUpscaleCustomSample]
