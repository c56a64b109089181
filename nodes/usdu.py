"""ComfyUI adapter for usdu/: the three Ultimate SD Upscale nodes.

The tiling, masks, compositing, seeds and conditioning crops live in ``usdu/`` (no
ComfyUI import). This module only turns ComfyUI objects into the two functions the core
needs: ``process`` (VAE encode -> sampler -> VAE decode for a batch of tiles) and
``model_fn`` (the optional upscale model), and reports progress / honours Cancel.

Nothing here touches ``sys.modules``, ``sys.path`` or module-level state; the MODEL is
only handed to ``comfy.sample``, so wrapper-style diffusion models (Nunchaku) work.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from .. import torch_utils
from ..usdu import checks, pipeline, planner, runner
from ..usdu import cond as usdu_cond
from ..usdu import graphs as graphs_mod
from . import residency
from .comfy_bridge import progress_bar, throw_if_interrupted, to_intermediate

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 8192
SEED_MAX = 0xFFFFFFFFFFFFFFFF
DECODE_TILE = 512
"""Pixel tile of ``tiled_decode`` (the upstream node's fixed value)."""
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
            tooltip="Denoise of the seam-fix passes (really applied, unlike upstream); 0 = skip them."
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
            default=4,
            min=1,
            max=4096,
            step=1,
            tooltip="Most tiles per sampler call. More is faster and uses more VRAM; with batching 'exact' "
            "the picture is the same as one tile at a time.",
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
            tooltip="Replay the model's kernels of a repeated tile shape as a CUDA graph (one launch per "
            "step instead of thousands): much faster at small batch sizes, same pixels. Used only on "
            "CUDA for a fully loaded model without patches/ControlNet; anything else runs as usual.",
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
# ComfyUI plumbing: the two functions the core calls
# ---------------------------------------------------------------------------


@dataclass
class _Sampling:
    model: object
    vae: object
    positive: list
    negative: list
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    tiled_decode: bool
    custom_sampler: object = None
    custom_sigmas: torch.Tensor | None = None
    redraw_denoise: float = 1.0


def _tile_noise(latent: torch.Tensor, seeds: list[int], images: int) -> torch.Tensor:
    """CPU fp32 noise like ComfyUI's ``prepare_noise``, one seed per tile, from a private
    generator (the global torch RNG is left alone)."""
    chunks = []
    for k, seed in enumerate(seeds):
        part = latent[k * images : (k + 1) * images]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        chunks.append(torch.randn(part.shape, dtype=torch.float32, layout=part.layout, generator=gen, device="cpu"))
    return torch.cat(chunks, dim=0)


def _shorten_sigmas(sigmas: torch.Tensor, fraction: float) -> torch.Tensor:
    """The last ``fraction`` of a custom schedule's steps (a denoise for SIGMAS)."""
    if fraction >= 1.0:
        return sigmas
    steps = sigmas.shape[-1] - 1
    keep = max(1, round(steps * fraction))
    return sigmas[-(keep + 1) :]


def _decode(vae, samples: torch.Tensor, tiled: bool) -> torch.Tensor:
    tile = DECODE_TILE // 8
    if not tiled:
        try:
            return vae.decode(samples)
        except Exception as exc:  # noqa: BLE001 - only OOM falls back; everything else is re-raised
            if not torch_utils.is_oom_error(exc):
                raise
            logger.warning("USDU: VAE decode ran out of memory; using tiled decode")
    return vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=tile // 8)


TILE_ADM_KEY = "speedkit_usdu_tile_adm"
GRAPHS_KEY = "speedkit_usdu_cuda_graphs"
"""Key of the sampler wrapper that gives every tile of a batch its own SDXL size vector."""


def _with_tile_adm(model, sizes: list[dict], images: int):
    """A clone of ``model`` whose sampler rebuilds each conditioning entry's encoded vector
    (``y``: SDXL's pooled prompt + size/crop embeddings) per tile of the batch.

    ComfyUI encodes ``y`` once per entry from scalar ``width``/``crop_w``/... values and
    repeats it over the batch, so all tiles of one call would share the first tile's
    crop. The wrapper (on ComfyUI's ``calc_cond_batch``, before ControlNets and the model
    see ``y``) re-encodes every entry with each tile's values through the model's own
    ``encode_adm`` and stacks the rows job-major (``usdu.cond.per_tile_rows``): only the
    elements that depend on the sizes are replaced, and only when ComfyUI's ``y`` agrees
    with the re-encoded entry on all of them (otherwise, e.g. for unCLIP entries whose
    encoding needs the sampler's seed, the entry is left alone).
    The user's MODEL is not modified.
    """
    import comfy.conds
    import comfy.patcher_extension as pe

    prompt_types = ("positive", "negative")
    memo: dict = {}

    def rebuild(base, entry: dict, prompt_type: str, x_in: torch.Tensor) -> dict:
        y_cond = entry.get("model_conds", {}).get("y")
        current = getattr(y_cond, "cond", None)
        if not isinstance(current, torch.Tensor) or not hasattr(base, "encode_adm"):
            return entry
        # ComfyUI copies positive area entries into the negative list with the negative's
        # vector (same uuid, other `y`): key on both.
        key = (entry.get("uuid", id(entry)), id(y_cond))
        if key not in memo:
            params = {k: v for k, v in entry.items() if k not in ("model_conds", "uuid")}
            params.setdefault("prompt_type", prompt_type)
            params["device"] = x_in.device
            params.setdefault("noise", x_in)
            try:
                rows = usdu_cond.per_tile_rows(lambda p: base.encode_adm(**p), params, sizes, images, current)
            except Exception as exc:  # noqa: BLE001 - a model's encoder we cannot call: keep ComfyUI's vector
                logger.warning(
                    "USDU: could not re-encode the conditioning per tile (%s); the batch shares tile 1's", exc
                )
                rows = None
            if rows is None:
                logger.debug("USDU: conditioning vector not rebuilt per tile (model ignores sizes, or not exact)")
            memo[key] = None if rows is None else comfy.conds.CONDRegular(rows.to(current))
        if memo[key] is None:
            return entry
        out = dict(entry)
        out["model_conds"] = {**entry["model_conds"], "y": memo[key]}
        return out

    def wrapper(executor, base, conds, x_in, timestep, model_options):
        if x_in.shape[0] == len(sizes) * images:
            conds = [
                None if c is None else [rebuild(base, e, prompt_types[min(i, 1)], x_in) for e in c]
                for i, c in enumerate(conds)
            ]
        return executor(base, conds, x_in, timestep, model_options)

    patched = model.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, TILE_ADM_KEY, wrapper)
    return patched


