"""The upscaling engine: a spandrel ``ImageModelDescriptor`` + an image batch -> upscaled batch.

Contract (the same picture as ComfyUI's stock node and spandrel's ``__call__``):
- inputs are padded bottom/right (reflect, then replicate) to the model's size
  requirements and the padding is cropped from the output;
- each model output is clamped per pixel to [0, 1]; nothing else touches values (no
  rescaling by a max or by quantiles: that darkens frames and makes video flicker);
- tiles are equal-shape windows blended with context margins and a linear cross-fade
  (see :mod:`.planning`), so a local CNN gives the whole-image result.

Speed comes from: reduced precision chosen per architecture, channels_last, whole frames
or large tiles batched per call, optional torch.compile (one static shape per run),
outputs assembled on the GPU and downloaded once per frame on a side stream.

The shared descriptor is never modified: the engine runs its own copy of the module
(see :class:`.cache.ModelCache`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..torch_utils import (
    check_image,
    dtype_name,
    error_line,
    free_memory_bytes,
    host_available_bytes,
    is_oom_error,
    pick_device,
    pick_dtype,
)
from .cache import (
    COMPILE_MODES,
    ModelCache,
    compile_unavailable_reason,
    inductor_cache_dir,
    split_conv_bias,
)
from .fused_rrdb import fuse_dense_blocks
from .host_io import ChunkReader, FrameWriter
from .planning import (
    MEMORY_SHARE,
    OPTIMIZATION_LEVELS,
    ModelTraits,
    TilePlan,
    align_tile,
    auto_overlap,
    bytes_per_pixel,
    choose_batch,
    choose_tile,
    plan_tiles,
    tile_weights,
)

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp16", "bf16", "fp32")
# Local CNNs whose receptive field is the sum of their conv radii (no global pooling,
# no attention across the image), so overlap can be made large enough for exact tiles.
_LOCAL_ARCHES = {"Compact", "SPAN"}


@dataclass(frozen=True)
class UpscaleOptions:
    """User choices. 0 means "automatic" for tile_size, overlap and batch_size."""

    precision: str = "auto"
    use_autocast: bool = True  # False = run fp32 whatever ``precision`` says (stock numerics)
    tile_size: int = 0
    overlap: int = 0
    compile: bool = False
    compile_mode: str = "regional"
    optimization_level: str = "balanced"
    batch_size: int = 0
    cudnn_benchmark: bool = True  # autotune cuDNN algorithms for the run's (few) shapes
    split_bias: bool = True  # CUDA fp16/bf16: conv bias as a separate add (see cache.split_conv_bias)
    fuse_blocks: bool = True  # CUDA fp16/bf16: ESRGAN dense blocks regrouped into wide convs (fused_rrdb)
    # Leave this run's model copy on the compute device afterwards (saves the host->device
    # weight upload on the next run); other cached copies are still parked on the CPU.
    keep_loaded: bool = False
    # Bytes: when > 0, the planner assumes at most this much free memory on the compute device
    # (the smaller of it and what the device reports). For embedding the engine next to other
    # work, and for tests that check the plan against a known budget.
    memory_limit: int = 0

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: unknown value {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization_level: unknown value {self.optimization_level!r}; "
                f"choose one of {', '.join(OPTIMIZATION_LEVELS)}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: unknown value {self.compile_mode!r}; choose one of {COMPILE_MODES}")
        for name in ("tile_size", "overlap", "batch_size", "memory_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0 = automatic), got {getattr(self, name)}")


@dataclass
class RunReport:
    """What a run did, for logs and the node's text output."""

    arch: str
    device: str
    precision: str
    backend: str
    backend_reason: str
    frames: int = 0
    in_size: tuple[int, int] = (0, 0)
    out_size: tuple[int, int] = (0, 0)
    tile: str = ""
    batch: int = 1
    seconds: float = 0.0
    redone_tiles: int = 0
    oom_retries: int = 0
    copy_tail_s: float = 0.0  # host copies still running after the GPU finished
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        per = self.seconds / max(self.frames, 1)
        lines = [
            f"{self.arch} x{self.out_size[1] // max(self.in_size[1], 1)} on {self.device}: "
            f"{self.frames} frame(s) {self.in_size[1]}x{self.in_size[0]} -> {self.out_size[1]}x{self.out_size[0]}",
            f"backend {self.backend} ({self.backend_reason}), precision {self.precision}",
            f"tiles {self.tile}, batch {self.batch}",
            f"{self.seconds:.3f} s total, {per * 1000:.1f} ms/frame, {self.frames / max(self.seconds, 1e-9):.2f} fps"
            + (f" (output copy after the GPU finished: {self.copy_tail_s * 1000:.1f} ms)" if self.copy_tail_s else ""),
        ]
        if self.redone_tiles:
            lines.append(f"{self.redone_tiles} tile(s) overflowed and were redone in a safer precision")
        if self.oom_retries:
            lines.append(f"{self.oom_retries} out-of-memory retries with smaller tiles")
        lines.extend(self.notes)
        return "\n".join(lines)


