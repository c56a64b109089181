"""Pure-torch helpers shared by every SpeedKit subpackage.

Nothing here imports ComfyUI: these functions take and return plain tensors so the
logic of every capability can be tested on a machine without ComfyUI or a GPU.

Conventions:
- ComfyUI's IMAGE layout is BHWC float in [0, 1]; models want BCHW. Use
  :func:`bhwc_to_bchw` / :func:`bchw_to_bhwc` rather than ad-hoc ``movedim`` calls.
- Tiling math (tile origins, feather masks) lives here so the upscaler and the
  tiled img2img code agree on what "overlap" means.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger(__name__)

NORMALIZE_MODES: tuple[str, ...] = ("minmax", "minmax per image", "percentile", "off")
"""Image range normalisation modes, in the order nodes show them (first = default)."""


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------


def bhwc_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B,H,W,C]`` -> model layout ``[B,C,H,W]`` (a view, no copy)."""
    if image.ndim != 4:
        raise ValueError(f"expected a 4-D [B,H,W,C] image, got shape {tuple(image.shape)}")
    return image.permute(0, 3, 1, 2)


def bchw_to_bhwc(image: torch.Tensor) -> torch.Tensor:
    """Model layout ``[B,C,H,W]`` -> ComfyUI IMAGE ``[B,H,W,C]`` (a view, no copy)."""
    if image.ndim != 4:
        raise ValueError(f"expected a 4-D [B,C,H,W] image, got shape {tuple(image.shape)}")
    return image.permute(0, 2, 3, 1)


def check_image(
    image: torch.Tensor, name: str = "image", channels: Sequence[int] | None = None, finite: bool = True
) -> None:
    """Validate a ComfyUI IMAGE: a floating ``[B,H,W,C]`` tensor, optionally with given channel
    counts, and (when ``finite``) no NaN/Inf values.

    Raises ``ValueError`` naming the input, what was wrong and how to fix it.
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name}: expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim != 4:
        raise ValueError(
            f"{name}: expected a [batch, height, width, channels] IMAGE, got shape {tuple(image.shape)}; "
            "connect an IMAGE output (e.g. Load Image), not a MASK or LATENT"
        )
    if not image.dtype.is_floating_point:
        raise ValueError(f"{name}: expected float values in [0, 1], got dtype {image.dtype}; convert with /255")
    if channels is not None and image.shape[-1] not in channels:
        fix = "drop the alpha channel first" if image.shape[-1] == 4 else "convert the image to RGB first"
        raise ValueError(
            f"{name}: expected {' or '.join(map(str, channels))}-channel images, got {image.shape[-1]} channels "
            f"(shape {tuple(image.shape)}); {fix}"
        )
    if image.numel() == 0:
        raise ValueError(f"{name}: the batch is empty (shape {tuple(image.shape)})")
    if finite:
        check_finite(image, name)


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or Inf (one host sync)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name}: {bad} value(s) are NaN or Inf; the node that produced this input "
            "overflowed (often fp16 without autocast) - fix that node or run it in fp32"
        )


# ---------------------------------------------------------------------------
# Value range normalisation
# ---------------------------------------------------------------------------


def _stretch(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = hi - lo
    # A constant image has no range to stretch: map it to 0 instead of dividing by 0.
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (t - lo) / safe, torch.zeros_like(t))
    return out.clamp_(0.0, 1.0)


def _kth_value(flat: torch.Tensor, fraction: float) -> torch.Tensor:
    """Value at ``fraction`` (0..1) of the sorted data, with linear interpolation.

    ``torch.quantile`` refuses inputs above 2**24 elements (a single 4K frame has more),
    so use ``kthvalue`` on the two neighbouring ranks instead.
    """
    n = flat.numel()
    pos = fraction * (n - 1)
    lo_rank = int(math.floor(pos))
    hi_rank = min(lo_rank + 1, n - 1)
    lo_val = flat.kthvalue(lo_rank + 1).values
    if hi_rank == lo_rank:
        return lo_val
    hi_val = flat.kthvalue(hi_rank + 1).values
    return lo_val + (hi_val - lo_val) * (pos - lo_rank)


def normalize_range(
    image: torch.Tensor,
    mode: str = "minmax",
    low_percentile: float = 0.5,
    high_percentile: float = 99.5,
    name: str = "image",
) -> torch.Tensor:
    """Stretch an image batch's values to [0, 1].

    Modes:
    - ``minmax``: one min/max over the whole batch (the Nunchaku fix: a batch or video
      keeps consistent brightness across frames).
    - ``minmax per image``: each image stretched on its own.
    - ``percentile``: the batch's ``low_percentile``/``high_percentile`` values map to 0/1,
      so a single outlier pixel cannot defeat the stretch; values beyond are clamped.
    - ``off``: values are only converted to contiguous fp32, not changed.

    Constant images map to 0. NaN/Inf raise ``ValueError``. Returns fp32, contiguous,
    on the input's device. Works for any layout; statistics are over all non-batch dims.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize mode: unknown value {mode!r}; choose one of {', '.join(NORMALIZE_MODES)}")
    if image.ndim < 2:
        raise ValueError(f"{name}: expected a batch of images, got shape {tuple(image.shape)}")
    check_finite(image, name)
    t = image.to(torch.float32)
    if mode == "off":
        return t.contiguous()
    if mode == "minmax":
        return _stretch(t, t.amin(), t.amax()).contiguous()
    if mode == "minmax per image":
        dims = tuple(range(1, t.ndim))
        return _stretch(t, t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)).contiguous()
    for label, value in (("low_percentile", low_percentile), ("high_percentile", high_percentile)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 100.0):
            raise ValueError(f"{label}: {value!r} must be a number from 0 to 100; typical values are 0.5 and 99.5")
    if not low_percentile < high_percentile:
        raise ValueError(
            f"low_percentile / high_percentile: low ({low_percentile}) must be below high ({high_percentile}); "
            "typical values are 0.5 and 99.5"
        )
    flat = t.reshape(-1)
    lo = _kth_value(flat, low_percentile / 100.0)
    hi = _kth_value(flat, high_percentile / 100.0)
    return _stretch(t, lo, hi).contiguous()