def _graph_blocker(model, device: torch.device) -> str | None:
    """Why the model's calls cannot be replayed as CUDA graphs, or None when they can."""
    if device.type != "cuda":
        return "not a CUDA device"
    if getattr(model, "is_dynamic", lambda: False)():
        return "the model is streamed by ComfyUI's dynamic VRAM manager"
    options = model.model_options.get("transformer_options", {})
    for key in ("patches", "patches_replace"):
        if any(options.get(key, {}).values()):
            return f"the model carries {key} (e.g. FBCache, IPAdapter, attention patches)"
    wrappers = options.get("wrappers", {})
    if any(any(v.values()) if isinstance(v, dict) else v for v in wrappers.values()):
        return "the model carries wrappers from another node"
    if model.model_options.get("model_function_wrapper") is not None:
        return "the model carries a model_function_wrapper"
    return None


def _with_cuda_graphs(model, device: torch.device):
    """A clone of ``model`` whose diffusion-model calls go through a :class:`GraphRunner`
    (returned too, to close after the run), or ``(model, None)`` when that is not safe."""
    import comfy.patcher_extension as pe

    reason = _graph_blocker(model, device)
    if reason is not None:
        logger.info("USDU: CUDA graphs not used: %s", reason)
        return model, None
    diffusion = model.model.diffusion_model

    def weights():
        yield from diffusion.parameters()
        yield from diffusion.buffers()

    runner_ = graphs_mod.GraphRunner(weights)
    try:
        signature = inspect.signature(diffusion._forward)
    except (AttributeError, TypeError, ValueError):
        logger.info("USDU: CUDA graphs not used: the diffusion model has no inspectable _forward")
        return model, None
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def wrapper(executor, *args, **kwargs):
        # Name every argument (UNet and DiTs pass them positionally); ControlNet residuals
        # and anything unusual run eagerly.
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return executor(*args, **kwargs)
        named = dict(bound.arguments)
        named.update(named.pop(var_kw, None) or {})
        if named.pop("self", None) is not None or any(
            p.kind is p.VAR_POSITIONAL and named.get(p.name) for p in signature.parameters.values()
        ):
            return executor(*args, **kwargs)
        control = named.pop("control", None)
        options = named.pop("transformer_options", {})
        if control is not None:
            return executor(*args, **kwargs)
        if getattr(model.model, "model_lowvram", False):
            # Weights are cast in per layer from the CPU: keep ComfyUI's own streaming in charge.
            runner_.disable("the model is only partially loaded on the GPU (lowvram)")

        def call(**tensors):
            return executor(**tensors, control=None, transformer_options=options)

        return runner_(call, **named)

    patched = model.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, GRAPHS_KEY, wrapper)
    return patched, runner_