def _is_image_descriptor(model: object) -> bool:
    from spandrel import ImageModelDescriptor

    return isinstance(model, ImageModelDescriptor)


def model_traits(descriptor) -> ModelTraits:
    """Read the tiling-relevant facts from a spandrel descriptor."""
    req = descriptor.size_requirements
    tiling = getattr(getattr(descriptor, "tiling", None), "name", "SUPPORTED").lower()
    arch = descriptor.architecture.id if hasattr(descriptor, "architecture") else type(descriptor.model).__name__
    rf = None
    if arch in _LOCAL_ARCHES:
        rf = sum(
            (m.kernel_size[0] // 2) * m.dilation[0]
            for m in descriptor.model.modules()
            if isinstance(m, torch.nn.Conv2d)
        )
    return ModelTraits(
        scale=int(descriptor.scale),
        in_channels=int(descriptor.input_channels),
        out_channels=int(descriptor.output_channels),
        minimum=int(req.minimum),
        multiple_of=int(req.multiple_of),
        square=bool(req.square),
        tiling=tiling,
        arch=str(arch),
        receptive_field=rf,
    )


def _pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Bottom/right padding like spandrel: reflect as far as possible, replicate the rest."""
    if not pad_h and not pad_w:
        return x
    h, w = x.shape[-2:]
    rh, rw = min(pad_h, h - 1), min(pad_w, w - 1)
    x = torch.nn.functional.pad(x, (0, rw, 0, rh), mode="reflect") if (rh or rw) else x
    if pad_h - rh or pad_w - rw:
        x = torch.nn.functional.pad(x, (0, pad_w - rw, 0, pad_h - rh), mode="replicate")
    return x


class Upscaler:
    """Runs one spandrel image model over image batches.

    Create one per node execution (cheap): the expensive parts (model copies, compiled
    graphs) live in the :class:`ModelCache` passed in, which the caller keeps.
    """

    def __init__(
        self,
        descriptor,
        options: UpscaleOptions | None = None,
        device: torch.device | str | None = None,
        cache: ModelCache | None = None,
    ) -> None:
        if not _is_image_descriptor(descriptor):
            kind = type(descriptor).__name__
            raise ValueError(
                f"upscale_model: expected a single-image upscale model (spandrel ImageModelDescriptor), got {kind}; "
                "inpainting/masked or multi-image models cannot be used here - load an SR model "
                "(e.g. RealESRGAN_x4plus) with 'Load Upscale Model'"
            )
        self.options = options or UpscaleOptions()
        self.options.validate()
        self.descriptor = descriptor
        self.traits = model_traits(descriptor)
        if device is None and not torch.cuda.is_available():
            logger.info("upscale: no CUDA device found, running on the CPU (much slower, same result)")
        self.device = pick_device(device)
        self.cache = cache if cache is not None else ModelCache(max_models=1)
        requested = self.options.precision if self.options.use_autocast else "fp32"
        if not self.options.use_autocast and self.options.precision not in ("auto", "fp32"):
            logger.info("upscale: use_autocast is disabled, so precision %s is ignored (fp32)", self.options.precision)
        self.dtype = pick_dtype(
            requested,
            self.device,
            supports_half=bool(descriptor.supports_half),
            supports_bfloat16=bool(descriptor.supports_bfloat16),
        )
        if self.dtype is torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision: bf16 was chosen but this GPU has no bf16 support; use auto, fp16 or fp32")
        self._call_fn: Callable = getattr(descriptor, "_call_fn", None) or (lambda model, image: model(image))
        self._fingerprint: str | None = None
        # Run reduced-precision calls under autocast (see _call): from the start for the
        # architectures spandrel keeps out of fp16 (attention families).
        self._mixed = not bool(descriptor.supports_half)
        self._fp32_fallback = False  # set when reduced precision fails even under autocast
        self._ready: dict = {}  # dtype / compiled key -> copy already on the device this run
        self._check_cancel: Callable[[], None] | None = None
        self._hooks: list = []  # cancel checks on our copies during one run (see _watch_cancel)
        self._done = 0
        self.backend, self.backend_reason = self._choose_backend()

    # -- backend ------------------------------------------------------------------------
    def _choose_backend(self) -> tuple[str, str]:
        if not self.options.compile:
            return "eager", "compile disabled"
        reason = compile_unavailable_reason(self.device)
        if reason is not None:
            return "eager", f"compile unavailable: {reason}"
        return f"compiled:{self.options.compile_mode}", f"torch.compile, inductor cache in {self.cache.cache_dir}"

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.cache.fingerprint(self.descriptor.model, self.traits.arch)
        return self._fingerprint

    def _variant(self, dtype: torch.dtype) -> tuple[str, Callable | None]:
        """Cache key and copy transform for ``dtype`` on this device."""
        fast = self.device.type == "cuda" and dtype is not torch.float32
        split = self.options.split_bias and fast
        fuse = self.options.fuse_blocks and fast
        if not (split or fuse):
            return self.fingerprint, None

        def transform(module: torch.nn.Module) -> None:
            if fuse:
                fuse_dense_blocks(module)  # before split_conv_bias: it reads plain Conv2d blocks
            if split:
                split_conv_bias(module)

        return self.fingerprint + ("+fused" if fuse else "") + ("+split-bias" if split else ""), transform

    def _module(self, dtype: torch.dtype) -> torch.nn.Module:
        module = self._ready.get(dtype)
        if module is None:
            key, transform = self._variant(dtype)
            # Copying, transforming and moving a model take up to a second on the first run:
            # a Cancel pressed meanwhile is answered between the steps, not after the first call.
            copy_ = self.cache.module(self.descriptor.model, key, dtype, transform)
            self._cancel_point()
            module = self._place(copy_)
            self._cancel_point()
            self._ready[dtype] = module
            self._watch_cancel(module)
        return module

    def _cancel_point(self) -> None:
        if self._check_cancel is not None:
            self._check_cancel()

    def _watch_cancel(self, module: torch.nn.Module) -> None:
        """Check for cancel inside eager model calls, before each layer.

        One call can take many seconds on the CPU (a whole frame, or a large tile batch), and
        on a GPU the first call of a run autotunes cuDNN inside each new conv shape (about a
        second for RRDB's full-resolution convs): checking only between calls, or between
        blocks, made a cancel wait that long. A check is a flag read, microseconds per layer
        against milliseconds of GPU work. The hooks sit on our own copy for this run only
        (removed when the run ends) and are left out for compiled models, whose graphs they
        would break.
        """
        if self._check_cancel is None or self.backend.startswith("compiled"):
            return
        check = self._check_cancel

        def hook(_module, _args) -> None:
            check()

        for sub in module.modules():
            if sub is not module:
                self._hooks.append(sub.register_forward_pre_hook(hook))

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move one of our copies to the device (once per run; the cache parks it on the CPU after)."""
        if self.device.type == "cuda":
            module.to(self.device, memory_format=torch.channels_last)  # one pass over the modules
        else:
            module.to(self.device)
        return module

    # -- planning -----------------------------------------------------------------------
    def memory_estimate(self, height: int, width: int) -> int:
        """Device bytes a whole-frame pass would like: weights + activations + output.

        Used to ask the host application to unload other models before we start; the
        actual tile plan is then made from whatever is free. Capped at the
        optimization level's share of the device, so a large frame does not evict every
        other model when tiles would do.
        """
        elem = torch.tensor([], dtype=self.dtype).element_size()
        weights = sum(p.numel() for p in self.descriptor.model.parameters()) * elem
        s = self.traits.scale
        act = height * width * bytes_per_pixel(self.traits, elem)
        out = height * width * s * s * 4 * (self.traits.out_channels + 1)
        wanted = int(weights + act + out)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            wanted = min(wanted, int(total * MEMORY_SHARE[self.options.optimization_level]))
        return wanted

    def free_bytes(self) -> int:
        """Free memory on the compute device, capped by ``options.memory_limit`` when set."""
        free = free_memory_bytes(self.device)
        limit = self.options.memory_limit
        return min(free, limit) if limit > 0 else free

    def reserved_bytes(self, out: torch.Tensor | None = None) -> int:
        """Memory a run needs on the compute device besides the model calls' activations.

        Our copy of the weights, and, when the output batch lives on the compute device (the
        CPU case), that batch: it is allocated before planning but its pages are only taken as
        frames are written, so the OS does not count it as used yet.
        """
        elem = torch.tensor([], dtype=self.dtype).element_size()
        reserved = sum(p.numel() for p in self.descriptor.model.parameters()) * elem
        if out is not None and out.device.type == self.device.type:
            reserved += out.numel() * out.element_size()
        return int(reserved)

    def plan(self, height: int, width: int, batch: int = 1, reserved: int = 0) -> TilePlan:
        """The tile plan a frame of ``height x width`` gets with the current options.

        ``reserved``: bytes of the device's free memory already promised to the run (see
        :meth:`reserved_bytes`), left out of the budget for tiles.
        """
        opts, traits = self.options, self.traits
        if opts.tile_size > 0:
            floor = max(traits.minimum, 1)
            if opts.tile_size < floor:
                raise ValueError(
                    f"tile_size: {opts.tile_size} is below the minimum {floor} px this {traits.arch} model accepts; "
                    f"use 0 (auto) or at least {floor}"
                )
            tile = max(floor, (opts.tile_size // traits.multiple_of) * traits.multiple_of)
            if self.device.type == "cpu" and traits.tiling != "internal":
                # On the CPU running out of memory kills the process: a tile that cannot fit is reduced.
                # A tile larger than the frame is the frame: only what is really cut is checked.
                elem = torch.tensor([], dtype=self.dtype).element_size()
                free = self.free_bytes()
                th, tw = min(tile, height), min(tile, width)
                fits = choose_tile(th, tw, traits, elem, free, opts.optimization_level, reserved=reserved)
                if fits:
                    logger.warning(
                        "upscale: tile_size %d does not fit in the free host memory (%.1f GB); using %d",
                        opts.tile_size, free / 1e9, fits,
                    )  # fmt: skip
                    tile = fits
            if traits.tiling == "internal":
                logger.info("upscale: %s tiles internally, tile_size %d ignored", traits.arch, opts.tile_size)
                tile = 0
        else:
            elem = torch.tensor([], dtype=self.dtype).element_size()
            tile = choose_tile(
                height, width, traits, elem, self.free_bytes(), opts.optimization_level, batch, reserved=reserved
            )
        overlap = opts.overlap if opts.overlap > 0 else auto_overlap(traits)
        plan = plan_tiles(height, width, traits, tile, overlap)
        if opts.overlap > 0 and len(plan.tiles) > 1 and plan.overlap < opts.overlap:
            logger.warning(
                "upscale: overlap %d is more than half of the %dx%d tile; using %d",
                opts.overlap, plan.tile_w, plan.tile_h, plan.overlap,
            )  # fmt: skip
        return plan

    # -- main entry ---------------------------------------------------------------------
    def upscale(
        self,
        images: torch.Tensor,
        out_device: torch.device | str = "cpu",
        out_dtype: torch.dtype = torch.float32,
        progress: Callable[[int, int], None] | None = None,
        check_cancel: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, RunReport]:
        """Upscale a ``[B, H, W, C]`` float batch in [0, 1]; returns ``([B, sH, sW, C], report)``.

        ``progress(done, total)`` is called after each model call, ``check_cancel()``
        before each (raise from it to stop; nothing is left on the GPU).
        """
        self._check_images(images)
        b, h, w, _c = images.shape
        s = self.traits.scale
        report = RunReport(
            arch=self.traits.arch,
            device=str(self.device),
            precision=dtype_name(self.dtype),
            backend=self.backend,
            backend_reason=self.backend_reason,
            frames=b,
            in_size=(h, w),
            out_size=(h * s, w * s),
        )
        self._check_output_fits(b, h * s, w * s, out_dtype, out_device)
        # Plain memory, filled while the GPU works (see host_io); never pinned for the caller.
        out = torch.empty((b, h * s, w * s, self.traits.out_channels), dtype=out_dtype, device=out_device)
        start = time.perf_counter()
        stopped: list[float] = []  # when check_cancel raised, to report how long stopping took
        if check_cancel is not None:
            user_check = check_cancel

            def check_cancel() -> None:
                try:
                    user_check()
                except BaseException:
                    stopped.append(time.perf_counter())
                    raise

        self._check_cancel = check_cancel
        try:
            with self._numerics():
                self._run(images, out, report, progress, check_cancel)
        finally:
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            self._check_cancel = None
            # Leave the GPU to the next node: our copies go back to the CPU, except this run's
            # own copies when the caller asked to keep them loaded.
            used = [m for m in self._ready.values() if isinstance(m, torch.nn.Module)]
            self._ready.clear()
            if stopped and self.device.type == "cuda":
                # a cancelled run keeps nothing loaded, and the Cancel must not wait for the queued GPU work
                self.cache.offload_in_background()
            else:
                self.cache.offload(keep=used if self.options.keep_loaded else ())
            if stopped:
                logger.info(
                    "upscale: cancelled after %d of %d frames; stopping took %.2f s (GPU work already queued)",
                    self._done,
                    b,
                    time.perf_counter() - stopped[0],
                )
        report.seconds = time.perf_counter() - start
        logger.info("upscale: %s", report.text().replace("\n", "; "))
        return out, report

    @contextlib.contextmanager
    def _numerics(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.device.type == "cuda":
                # Scoped, not global: autotuned cuDNN algorithms for our (few) shapes.
                stack.enter_context(
                    torch.backends.cudnn.flags(
                        enabled=True,
                        benchmark=self.options.cudnn_benchmark,
                        deterministic=torch.backends.cudnn.deterministic,
                        allow_tf32=torch.backends.cudnn.allow_tf32,
                    )
                )
                stack.enter_context(torch.cuda.device(self.device))
            if self.backend.startswith("compiled"):
                stack.enter_context(inductor_cache_dir(self.cache.cache_dir))
            yield

    def _check_output_fits(self, b: int, oh: int, ow: int, dtype: torch.dtype, out_device) -> None:
        """Refuse an output batch the host cannot hold (the OS would kill the process mid-run)."""
        if torch.device(out_device).type != "cpu":
            return
        need = b * oh * ow * self.traits.out_channels * torch.tensor([], dtype=dtype).element_size()
        avail = host_available_bytes()
        if need > avail:
            raise ValueError(
                f"image: {b} frame(s) upscaled to {ow}x{oh} need {need / 1e9:.1f} GB of host memory for the "
                f"output, but only {avail / 1e9:.1f} GB are available; upscale fewer frames per run (split the "
                "batch, e.g. with 'Image From Batch') or close other programs"
            )

    def _check_images(self, images: torch.Tensor) -> None:
        # NaN/Inf are checked per frame while streaming, so the error can name the frame.
        check_image(images, "image", channels=(self.traits.in_channels,), finite=False)

    def _run(self, images, out, report: RunReport, progress, check_cancel) -> None:
        b, h, w, _ = images.shape
        reserved = self.reserved_bytes(out)
        plan = self.plan(h, w, reserved=reserved)
        batch = self._batch_for(plan, b, reserved=reserved)
        transfer = self.dtype if self.dtype is not torch.float32 else torch.float32
        writer = FrameWriter(out, self.device, transfer_dtype=transfer)
        reader = ChunkReader(images, self.device, self._to_model_input)
        writer.prepare(0, batch if plan.whole else 1)
        self._done = 0  # frames finished; an out-of-memory retry resumes here
        gpu_done = None
        try:
            while self._done < b:
                oom: BaseException | None = None
                try:
                    self._frames(images, plan, batch, self._done, reader, writer, report, progress, check_cancel)
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    # Drop the traceback: its frames hold the failed call's activations, which
                    # must be freed before retrying with a smaller tile.
                    oom = exc.with_traceback(None)
                if oom is not None:
                    plan, batch = self._shrink(plan, batch, oom)
                    report.oom_retries += 1
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
                gpu_done = time.perf_counter()
        finally:
            writer.close()
        if gpu_done is not None:
            report.copy_tail_s = time.perf_counter() - gpu_done
        report.tile = (
            "whole frame" if plan.whole else f"{len(plan.tiles)} of {plan.tile_w}x{plan.tile_h}, overlap {plan.overlap}"
        )
        report.batch = batch

    def _batch_for(self, plan: TilePlan, frames: int, reserved: int = 0) -> int:
        """Frames or tiles per call: the option, or automatic; never more than fit in memory."""
        per_call = plan.tile_h * plan.tile_w
        items = frames if plan.whole else len(plan.tiles)
        batch = choose_batch(per_call, self.options.optimization_level, self.options.batch_size, items)
        fit = self._fitting_batch(plan, reserved)
        if batch > fit:
            if self.options.batch_size > 0:
                logger.warning(
                    "upscale: batch_size %d does not fit in the free %s memory (%.1f GB); using %d",
                    self.options.batch_size, self.device.type, self.free_bytes() / 1e9, fit,
                )  # fmt: skip
            batch = fit
        return batch

    def working_set(self, plan: TilePlan, batch: int, reserved: int = 0) -> int:
        """Estimated peak bytes on the compute device of a run cut by ``plan`` with ``batch`` items per
        call: ``reserved`` + the frame's fp32 accumulators (tiled runs) + the calls' activations."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        per_item = (plan.tile_h + plan.pad_h) * (plan.tile_w + plan.pad_w) * bytes_per_pixel(self.traits, elem)
        acc = 0 if plan.whole else plan.height * plan.width * 4 * (self.traits.out_channels + 1) * self.traits.scale**2
        return int(reserved + acc + batch * per_item)

    def _fitting_batch(self, plan: TilePlan, reserved: int = 0) -> int:
        """Most tiles/frames per call whose :meth:`working_set` fits the level's share of free memory.

        On the CPU this is what keeps the process alive: an allocation there that exceeds the
        machine's memory gets the process killed by the OS instead of raising an error.
        """
        budget = self.free_bytes() * MEMORY_SHARE[self.options.optimization_level]
        fixed = self.working_set(plan, 0, reserved)
        per_item = self.working_set(plan, 1) - self.working_set(plan, 0)
        return max(1, int((budget - fixed) // per_item))

    def _shrink(self, plan: TilePlan, batch: int, exc: BaseException) -> tuple[TilePlan, int]:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if batch > 1:
            logger.warning("upscale: out of memory with batch %d, retrying with batch 1", batch)
            return plan, 1
        current = max(plan.tile_h, plan.tile_w)
        new_tile = align_tile(current // 2, self.traits)
        if new_tile >= current:  # already at the smallest tile the model accepts
            raise exc
        logger.warning("upscale: out of memory with %d px tiles, retrying with %d px tiles", current, new_tile)
        overlap = self.options.overlap if self.options.overlap > 0 else auto_overlap(self.traits)
        return plan_tiles(plan.height, plan.width, self.traits, new_tile, overlap), 1

    def _to_model_input(self, frames: torch.Tensor) -> torch.Tensor:
        """``[n,H,W,C]`` device frames -> ``[n,C,H,W]`` in compute dtype and layout."""
        x = frames.permute(0, 3, 1, 2).to(self.dtype)
        if self.device.type == "cuda":
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    # -- frame loop ---------------------------------------------------------------------
    def _frames(self, images, plan, batch, start, reader, writer, report, progress, check_cancel) -> None:
        """Process frames from ``start`` to the end, counting finished ones in ``self._done``."""
        b = images.shape[0]
        s = self.traits.scale
        if plan.whole:
            # Each batch is checked for NaN/overflow (a host sync) only after the next batch
            # has been queued, so the GPU never waits for the host between batches.
            pending: tuple | None = None
            i = start
            try:
                while i < b:
                    if check_cancel is not None:
                        check_cancel()
                    j = min(i + batch, b)
                    nxt = (j, min(j + batch, b)) if j < b else None
                    x = reader.get(i, j, prefetch=nxt)
                    try:
                        launched = (i, j, x, *self._launch(x, plan, batch))
                    except Exception as exc:
                        if pending is not None and is_oom_error(exc):
                            # the batch before finished: keep it, the retry resumes after it; any
                            # other error (Cancel) must not wait for that batch's GPU work first
                            done, pending = pending, None
                            self._complete(done, plan, report, writer, progress, b)
                        raise
                    if pending is not None:
                        self._complete(pending, plan, report, writer, progress, b)
                    pending, i = launched, j
                if pending is not None:
                    self._complete(pending, plan, report, writer, progress, b)
                    pending = None
            finally:
                pending = None  # an error drops the unwritten batch; a retry resumes at self._done
            return
        n_tiles = len(plan.tiles)
        total = b * n_tiles
        for f in range(start, b):
            x = reader.get(f, f + 1, prefetch=(f + 1, f + 2) if f + 1 < b else None)[0]
            acc = torch.zeros(
                (self.traits.out_channels, plan.height * s, plan.width * s), device=self.device, dtype=torch.float32
            )
            wsum = torch.zeros((1, plan.height * s, plan.width * s), device=self.device, dtype=torch.float32)
            for k in range(0, n_tiles, batch):
                if check_cancel is not None:
                    check_cancel()
                group = plan.tiles[k : k + batch]
                crops = torch.stack([x[:, t.y0 : t.y1, t.x0 : t.x1] for t in group])
                if self.device.type == "cuda":
                    crops = crops.contiguous(memory_format=torch.channels_last)
                y = self._model_call(crops, plan, report, index=f, batch=batch)
                for t, yt in zip(group, y, strict=True):
                    wt = tile_weights(plan, t, s, device=self.device)
                    ys, xs = slice(t.y0 * s, t.y1 * s), slice(t.x0 * s, t.x1 * s)
                    acc[:, ys, xs].addcmul_(yt.float(), wt)
                    wsum[:, ys, xs].add_(wt)
                if progress is not None:
                    progress(f * n_tiles + min(k + batch, n_tiles), total)
            frame = acc.div_(wsum).permute(1, 2, 0).unsqueeze(0)
            writer.put(f, frame)
            self._done = f + 1

    def _launch(self, x: torch.Tensor, plan: TilePlan, batch: int) -> tuple:
        """Pad and queue one model call; returns ``(xp, y, bad, flags)`` without waiting for the GPU."""
        n = x.shape[0]
        if n < batch and self.backend.startswith("compiled"):
            # A short last batch would be a new shape (a recompile): repeat the last item.
            x = torch.cat([x, x[-1:].expand(batch - n, -1, -1, -1)])
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
        xp = _pad(x, plan.pad_h, plan.pad_w)
        y = self._forward(xp, self.dtype)
        bad = ~torch.isfinite(y).flatten(1).all(dim=1)
        flags = torch.stack([~torch.isfinite(x).all(), bad.any()])
        return xp, y, bad, flags

    def _complete(self, launched: tuple, plan: TilePlan, report: RunReport, writer, progress, total: int) -> None:
        """Check, finish and hand to the writer a batch of whole frames queued by :meth:`_launch`."""
        i, j, x, xp, y, bad, flags = launched
        y = self._finish(x, xp, y, bad, flags, report, index=i)
        writer.put(i, y.permute(0, 2, 3, 1))
        self._done = j
        if progress is not None:
            progress(j, total)

    def _model_call(
        self, x: torch.Tensor, plan: TilePlan, report: RunReport, index: int, batch: int = 1
    ) -> torch.Tensor:
        """Pad, run, check for overflow, clamp and crop one batch of tiles/frames."""
        return self._finish(x, *self._launch(x, plan, batch), report, index=index)

    def _finish(self, x, xp, y, bad, flags, report: RunReport, index: int) -> torch.Tensor:
        """Wait for one call's checks (one host sync), redo overflowed items, clamp and crop."""
        n = x.shape[0]
        h, w = x.shape[-2:]
        bad_in, any_bad = flags.tolist()
        if bad_in:
            raise ValueError(
                f"image: frame {index} holds NaN or Inf values; the node that produced it overflowed - "
                "fix that node or run it in fp32"
            )
        if any_bad:
            y = self._redo_overflow(xp, y, bad, report, index)
        s = self.traits.scale
        return y[:n].clamp_(0.0, 1.0)[..., : h * s, : w * s]

    def _redo_overflow(self, xp, y, bad, report: RunReport, index: int) -> torch.Tensor:
        safe = self._safe_dtype()
        if safe is None:
            logger.warning("upscale: the model produced NaN/Inf in fp32 at frame %d; those pixels clamp to 0/1", index)
            return torch.nan_to_num(y, nan=0.0, posinf=1.0, neginf=0.0)
        idx = bad.nonzero().flatten()
        logger.warning(
            "upscale: %s overflowed in %s at frame %d (%d tile(s)); redoing them in %s",
            self.traits.arch,
            dtype_name(self.dtype),
            index,
            len(idx),
            dtype_name(safe),
        )
        redo = self._forward(xp[idx].to(safe), safe, eager=True)
        # A finite result that is too large for fp16 becomes +-inf here, which the clamp
        # that follows maps to the same 1/0 the finite value would give.
        y[idx] = redo.to(y.dtype)
        report.redone_tiles += len(idx)
        return y

    def _safe_dtype(self) -> torch.dtype | None:
        if self.dtype is torch.float16:
            if self.descriptor.supports_bfloat16 and (self.device.type != "cuda" or torch.cuda.is_bf16_supported()):
                return torch.bfloat16
            return torch.float32
        if self.dtype is torch.bfloat16:
            return torch.float32
        return None

    def _forward(self, x: torch.Tensor, dtype: torch.dtype, eager: bool = False) -> torch.Tensor:
        module = self._module(dtype)
        if eager or dtype is not self.dtype or not self.backend.startswith("compiled"):
            return self._call(module, x, dtype)
        key, transform = self._variant(dtype)
        fn = self.cache.compiled(
            self.descriptor.model, key, dtype, tuple(x.shape), self.options.compile_mode, transform
        )
        if fn is None:
            return self._call(module, x, dtype)
        if ("compiled", x.shape) not in self._ready:
            self._place(fn)  # regional mode compiles a second copy, which must move too
            self._ready[("compiled", x.shape)] = fn
        try:
            return self._call(fn, x, dtype)
        except Exception as exc:
            if is_oom_error(exc) or isinstance(exc, ValueError):
                raise
            reason = error_line(exc)
            logger.warning("upscale: torch.compile failed (%s); falling back to eager for this model", reason)
            self.cache.mark_compile_failed(key, dtype, reason)
            self.backend, self.backend_reason = "eager", f"compile failed: {reason}"
            return self._call(module, x, dtype)

    def _call(self, fn: Callable, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One model call in ``dtype``; under autocast where the architecture needs it.

        Some transformer ports (SwinIR, Swin2SR, DRCT, ATD in spandrel) build their attention
        mask in fp32 when the input size differs from their training size, so with bf16
        weights ``attn @ v`` meets a float32 operand and fails. Autocast casts such operands
        to the compute dtype (a no-op for the weights, which already are). It is used from the
        start for architectures that cannot run fp16 (the attention families), and switched on
        for the rest of the run when another architecture fails the same way.
        """
        if dtype is torch.float32:
            return self._call_fn(fn, x)
        if self._fp32_fallback:
            return self._call_fn(self._module(torch.float32), x.float()).to(dtype)
        if self._mixed:
            try:
                with torch.autocast(self.device.type, dtype=dtype):
                    return self._call_fn(fn, x)
            except RuntimeError as exc:
                if not _is_dtype_mismatch(exc):
                    raise
                # Some ports still meet an op autocast does not cover (ATD on CUDA in bf16):
                # a correct fp32 result beats a failed run.
                logger.warning(
                    "upscale: %s cannot run in %s even under autocast (%s); running it in fp32",
                    self.traits.arch,
                    dtype_name(dtype),
                    str(exc).splitlines()[0],
                )
                self._fp32_fallback = True
                return self._call_fn(self._module(torch.float32), x.float()).to(dtype)
        try:
            return self._call_fn(fn, x)
        except RuntimeError as exc:
            if not _is_dtype_mismatch(exc):
                raise
            logger.warning(
                "upscale: %s mixes dtypes inside (%s); running it under autocast %s",
                self.traits.arch,
                str(exc).splitlines()[0],
                dtype_name(dtype),
            )
            self._mixed = True
            with torch.autocast(self.device.type, dtype=dtype):
                return self._call_fn(fn, x)


def _is_dtype_mismatch(exc: BaseException) -> bool:
    text = str(exc)
    lower = text.lower()
    return (
        "same dtype" in text
        or "scalar type" in text
        or "dtype mismatch" in lower
        or ("expected" in lower and "to have type" in lower)
    )