# ---------------------------------------------------------------------------
# Device, dtype, memory
# ---------------------------------------------------------------------------


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``requested`` if given, else CUDA when present, else CPU."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(
    requested: str,
    device: torch.device,
    supports_half: bool = True,
    supports_bfloat16: bool = True,
) -> torch.dtype:
    """Resolve a precision choice (``auto``/``fp16``/``bf16``/``fp32``) for a model.

    ``auto`` prefers fp16 on CUDA when the architecture supports it (fastest on every
    NVIDIA GPU), then bf16 when the GPU has it, else fp32; on CPU it is fp32. An explicit
    choice the architecture cannot run raises ``ValueError`` instead of silently
    producing black or NaN images.
    """
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32
        if supports_half:
            return torch.float16
        if supports_bfloat16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in _DTYPES:
        raise ValueError(f"precision: unknown value {requested!r}; choose auto, fp16, bf16 or fp32")
    dtype = _DTYPES[requested]
    if dtype is torch.float16 and not supports_half:
        raise ValueError("precision: this architecture does not support fp16 (it overflows); use auto, bf16 or fp32")
    if dtype is torch.bfloat16 and not supports_bfloat16:
        raise ValueError("precision: this architecture does not support bf16; use auto or fp32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Short name used in logs and reports: fp32 / fp16 / bf16 (else torch's name)."""
    for name, value in _DTYPES.items():
        if value is dtype:
            return name
    return str(dtype).removeprefix("torch.")


def free_memory_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``.

    On CUDA this is the driver's free memory plus what PyTorch's caching allocator holds
    but does not use (it can hand that out again without asking the driver). On the CPU it
    is the memory the OS reports as available (a plan that exceeds it gets the process
    killed, not an exception), or 8 GiB where the OS does not say.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        allocated = torch.cuda.memory_allocated(device)
        return int(free + max(reserved - allocated, 0))
    return host_available_bytes()


def host_available_bytes() -> int:
    """Host memory the OS can still hand out without swapping (``MemAvailable``), or 8 GiB
    where it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported here: try /proc
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def is_oom_error(exc: BaseException) -> bool:
    """True for CUDA / allocator out-of-memory errors, which tiling can recover from."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------
# Tiling math
# ---------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap``.

    Every tile has exactly ``tile`` pixels (the last one is shifted back to end at
    ``length`` rather than being cut short) so that all tiles share one shape, which
    lets a compiled model run every tile without recompiling. If ``tile >= length``
    there is a single tile at 0 (the caller pads it).
    """
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile size {tile}), got {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    # Spread tiles evenly so the overlap is shared rather than piled onto the last tile;
    # the spacing (length - tile) / (count - 1) never exceeds the stride, so every overlap
    # is at least the one asked for.
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class Tile:
    """One tile of a 2-D grid: pixel box ``[y0:y0+h, x0:x0+w]``."""

    y0: int
    x0: int
    h: int
    w: int

    @property
    def y1(self) -> int:
        return self.y0 + self.h

    @property
    def x1(self) -> int:
        return self.x0 + self.w


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles of ``min(tile, size)`` pixels covering a ``height x width`` image."""
    th, tw = min(tile, height), min(tile, width)
    ys = tile_starts(height, th, min(overlap, th - 1))
    xs = tile_starts(width, tw, min(overlap, tw - 1))
    return [Tile(y, x, th, tw) for y in ys for x in xs]


def feather_ramp(size: int, ramp_start: int, ramp_end: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """1-D blend weights of length ``size``: rising over the first ``ramp_start`` pixels,
    falling over the last ``ramp_end`` pixels, 1 in between.

    Weights stay strictly positive so a pixel covered by one tile only keeps weight > 0.
    """
    w = torch.ones(size, device=device, dtype=dtype)
    if ramp_start > 0:
        n = min(ramp_start, size)
        w[:n] = torch.minimum(w[:n], (torch.arange(n, device=device, dtype=dtype) + 0.5) / ramp_start)
    if ramp_end > 0:
        n = min(ramp_end, size)
        ramp = (torch.arange(n, device=device, dtype=dtype) + 0.5) / ramp_end
        w[size - n :] = torch.minimum(w[size - n :], ramp.flip(0))
    return w


def feather_mask(tile: Tile, height: int, width: int, overlap: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[h, w]`` weights for ``tile`` in a ``height x width`` grid: feathered over
    ``overlap`` pixels on sides that touch another tile, flat on image borders."""
    ry0 = overlap if tile.y0 > 0 else 0
    ry1 = overlap if tile.y1 < height else 0
    rx0 = overlap if tile.x0 > 0 else 0
    rx1 = overlap if tile.x1 < width else 0
    wy = feather_ramp(tile.h, ry0, ry1, device=device, dtype=dtype)
    wx = feather_ramp(tile.w, rx0, rx1, device=device, dtype=dtype)
    return wy[:, None] * wx[None, :]


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    if multiple <= 1:
        return value
    return -(-value // multiple) * multiple


def pad_to_multiple(image: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, int, int]:
    """Pad a ``[B,C,H,W]`` tensor on the bottom/right to multiples of ``multiple``.

    Returns the padded tensor and the pad added to H and W. Reflect padding (falling back
    to replicate for inputs too small to reflect) avoids the dark borders zero padding
    gives a super-resolution model.
    """
    h, w = image.shape[-2:]
    ph, pw = round_up(h, multiple) - h, round_up(w, multiple) - w
    if ph == 0 and pw == 0:
        return image, 0, 0
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    return torch.nn.functional.pad(image, (0, pw, 0, ph), mode=mode), ph, pw


GRAPHS_WITH_MALLOC_ASYNC_ENV = "SPEEDKIT_GRAPHS_WITH_MALLOC_ASYNC"
"""Maintainers' switch (``1``): let every book record CUDA graphs under cudaMallocAsync (by
default only ``forward_only`` books do: USDU's, not the trainer's), to check on a GPU
(``benchmarks/cuda_graph_allocator_probe.py``, the graphed-vs-eager tests) whether a torch and
driver combination records safely there. Never set by the pack."""


def malloc_async_active() -> bool:
    """True when PyTorch allocates with cudaMallocAsync (ComfyUI's default on NVIDIA)."""
    try:
        return torch.cuda.get_allocator_backend() == "cudaMallocAsync"
    except Exception:  # noqa: BLE001 - a torch without CUDA support: nothing to record anyway
        return False


def graph_capture_blocker(forward_only: bool = False) -> str | None:
    """Why CUDA graphs must not be recorded in this process, or None.

    Under PyTorch's cudaMallocAsync allocator (ComfyUI's default on NVIDIA) a capture that
    fails ends in a C++ ``terminate`` that aborts the whole process, which no Python handler
    can catch (``benchmarks/cuda_graph_allocator_results_h200.json``: every failed-capture
    pattern aborts, whether the failed graph is kept alive, captured in relaxed mode or under
    inference mode: the allocator frees the capture's memory from tensor destructors, which
    cannot raise). So a capture there must not be able to fail:

    - ``forward_only`` books (USDU's denoiser calls: inference, one fixed code path per input
      layout) record there, after a checked run of the very call they record that refuses
      host syncs and calls only PyTorch's own operators (:func:`checked_run`): what fails a
      capture is found in Python before recording starts (the USDU adapter also records only
      models made of ComfyUI's and PyTorch's own layers there). In a ComfyUI server with its
      defaults the GPU tier records and replays SDXL calls this way;
    - other books (the LoRA trainer's micro-steps: autograd, optimizer state, more ways to
      fail) do not record there; the trainer runs them in a worker process instead.

    (The "invalid argument" once seen in a server under this allocator was USDU reading a
    graph's output before its first replay, when cudaMallocAsync has not mapped the graph's
    memory yet; fixed, and tested in ``tests/unit/test_usdu_graphs.py``.)
    """
    if forward_only or os.environ.get(GRAPHS_WITH_MALLOC_ASYNC_ENV) == "1":
        return None
    if malloc_async_active():
        return (
            "the cudaMallocAsync allocator is active (ComfyUI's default on NVIDIA; start ComfyUI with "
            "--disable-cuda-malloc to allow CUDA graphs)"
        )
    return None


PYTORCH_OP_NAMESPACES = frozenset({"aten", "prims"})
"""Operator namespaces of PyTorch itself: what a checked run under cudaMallocAsync may call."""


class _OpAudit(TorchDispatchMode):
    """Notes every operator outside :data:`PYTORCH_OP_NAMESPACES` that runs in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.foreign: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace = getattr(func, "namespace", "aten")
        if namespace not in PYTORCH_OP_NAMESPACES and str(func) not in self.foreign:
            self.foreign.append(str(func))
        return func(*args, **(kwargs or {}))


def checked_run(fn: Callable[[], Any], pytorch_ops_only: bool = False) -> Any:
    """Run ``fn`` with host syncs refused (and, with ``pytorch_ops_only``, under inference or
    no-grad and calling only PyTorch's own operators); raise ``RuntimeError`` naming what
    would make a capture of the same call fail, else return its output.

    Other libraries' operators (xformers, custom CUDA kernels, quantized-weight kernels) may
    allocate, synchronize or launch in ways the sync check cannot see; under cudaMallocAsync a
    capture they break would abort the process, so there such a call is not recorded.
    """
    if not pytorch_ops_only:
        with refuse_host_syncs():
            return fn()
    if torch.is_grad_enabled():
        raise RuntimeError("the call runs with autograd on; only inference calls are recorded under cudaMallocAsync")
    audit = _OpAudit()
    with refuse_host_syncs(), audit:
        out = fn()
    if audit.foreign:
        raise RuntimeError(
            f"the call runs operators from outside PyTorch ({', '.join(audit.foreign[:3])}), which are not "
            "recorded under cudaMallocAsync"
        )
    return out


@contextmanager
def refuse_host_syncs() -> Iterator[None]:
    """Make synchronizing CUDA operations raise for the duration of the block.

    Used for the checked run before a CUDA-graph capture. The setting is PyTorch's
    process-wide sync debug mode; it is restored on exit, even when the block raises. Without
    CUDA there is nothing to refuse (and asking would initialise CUDA): the block just runs.
    """
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    _set_sync_debug_mode("error")
    try:
        yield
    finally:
        _set_sync_debug_mode(previous)


def _set_sync_debug_mode(mode: str | int) -> None:
    """``torch.cuda.set_sync_debug_mode`` without its "prototype feature" UserWarning, which
    would otherwise reach the server's console on every checked run (the filter lasts only
    for this call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype feature")
        torch.cuda.set_sync_debug_mode(mode)


def error_line(exc: BaseException, limit: int | None = None) -> str:
    """``"<ExceptionType>: <first line of its message>"`` (the message cut to ``limit`` characters),
    for the one log line a fast path writes when it falls back."""
    text = str(exc).strip()
    first = text.splitlines()[0][:limit] if text else ""
    return f"{type(exc).__name__}: {first}"


def capture_failure(exc: BaseException) -> str:
    """One line for a failed CUDA-graph capture: the error and the last two Python lines that
    ran (what to look at when the error only says "a previous error during capture", i.e. code
    outside PyTorch broke the capture and the next PyTorch call reports it)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{Path(code.co_filename).name}:{tb.tb_lineno} {code.co_name}")
        tb = tb.tb_next
    return f"capture failed ({error_line(exc, 160)}; at {' <- '.join(reversed(frames[-2:]))})"


@contextmanager
def collector_paused() -> Iterator[None]:
    """Keep Python's cyclic garbage collector from running inside the block (restored after).

    A CUDA memory pool freed while any pool is in use (a checked run's ``use_mem_pool``, a
    recording) trips an internal assert of PyTorch's caching allocator, which aborts the
    process. An earlier run's graph book left in a reference cycle is freed by the collector
    at whatever allocation triggers it; inside these windows that would be fatal. A full
    collection before each recording (what ``torch.cuda.graph`` once did) would walk every live
    object of the server each time; pausing costs nothing, and what is pending is collected
    after the block.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class GraphBook:
    """Bookkeeping shared by the CUDA-graph replayers (USDU's denoiser calls, the LoRA
    trainer's micro-steps): graphs per input key, keys seen once, one memory pool, a cap, the
    storage addresses of the weights the graphs read, and the switch that sends the rest of
    a run back to eager execution.

    A key is recorded only the second time it occurs (:meth:`wants_capture`), so one-off
    shapes cost no recording. Subclasses do the recording and replaying.
    """

    def __init__(
        self, weights: Callable[[], Iterable[torch.Tensor]], max_graphs: int, label: str, forward_only: bool = False
    ) -> None:
        self._weights = weights
        self.forward_only = forward_only
        self.max_graphs = max_graphs
        self.label = label
        self._graphs: dict[Hashable, object] = {}
        self._seen: set[Hashable] = set()
        self._pool: torch.cuda.MemPool | tuple[int, int] | None = None
        self._stream: torch.cuda.Stream | None = None
        self.disabled: str | None = None
        self.captures = 0
        self.replays = 0

    def weight_ptrs(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self._weights())

    def pool(self) -> torch.cuda.MemPool | tuple[int, int]:
        """The memory pool every graph of this book records into (and its checked runs run in);
        a plain graph pool handle where the allocator has no ``MemPool`` (cudaMallocAsync)."""
        if self._pool is None:
            try:
                self._pool = torch.cuda.MemPool()
            except Exception as exc:  # noqa: BLE001 - only the checked run's placement is lost
                logger.debug("%s: no MemPool (%s); checked runs use the default pool", self.label, exc)
                self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def stream(self) -> torch.cuda.Stream:
        """The stream every checked run and recording of this book runs on."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(torch.cuda.current_device())
        return self._stream

    def wants_capture(self, key: Hashable) -> bool:
        """True when ``key`` occurred before, graphs are on and the cap is not reached (marks it seen)."""
        seen = key in self._seen
        self._seen.add(key)
        if seen and self.disabled is None and (reason := graph_capture_blocker(self.forward_only)) is not None:
            self.disable(reason)
        return seen and self.disabled is None and len(self._graphs) < self.max_graphs

    def record(self, graph: torch.cuda.CUDAGraph, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once with host syncs refused (:func:`checked_run`), then record it into
        ``graph``; returns the recorded call's output.

        The checked run finds the usual cause of a failed capture (``.item()``, a blocking
        copy, ``nonzero``...) in Python, before recording starts, and doubles as the warm-up.
        Under cudaMallocAsync (only ``forward_only`` books record there) it also refuses calls
        with autograd on or with operators from outside PyTorch. It runs in the book's memory
        pool on the stream the recording uses, so the recording finds the memory it needs
        already reserved there and asks the driver for none: with ComfyUI's dynamic VRAM on,
        device allocations go through comfy-aimdo's hooks, and a recording that allocated
        through them has failed ("operation failed due to a previous error during capture")
        where the same recording without them succeeds. The capture is thread-local, so
        another thread of the server touching CUDA cannot invalidate it.
        """
        current = torch.cuda.current_stream()
        side = self.stream()
        side.wait_stream(current)
        pool = self.pool()
        shared = isinstance(pool, torch.cuda.MemPool)
        strict = malloc_async_active()
        with collector_paused():
            with torch.cuda.stream(side), torch.cuda.use_mem_pool(pool) if shared else nullcontext():
                checked_run(fn, pytorch_ops_only=strict)  # lazy initialisations happen here, outside the capture
            current.wait_stream(side)
            with torch.cuda.graph(
                graph, pool=pool.id if shared else pool, stream=side, capture_error_mode="thread_local"
            ):
                output = fn()
        current.wait_stream(side)
        return output

    def close(self) -> None:
        """Drop every graph (their memory returns to the caching allocator)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
        self._stream = None

    def capture_failed(self, exc: BaseException, device: torch.device | None = None) -> None:
        """After a failed recording: wait until the stream is out of its error state, then turn
        graphs off for the rest of the run, logging where the recording failed."""
        torch.cuda.synchronize(device)
        self.disable(capture_failure(exc))

    def disable(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason
            logger.info("%s: CUDA graphs off for the rest of the run: %s", self.label, reason)
        self.close()


PROFILE_ENV = "SPEEDKIT_PROFILE_DIR"


class StepProfiler:
    """Maintainers' switch for finding where a step-based loop spends its time.

    When the environment variable ``SPEEDKIT_PROFILE_DIR`` names a folder, steps ``wait + 1``
    to ``wait + active`` of the loop are recorded with ``torch.profiler`` (CPU and CUDA) and the
    per-op table (sorted by self CUDA time, then by self CPU time) is written to
    ``<dir>/<label>-<pid>.txt``, with the wall time of each recorded step. Otherwise every
    method is a no-op costing one attribute check.
    """

    def __init__(self, label: str, wait: int = 3, active: int = 5) -> None:
        folder = os.environ.get(PROFILE_ENV, "")
        self.folder = Path(folder) if folder else None
        self.label, self.wait, self.active = label, wait, active
        self._prof = None
        self._seen = 0
        self._stamps: list[float] = []

    def step(self) -> None:
        """Call once after every step of the loop."""
        if self.folder is None:
            return
        self._seen += 1
        if self._seen == self.wait:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._stamps = [time.perf_counter()]
        elif self._prof is not None:
            self._stamps.append(time.perf_counter())
            if self._seen == self.wait + self.active:
                self.close()

    def close(self) -> None:
        """Stop recording (if recording) and write the report."""
        prof, self._prof = self._prof, None
        if prof is None or self.folder is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        walls = [b - a for a, b in zip(self._stamps, self._stamps[1:], strict=False)]
        avg = prof.key_averages()
        text = [f"{self.label}: wall per step {[round(w, 4) for w in walls]}"]
        if torch.cuda.is_available():
            text.append(avg.table(sort_by="self_cuda_time_total", row_limit=40))
        text.append(avg.table(sort_by="self_cpu_time_total", row_limit=40))
        path = self.folder / f"{self.label}-{os.getpid()}.txt"
        path.write_text("\n\n".join(text))
        logger.info("%s: profile of %d steps written to %s", self.label, len(walls), path)


# ---------------------------------------------------------------------------
# File names typed by users
# ---------------------------------------------------------------------------

_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_FORBIDDEN = set('<>:"|?*\\$;&`')


def check_file_name(name: str, input_name: str, example: str, subfolders: bool = False) -> str:
    """``name`` stripped, when it is a plain file name (or, with ``subfolders``, a relative
    path of plain names); otherwise ``ValueError`` naming the input, what is wrong and an
    example. Refused everywhere so a workflow works on every system and in every shell:
    control characters, ``<>:"|?*\\``, shell metacharacters ``$;&``` and backquote, ``.``/``..``
    parts, leading ``~``/``-``/``.``, trailing dots or spaces, Windows device names (CON, NUL,
    COM1, ...), parts longer than 200 characters."""
    text = name.strip() if isinstance(name, str) else name
    if not isinstance(text, str) or not text:
        raise ValueError(f"{input_name}={name!r} is empty: type a file name such as {example}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(
            f"{input_name}={name!r} contains a control character (NUL, tab, newline ...); use e.g. {example}"
        )
    bad = sorted(_FORBIDDEN & set(text))
    if bad:
        raise ValueError(
            f"{input_name}={name!r} contains {' '.join(bad)}; use letters, digits, spaces and - _ . ( ), e.g. {example}"
        )
    parts = text.split("/")
    if len(parts) > 1 and not subfolders:
        raise ValueError(f"{input_name}={name!r} must be a plain file name (no folder, no '..'); e.g. {example}")
    for part in parts:
        if part in ("", ".", "..") and subfolders:
            raise ValueError(f"{input_name}={name!r} must stay inside the output folder (no '.' or '..' parts)")
        if part in ("", ".", "..") or part[0] in "~-." or part[-1] in ". " or len(part) > 200:
            raise ValueError(
                f"{input_name}={name!r} has an unusable part {part!r} (empty, '.', '..', starting with ~ - . "
                f"or ending in a dot or space, or over 200 characters); e.g. {example}"
            )
        if part.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
            raise ValueError(f"{input_name}={name!r}: {part!r} is a reserved device name on Windows; e.g. {example}")
    return text