def _make_process(s: _Sampling, canvas_w: int, canvas_h: int, source_w: int, source_h: int, factor: int):
    import comfy.sample

    single = usdu_cond.needs_single_tiles(s.positive) or usdu_cond.needs_single_tiles(s.negative)

    def cancel_callback(*_args) -> None:
        throw_if_interrupted()

    def process(batch: runner.TileBatch) -> torch.Tensor:
        images = batch.images
        th, tw = batch.pixels.shape[1:3]
        geoms = [
            usdu_cond.TileGeometry(job.crop, canvas_w, canvas_h, source_w, source_h, tw, th, factor)
            for job in batch.jobs
        ]
        if single and len(batch.jobs) > 1:
            # Areas / GLIGEN boxes apply to a whole sampler call: only tiles on which they
            # crop identically share one; the batch is split into such runs.
            runs = usdu_cond.split_by_scalars([s.positive, s.negative], geoms)
            if len(runs) > 1:
                parts = []
                for a, b in runs:
                    sub = runner.TileBatch(
                        batch.jobs[a:b],
                        batch.pixels[a * images : b * images],
                        batch.seeds[a:b],
                        batch.denoise,
                        batch.pass_name,
                        images,
                    )
                    parts.append(process(sub))
                return torch.cat(parts, dim=0)
        positive = usdu_cond.crop_conditioning(s.positive, geoms, images)
        negative = usdu_cond.crop_conditioning(s.negative, geoms, images)
        model = s.model
        if len(geoms) > 1:
            model = _with_tile_adm(model, usdu_cond.tile_size_values(geoms), images)
        latent = s.vae.encode(batch.pixels[..., :3])
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = _tile_noise(latent, batch.seeds, images)
        if s.custom_sampler is not None and s.custom_sigmas is not None:
            fraction = 1.0 if batch.pass_name == "redraw" else batch.denoise
            samples = comfy.sample.sample_custom(
                model,
                noise,
                s.cfg,
                s.custom_sampler,
                _shorten_sigmas(s.custom_sigmas, fraction),
                positive,
                negative,
                latent,
                callback=cancel_callback,
                disable_pbar=True,
                seed=batch.seeds[0],
            )
        else:
            samples = comfy.sample.sample(
                model,
                noise,
                s.steps,
                s.cfg,
                s.sampler_name,
                s.scheduler,
                positive,
                negative,
                latent,
                denoise=batch.denoise,
                callback=cancel_callback,
                disable_pbar=True,
                seed=batch.seeds[0],
            )
        decoded = _decode(s.vae, samples, s.tiled_decode)
        return decoded[..., :3].to(device=batch.pixels.device, dtype=torch.float32)

    return process


def _make_model_fn(upscale_model):
    """``[B,H,W,C] -> [B,H*s,W*s,C]`` through the pack's upscale engine (``upscale_cuda``),
    the one the Upscale Image (SpeedKit CUDA) node and the CLI use: reduced precision where
    the architecture allows (fp32 redo of overflowed frames), whole frames or VRAM-sized
    tiles, out-of-memory halving. It runs on its own cached copy of the model (shared with
    that node), so the UPSCALE_MODEL other nodes hold is never moved or cast."""
    import comfy.model_management as mm

    from ..upscale_cuda.engine import UpscaleOptions, Upscaler
    from .upscale_cuda import UpscaleImageCUDA

    def run(image: torch.Tensor) -> torch.Tensor:
        device = mm.get_torch_device()
        upscaler = Upscaler(upscale_model, UpscaleOptions(), device=device, cache=UpscaleImageCUDA.cache)
        mm.free_memory(upscaler.memory_estimate(image.shape[1], image.shape[2]), device)
        out, _report = upscaler.upscale(
            image, out_device=device, out_dtype=torch.float32, check_cancel=throw_if_interrupted
        )
        return out

    return run


