"""Overlapped host<->device transfers for frame streams.

An 8K fp32 frame is ~400 MB: copying it to the host takes as long as upscaling it with a
light model, so downloads run on a side CUDA stream, in chunks of at most
:data:`STAGING_CHUNK_BYTES`, into a small ring of pinned staging buffers; a worker thread
copies each chunk into the caller's output (converting to its dtype there) while the GPU
already works on the next frame. Uploads of the next input chunk are issued ahead in the
same way.

Host memory stays bounded however long the batch is: the output itself plus the ring
(:data:`STAGING_SLOTS` buffers; the same sizes every run, so PyTorch's pinned-memory cache
reuses them instead of page-locking new memory each run). The output is ordinary pageable
memory: pinned outputs were faster to fill but page-locking a fresh 400 MB tensor per run
costs more than it saves, and pinned blocks handed to the host application stay cached by
PyTorch long after it drops them. While the GPU computes a frame, a second pool touches the
pages of that frame's output slot, so the first-touch page faults of a fresh tensor are off
the critical path; a frame's host copies wait for its touches (a touch writes zeros).

The worker threads run under ``torch.inference_mode()``: inference mode is thread-local, and
a host application that runs nodes under it (ComfyUI does) hands us inputs and gets outputs
that are inference tensors, which may only be updated in place inside that mode.

On CPU devices (or outputs on the device) both helpers degrade to plain copies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

STAGING_CHUNK_BYTES = 32 << 20
"""Largest piece of a frame copied device->host in one go (one staging buffer)."""
STAGING_SLOTS = 12
"""Pinned staging buffers in flight: 12 x 32 MB = 384 MB of page-locked host memory at most,
enough for about two 8K frames in fp16, so the GPU never waits for the host between frames."""
PAGE_BYTES = 4096


def _touch_pages(target: torch.Tensor) -> None:
    """Fault in every page of a contiguous CPU tensor (one write per page)."""
    flat = target.view(-1)
    step = max(1, PAGE_BYTES // flat.element_size())
    with torch.inference_mode():
        flat[::step].zero_()


def _host_copy(done: torch.cuda.Event, buf: torch.Tensor, target: torch.Tensor, after: tuple[Future, ...] = ()) -> None:
    """Copy a finished staging buffer into ``target`` once ``done`` fired and the page touches
    in ``after`` (those writing into ``target``'s frames) ended: a touch that ran after the
    copy would zero one value per page of the frame."""
    for touch in after:
        touch.result()
    done.synchronize()
    with torch.inference_mode():  # the target may be an inference tensor (see the module docstring)
        target.copy_(buf)


class FrameWriter:
    """Copies finished device frames into ``out`` (any device) without stalling the GPU.

    ``put(index, frames)`` takes ``[n, H, W, C]`` frames computed on the current stream
    and returns once their copies are queued; ``prepare(i, j)`` may be called before frames
    ``[i, j)`` are computed so their output pages are ready when they arrive; ``close()``
    waits for every copy (call it in ``finally``).
    """

    def __init__(
        self,
        out: torch.Tensor,
        device: torch.device,
        transfer_dtype: torch.dtype,
        slots: int = STAGING_SLOTS,
        chunk_bytes: int = STAGING_CHUNK_BYTES,
    ) -> None:
        self.out = out
        self.device = device
        self.transfer_dtype = transfer_dtype
        self.async_ = device.type == "cuda" and out.device.type == "cpu"
        self.chunk_bytes = chunk_bytes
        self._slots: list[list] = [[None, None] for _ in range(max(1, slots))]  # [pinned buffer, pending copy]
        self._turn = 0
        self._prepared = 0  # frames [0, _prepared) have had their pages touched
        self._touches: list[tuple[int, int, Future]] = []  # (first frame, end frame, touch)
        if self.async_:
            self._stream = torch.cuda.Stream(device)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speedkit-d2h")
            self._touch_workers = max(1, min(8, (os.cpu_count() or 2) // 2))
            self._toucher = ThreadPoolExecutor(max_workers=self._touch_workers, thread_name_prefix="speedkit-pages")

    # -- first touch ------------------------------------------------------------------------
    def prepare(self, i: int, j: int) -> None:
        """Fault in the output pages of frames ``[i, j)`` in the background (no-op when not async)."""
        if not self.async_ or not self.out.is_contiguous():
            return
        i, j = max(i, self._prepared), min(j, self.out.shape[0])
        if i >= j:
            return
        self._prepared = j
        region = self.out[i:j].view(-1)
        step = -(-region.numel() // self._touch_workers)
        self._touches = [t for t in self._touches if not t[2].done()]
        for k in range(0, region.numel(), step):
            self._touches.append((i, j, self._toucher.submit(_touch_pages, region[k : k + step])))

    def _touches_of(self, i: int, j: int) -> tuple[Future, ...]:
        """The page touches still writing into frames ``[i, j)``."""
        return tuple(t[2] for t in self._touches if t[0] < j and i < t[1] and not t[2].done())

    # -- copies -----------------------------------------------------------------------------
    def _slot(self, numel: int) -> torch.Tensor:
        slot = self._slots[self._turn % len(self._slots)]
        self._turn += 1
        if slot[1] is not None:
            slot[1].result()  # the host copy out of this buffer must finish before it is reused
            slot[1] = None
        if slot[0] is None or slot[0].numel() < numel:
            slot[0] = torch.empty(numel, dtype=self.transfer_dtype, pin_memory=True)
        return slot

    def put(self, index: int, frames: torch.Tensor) -> None:
        n = frames.shape[0]
        if not self.async_:
            self.out[index : index + n].copy_(frames)
            return
        self.prepare(index + n, index + 2 * n)  # the next frames are computed while these copy
        # Convert/permute on the compute stream (fast on GPU), copy on the side stream.
        src = frames.to(self.transfer_dtype).contiguous()
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        touches = self._touches_of(index, index + n)
        row = src[0, 0].numel() if src.ndim == 4 else src[0].numel()
        rows = max(1, self.chunk_bytes // (row * src.element_size()))
        for f in range(n):
            height = src.shape[1]
            for r0 in range(0, height, rows):
                piece = src[f, r0 : r0 + rows]
                slot = self._slot(piece.numel())
                buf = slot[0][: piece.numel()].view(piece.shape)
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    buf.copy_(piece, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                target = self.out[index + f, r0 : r0 + rows]
                slot[1] = self._pool.submit(_host_copy, done, buf, target, touches)
        # The allocator must not hand src's memory to the next frame before the copies end.
        src.record_stream(self._stream)

    def close(self) -> None:
        if not self.async_:
            return
        try:
            for slot in self._slots:
                if slot[1] is not None:
                    slot[1].result()
            for *_, fut in self._touches:
                fut.result()
        finally:
            self._pool.shutdown(wait=True)
            self._toucher.shutdown(wait=True)
            self._slots = [[None, None] for _ in self._slots]


class ChunkReader:
    """Uploads input chunks ``source[i:j]`` to the device one chunk ahead of use.

    ``get(i, j, prefetch)`` returns chunk ``[i, j)`` on the device (already in the current
    stream's order) and starts uploading ``prefetch`` (the next range) if given.
    """

    def __init__(self, source: torch.Tensor, device: torch.device, convert: Callable[[torch.Tensor], torch.Tensor]):
        self.source = source
        self.device = device
        self.convert = convert
        self.async_ = device.type == "cuda" and source.device.type == "cpu"
        self._ahead: tuple[tuple[int, int], torch.Tensor, torch.cuda.Event | None] | None = None
        if self.async_:
            self._stream = torch.cuda.Stream(device)
        # Two pinned buffers per chunk shape, each with the event of its last upload.
        self._pinned: dict[tuple[int, ...], list[list]] = {}
        self._turn = 0

    def _upload(self, i: int, j: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        chunk = self.source[i:j]
        if not self.async_:
            return chunk.to(self.device), None
        ring = self._pinned.setdefault(tuple(chunk.shape), [])
        if len(ring) < 2:
            ring.append([torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True), None])
        slot = ring[self._turn % len(ring)]
        self._turn += 1
        buf, last = slot
        if last is not None:
            last.synchronize()  # the previous upload from this buffer must be done before refilling it
        buf.copy_(chunk)
        with torch.cuda.stream(self._stream):
            dev = buf.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        slot[1] = ev
        return dev, ev

    def get(self, i: int, j: int, prefetch: tuple[int, int] | None = None) -> torch.Tensor:
        if self._ahead is not None and self._ahead[0] == (i, j):
            dev, ev = self._ahead[1], self._ahead[2]
        else:
            dev, ev = self._upload(i, j)
        self._ahead = None
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            dev.record_stream(torch.cuda.current_stream(self.device))
        x = self.convert(dev)
        if prefetch is not None:
            self._ahead = (prefetch, *self._upload(*prefetch))
        return x
