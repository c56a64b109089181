"""ComfyUI side of the USDU run: the two functions ``usdu.pipeline`` calls, built from
ComfyUI objects.

- ``process(batch)`` (:func:`make_process`): VAE encode -> ``comfy.sample`` -> VAE decode
  for one batch of tiles; cropping the prompts, splitting the batch and the per-tile noise
  are :mod:`usdu.sampling` (no ComfyUI);
- ``model_fn(image)`` (:func:`make_model_fn`): the optional upscale model, through the
  pack's own upscale engine.

The MODEL is only handed to ``comfy.sample`` (wrapper-style diffusion models such as
Nunchaku work); clones carry the per-run wrappers of :mod:`.usdu_wrappers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import torch_utils
from ..usdu import pipeline, runner
from ..usdu import sampling as usdu_sampling
from ..usdu.stage_clock import StageClock
from .comfy_bridge import progress_bar, throw_if_interrupted
from .usdu_wrappers import with_cuda_graphs, with_tile_adm

logger = logging.getLogger(__name__)

DECODE_TILE = 512
"""Pixel tile of ``tiled_decode`` (the upstream node's fixed value)."""


@dataclass
class Sampling:
    """The ComfyUI objects and sampler settings every tile of a run is sampled with."""

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


def decode(vae, samples: torch.Tensor, tiled: bool) -> torch.Tensor:
    """VAE decode; falls back to ComfyUI's tiled decode on out-of-memory (or when asked)."""
    tile = DECODE_TILE // 8
    if not tiled:
        try:
            return vae.decode(samples)
        except Exception as exc:  # noqa: BLE001 - only OOM falls back; everything else is re-raised
            if not torch_utils.is_oom_error(exc):
                raise
            logger.warning("USDU: VAE decode ran out of memory; using tiled decode")
    return vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=tile // 8)


def make_process(s: Sampling, canvas: usdu_sampling.Canvas, clock: StageClock | None = None) -> runner.ProcessFn:
    """``process(batch) -> pixels`` for tiles of ``canvas``: one ComfyUI sampler call per
    :class:`usdu.sampling.TileCall` of the batch (stages timed on ``clock``)."""
    import comfy.sample

    clock = clock or StageClock()

    conditioner = usdu_sampling.TileConditioner(s.positive, s.negative, canvas)

    def cancel_callback(*_args) -> None:
        throw_if_interrupted()

    def sample(call: usdu_sampling.TileCall) -> torch.Tensor:
        batch = call.batch
        model = s.model
        if call.sizes is not None:
            model = with_tile_adm(model, call.sizes, batch.images)
        with clock.stage("VAE encode"):
            latent = s.vae.encode(batch.pixels[..., :3])
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = usdu_sampling.tile_noise(latent, batch.seeds, batch.images)
        with clock.stage("sampling"):
            samples = _sample(model, noise, latent, call, batch)
        with clock.stage("VAE decode"):
            decoded = decode(s.vae, samples, s.tiled_decode)
            return decoded[..., :3].to(device=batch.pixels.device, dtype=torch.float32)

    def _sample(model, noise, latent, call: usdu_sampling.TileCall, batch: runner.TileBatch) -> torch.Tensor:
        if s.custom_sampler is not None and s.custom_sigmas is not None:
            return comfy.sample.sample_custom(
                model,
                noise,
                s.cfg,
                s.custom_sampler,
                usdu_sampling.pass_sigmas(s.custom_sigmas, batch),
                call.positive,
                call.negative,
                latent,
                callback=cancel_callback,
                disable_pbar=True,
                seed=batch.seeds[0],
            )
        return comfy.sample.sample(
            model,
            noise,
            s.steps,
            s.cfg,
            s.sampler_name,
            s.scheduler,
            call.positive,
            call.negative,
            latent,
            denoise=batch.denoise,
            callback=cancel_callback,
            disable_pbar=True,
            seed=batch.seeds[0],
        )

    def process(batch: runner.TileBatch) -> torch.Tensor:
        parts = [sample(call) for call in conditioner.calls(batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    return process


def make_model_fn(upscale_model, clock: StageClock | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B,H,W,C] -> [B,H*s,W*s,C]`` through the pack's upscale engine (``upscale_cuda``),
    the one the Upscale Image (SpeedKit CUDA) node and the CLI use: reduced precision where
    the architecture allows (fp32 redo of overflowed frames), whole frames or VRAM-sized
    tiles, out-of-memory halving. It runs on its own cached copy of the model (shared with
    that node), so the UPSCALE_MODEL other nodes hold is never moved or cast."""
    import comfy.model_management as mm

    from ..upscale_cuda.engine import UpscaleOptions, Upscaler
    from .upscale_cuda import UpscaleImageCUDA

    clock = clock or StageClock()

    def run(image: torch.Tensor) -> torch.Tensor:
        device = mm.get_torch_device()
        upscaler = Upscaler(upscale_model, UpscaleOptions(), device=device, cache=UpscaleImageCUDA.cache)
        with clock.stage("upscale model"):
            mm.free_memory(upscaler.memory_estimate(image.shape[1], image.shape[2]), device)
            out, _report = upscaler.upscale(
                image, out_device=device, out_dtype=torch.float32, check_cancel=throw_if_interrupted
            )
        return out

    return run


def precision(model, vae) -> dict[str, torch.dtype | None]:
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


def redraw(
    image: torch.Tensor,
    settings: pipeline.UsduSettings,
    sampling: Sampling,
    upscale_model,
    device: torch.device,
    factor: int,
    cuda_graphs: bool,
    image_name: str,
) -> torch.Tensor:
    """Upscale and redraw with ``sampling.model`` (already the resident copy where one was
    made); the CUDA-graph clone, when used, lives only for this call."""
    source_h, source_w = image.shape[1:3]
    graphs = None
    clock = StageClock(device)
    if cuda_graphs:
        sampling.model, graphs = with_cuda_graphs(sampling.model, device)
    if settings.batch_size == 0:
        size = pipeline.resolve_batch_size(0, graphs is not None, settings.batching)
        settings = replace(settings, batch_size=size)
        logger.info(
            "USDU: batch_size automatic: %d tile(s) per sampler call (%s, batching %s)",
            size,
            "the calls replay as CUDA graphs" if graphs is not None else "eager calls",
            settings.batching,
        )
    state: dict = {}

    def on_canvas(canvas: torch.Tensor) -> None:
        ch, cw = canvas.shape[1:3]
        state["process"] = make_process(sampling, usdu_sampling.Canvas(cw, ch, source_w, source_h, factor), clock)

    def process(batch: runner.TileBatch) -> torch.Tensor:
        return state["process"](batch)

    def on_batch_done(done: int, total: int) -> None:
        if "pbar" not in state:  # the runner plans the tiles once and says how many calls there are
            state["pbar"] = progress_bar(max(total, 1))
        state["pbar"].update_absolute(done, total)

    model_fn = make_model_fn(upscale_model, clock) if upscale_model is not None else None
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
            precision=precision(sampling.model, sampling.vae),
            image_name=image_name,
        )
    finally:
        if clock.stages:
            try:
                logger.info("USDU: time per stage: %s", clock.summary())
            except Exception as exc:  # noqa: BLE001 - a broken CUDA context must not hide the run's own error
                logger.debug("USDU: no stage times: %s", exc)
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