def _precision(model, vae) -> dict[str, torch.dtype | None]:
    """Compute dtypes of the model and the VAE (None where a wrapper hides them), so the
    warning about tiles that decode to NaN/Inf blames fp16 only in a reduced-precision run."""
    model_dtype = None
    inner = getattr(model, "model", None)
    for attr in ("get_dtype_inference", "get_dtype"):  # manual cast (fp8 weights) first
        fn = getattr(inner, attr, None)
        if callable(fn):
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - a wrapper model without a dtype: the hint stays generic
                continue
            if isinstance(value, torch.dtype):
                model_dtype = value
                break
    vae_dtype = getattr(vae, "vae_dtype", None)
    return {"model": model_dtype, "VAE": vae_dtype if isinstance(vae_dtype, torch.dtype) else None}


def _redraw(image, settings, model, vae, upscale_model, device, factor, sampling, cuda_graphs, image_name):
    """Upscale and redraw with ``model`` (already the resident copy where one was made)."""
    source_h, source_w = image.shape[1:3]
    graphs = None
    if cuda_graphs:
        model, graphs = _with_cuda_graphs(model, device)
        sampling.model = model
    state: dict = {}

    def on_canvas(canvas: torch.Tensor) -> None:
        ch, cw = canvas.shape[1:3]
        state["process"] = _make_process(sampling, cw, ch, source_w, source_h, factor)

    def process(batch: runner.TileBatch) -> torch.Tensor:
        return state["process"](batch)

    def on_batch_done(done: int, total: int) -> None:
        if "pbar" not in state:  # the runner plans the tiles once and says how many calls there are
            state["pbar"] = progress_bar(max(total, 1))
        state["pbar"].update_absolute(done, total)

    model_fn = _make_model_fn(upscale_model) if upscale_model is not None else None
    precision = _precision(model, vae)
    try:
        return pipeline.upscale_then_redraw(
            image,
            settings,
            process,
            model_fn=model_fn,
            device=device,
            multiple=factor,
            check_cancel=throw_if_interrupted,
            on_batch_done=on_batch_done,
            on_canvas=on_canvas,
            precision=precision,
            image_name=image_name,
        )
    finally:
        if graphs is not None:
            if graphs.captures:
                logger.info(
                    "USDU: %d CUDA graph(s), %d replays, %d eager model calls%s",
                    graphs.captures,
                    graphs.replays,
                    graphs.eager_calls,
                    f" ({graphs.disabled})" if graphs.disabled else "",
                )
            graphs.close()


def _execute(
    *,
    image,
    model,
    positive,
    negative,
    vae,
    upscale_by: float,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float,
    upscale_model,
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
    tiled_decode: bool,
    batch_size: int,
    normalize: str,
    tile_seed: str,
    cuda_graphs: bool = True,
    batching: str = "exact",
    custom_sampler=None,
    custom_sigmas=None,
    image_name: str = "image",
) -> io.NodeOutput:
    import comfy.model_management as mm

    if vae is None:
        raise ValueError("vae: no VAE connected; connect the VAE that matches the model (e.g. from Load Checkpoint)")
    if model is None:
        raise ValueError("model: no MODEL connected; connect a diffusion model")
    # Every input is checked here, before a model is cloned or a tile sampled.
    checks.check_image(image, image_name)
    images = image.shape[0]
    for name, c in (("positive", positive), ("negative", negative)):
        usdu_cond.check_conditioning(c, images, name)
    if (custom_sampler is None) != (custom_sigmas is None):
        logger.warning("USDU: custom_sampler and custom_sigmas must both be connected; using sampler_name/steps")
        custom_sampler = custom_sigmas = None
    checks.check_number("cfg", cfg, fix="use a finite guidance scale between 0 and 100 (typically 1 to 10)")
    redraw_denoise, seam_denoise = denoise, seam_fix_denoise
    if custom_sigmas is None:
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
    factor = int(vae.spacial_compression_encode()) if hasattr(vae, "spacial_compression_encode") else 8
    device = mm.get_torch_device()
    with residency.full_residency(model, "USDU", working_bytes=WORKING_BYTES) as resident:
        out = _redraw(
            image,
            settings,
            resident,
            vae,
            upscale_model,
            device,
            factor,
            _Sampling(
                resident,
                vae,
                positive,
                negative,
                steps,
                cfg,
                sampler_name,
                scheduler,
                tiled_decode,
                custom_sampler,
                custom_sigmas,
            ),
            cuda_graphs,
            image_name,
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
