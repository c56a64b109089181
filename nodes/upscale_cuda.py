"""ComfyUI adapter for upscale_cuda/: ``SpeedKit_UpscaleImageCUDA``."""

from __future__ import annotations

import gc
import logging
import weakref
from typing import ClassVar

import torch
from comfy_api.latest import io

from ..upscale_cuda.cache import COMPILE_MODES, ModelCache
from ..upscale_cuda.engine import PRECISIONS, UpscaleOptions, Upscaler
from ..upscale_cuda.planning import OPTIMIZATION_LEVELS
from .comfy_bridge import progress_bar, throw_if_interrupted

logger = logging.getLogger(__name__)


class UpscaleImageCUDA(io.ComfyNode):
    """ComfyUI's "Upscale Image (using Model)", the same picture, many times faster."""

    # UPSCALE_MODEL objects are spandrel descriptors: without spandrel the registry skips this
    # node with a warning naming the package, instead of failing when it runs.
    REQUIRES = ("spandrel",)

    # The one long-lived object of this node: our own copies of recently used models and
    # their compiled graphs (bounded LRU, parked on the CPU between runs). Explicit and
    # bounded rather than a hidden global; see upscale_cuda/cache.py.
    cache: ClassVar[ModelCache] = ModelCache(max_models=2)
    # With keep_model_loaded: the ComfyUI ModelPatcher that registers our kept copies with
    # ComfyUI's model management (at most one; see _register_kept). Holds no shared model.
    kept: ClassVar[list] = []

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_UpscaleImageCUDA",
            display_name="Upscale Image (SpeedKit CUDA)",
            category="SpeedKit/upscaling",
            description=(
                "Upscales images or video frames with an upscale model (ESRGAN, Real-ESRGAN, Compact, SPAN, "
                "SwinIR, ...) loaded by 'Load Upscale Model'. Same result as ComfyUI's 'Upscale Image (using "
                "Model)' (outputs are only clamped to 0..1, never rescaled), many times faster: half precision "
                "where the architecture supports it, whole frames or large tiles on the GPU, optional "
                "torch.compile, overlapped transfers. The model is not modified and leaves the GPU afterwards "
                "unless keep_model_loaded is on."
            ),
            inputs=[
                io.UpscaleModel.Input("upscale_model", tooltip="The model from 'Load Upscale Model'."),
                io.Image.Input("image", tooltip="The images or video frames to upscale (any batch size)."),
                io.Combo.Input(
                    "use_autocast",
                    options=["enable", "disable"],
                    default="enable",
                    tooltip=(
                        "enable: run in the reduced precision chosen by 'precision' (fast). "
                        "disable: run in fp32 like ComfyUI's own node ('precision' is then ignored)."
                    ),
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip=(
                        "auto: fp16 if the architecture supports it, else bf16, else fp32 (never fp16 for "
                        "architectures that overflow in it, e.g. SwinIR/HAT/DAT). A tile that still overflows is "
                        "redone in bf16/fp32 automatically. Choosing a precision the model cannot run is an error."
                    ),
                ),
                io.Int.Input(
                    "tile_size",
                    default=0,
                    min=0,
                    max=8192,
                    step=8,
                    tooltip=(
                        "Tile side in input pixels. 0 = automatic: the whole frame when it fits in free VRAM, "
                        "else the largest tile that fits. Out of memory halves the tile and retries."
                    ),
                ),
                io.Int.Input(
                    "overlap",
                    default=0,
                    min=0,
                    max=512,
                    step=4,
                    tooltip=(
                        "Overlap between tiles in input pixels (unused for whole frames). 0 = automatic per "
                        "architecture (32, or enough for an exact result for Compact/SPAN). The outer quarter "
                        "on each side is context only, the middle half is cross-faded."
                    ),
                    advanced=True,
                ),
                io.Combo.Input(
                    "enable_compile",
                    options=["disable", "enable"],
                    default="disable",
                    tooltip=(
                        "enable: torch.compile the model (faster frames; the first run of each model and "
                        "frame size compiles, a restarted ComfyUI reuses the on-disk cache). Worth it for "
                        "videos and repeated sizes. Needs CUDA and triton; otherwise the normal path runs "
                        "and the report says why."
                    ),
                ),
                io.Combo.Input(
                    "compile_mode",
                    options=list(COMPILE_MODES),
                    default=COMPILE_MODES[0],
                    tooltip=(
                        "Only with enable_compile. regional: compile the repeated blocks once (quick to "
                        "compile, frames a little slower than whole). default: compile the whole model "
                        "(fastest frames, longer first compile). max-autotune-no-cudagraphs: whole model "
                        "with kernel autotuning (slowest to compile)."
                    ),
                    advanced=True,
                ),
                io.Combo.Input(
                    "optimization_level",
                    options=list(OPTIMIZATION_LEVELS),
                    default=OPTIMIZATION_LEVELS[0],
                    tooltip=(
                        "How much free VRAM automatic tiles and batches may use: balanced 70 %, speed 85 %, "
                        "memory 35 % (and tiles of at most 512 px)."
                    ),
                    advanced=True,
                ),
                io.Int.Input(
                    "batch_size",
                    default=0,
                    min=0,
                    max=256,
                    tooltip=(
                        "Frames (whole-frame mode) or tiles per model call. 0 = automatic (batches small "
                        "frames, about 2 megapixels per call). Never more than fit in free memory: a larger "
                        "value is reduced, with a log line."
                    ),
                    advanced=True,
                ),
                io.Boolean.Input(
                    "keep_model_loaded",
                    default=False,
                    tooltip=(
                        "Off: our copy of the model goes back to the CPU after the run (GPU free for the next "
                        "node). On: it stays on the GPU (costs its weights' VRAM, twice that with compile_mode "
                        "regional) and the next run skips the upload: helps when the node runs again and again "
                        "(video chunks, batches of prompts). ComfyUI can still unload it like its own models "
                        "when another model needs the memory. The loaded 'Load Upscale Model' model itself is "
                        "never moved."
                    ),
                    advanced=True,
                ),
            ],
            outputs=[
                io.Image.Output(tooltip="The upscaled images, values in [0, 1], on ComfyUI's usual device."),
                io.String.Output(
                    "report",
                    tooltip="What ran: backend and why, precision, tiles, total seconds and ms per frame.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        upscale_model,
        image,
        use_autocast: str = "enable",
        precision: str = "auto",
        tile_size: int = 0,
        overlap: int = 0,
        enable_compile: str = "disable",
        compile_mode: str = "regional",
        optimization_level: str = "balanced",
        batch_size: int = 0,
        keep_model_loaded: bool = False,
    ) -> io.NodeOutput:
        import comfy.model_management as mm

        options = UpscaleOptions(
            precision=precision,
            use_autocast=use_autocast == "enable",
            tile_size=tile_size,
            overlap=overlap,
            compile=enable_compile == "enable",
            compile_mode=compile_mode,
            optimization_level=optimization_level,
            batch_size=batch_size,
            keep_loaded=bool(keep_model_loaded),
        )
        device = mm.get_torch_device()
        upscaler = Upscaler(upscale_model, options, device=device, cache=cls.cache)
        if image.ndim == 4:
            # Let ComfyUI unload other models first (it only frees what it must).
            mm.free_memory(upscaler.memory_estimate(image.shape[1], image.shape[2]), device)
        pbar = progress_bar(1)
        try:
            out, report = upscaler.upscale(
                image,
                out_device=mm.intermediate_device(),
                out_dtype=mm.intermediate_dtype(),
                progress=lambda done, total: pbar.update_absolute(done, total),
                check_cancel=throw_if_interrupted,
            )
        finally:
            # Runs on success, error and cancel alike, so ComfyUI's view matches where our copies are.
            try:
                cls._register_kept(device)
            except Exception:
                # Never leave a copy on the GPU that ComfyUI does not know about.
                logger.warning("upscale: could not register the kept model with ComfyUI; moving it to the CPU",
                               exc_info=True)  # fmt: skip
                cls.cache.offload()
                cls.kept.clear()
        return io.NodeOutput(out, report.text())

    @classmethod
    def _register_kept(cls, device) -> None:
        """Tell ComfyUI's model management about the copies a run left on ``device``.

        They are wrapped (our own copies only, in a fresh container module) in a plain
        ``ModelPatcher`` and loaded through ``load_models_gpu``: they then count as a loaded
        model, so ``free_memory`` (another model loading, the 'Unload models' button,
        ``unload_all_models``) can evict them, which moves them to the CPU where our cache
        expects them. With nothing kept (the option off) nothing is registered.

        The previous registration is released first by dropping the only reference to it:
        ComfyUI's loaded list holds models weakly and removes an entry once its model is
        freed (``cleanup_models``). Releasing moves nothing: the cache has already parked
        the copies this run did not keep on the CPU.
        """
        import comfy.model_management as mm
        import comfy.model_patcher

        # Each popped patcher is freed at once (``cls.kept`` held the only reference), and
        # with it its container, whose finalizer makes ComfyUI drop the entry.
        previous = [weakref.ref(cls.kept.pop().model) for _ in range(len(cls.kept))]
        if any(ref() is not None for ref in previous):
            gc.collect()  # only a reference cycle could still hold one
        resident = cls.cache.kept_modules()
        if not resident:
            return
        holder = torch.nn.ModuleList(resident)
        patcher = comfy.model_patcher.ModelPatcher(holder, load_device=device, offload_device=torch.device("cpu"))
        # The copies are already on the device: this full load moves nothing and registers them.
        mm.load_models_gpu([patcher], force_full_load=True)
        cls.kept.append(patcher)


NODES: list[type[io.ComfyNode]] = [UpscaleImageCUDA]
