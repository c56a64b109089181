"""Overlapped host<->device transfers for frame streams.

An 8K fp32 frame is ~400 MB: copying it to the host takes as long as upscaling it with a
light model, so downloads run on a side CUDA stream into pinned staging buffers and a
worker thread copies them into the caller's output tensor, while the GPU already works on
the next frame. Uploads of the next input chunk are issued ahead in the same way.

Only a fixed number of staging buffers exist (``slots``), so host memory stays bounded
however long the batch is. When the output itself is in pinned memory (the engine pins
outputs up to :data:`PINNED_OUTPUT_MAX_BYTES`), frames are copied straight into it: no
staging copy and no first-touch page faults on a fresh 400 MB tensor. On CPU devices both
helpers degrade to plain copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

PINNED_OUTPUT_MAX_BYTES = 1 << 30
"""Outputs up to this size are allocated in pinned memory (torch's pinned-memory cache
keeps such a block for reuse afterwards, so it is capped); larger ones (long video
batches) stream through the fixed staging buffers instead."""


def host_output(
    shape: tuple[int, ...], dtype: torch.dtype, out_device: torch.device | str, compute: torch.device
) -> torch.Tensor:
    """The output tensor for a run: pinned when it lives on the host, the work on a CUDA
    device and it is small enough (see :data:`PINNED_OUTPUT_MAX_BYTES`)."""
    out_device = torch.device(out_device)
    nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    if out_device.type == "cpu" and compute.type == "cuda" and nbytes <= PINNED_OUTPUT_MAX_BYTES:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError as exc:  # page-locked memory exhausted or refused: pageable is fine
            logger.debug("upscale: pinned output not available (%s); using pageable memory", exc)
    return torch.empty(shape, dtype=dtype, device=out_device)


class FrameWriter:
    """Copies finished device frames into ``out`` (any device) without stalling the GPU.

    ``put(index, frames)`` takes ``[n, H, W, C]`` frames computed on the current stream
    and returns immediately; ``close()`` waits for every copy (call it in ``finally``).
    """

    def __init__(self, out: torch.Tensor, device: torch.device, transfer_dtype: torch.dtype, slots: int = 2) -> None:
        self.out = out
        self.device = device
        self.transfer_dtype = transfer_dtype
        self.async_ = device.type == "cuda" and out.device.type == "cpu"
        self.direct = self.async_ and out.is_pinned()  # copy straight into the output
        self._events: list[torch.cuda.Event] = []
        self.slots = slots
        self._staging: list[torch.Tensor | None] = [None] * slots
        self._pending: list[Future | None] = [None] * slots
        self._n = 0
        if self.async_:
            self._stream = torch.cuda.Stream(device)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speedkit-d2h")

    def put(self, index: int, frames: torch.Tensor) -> None:
        if not self.async_:
            self.out[index : index + frames.shape[0]].copy_(frames)
            return
        if self.direct:
            src = frames.to(self.out.dtype).contiguous()
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.out[index : index + frames.shape[0]].copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            src.record_stream(self._stream)
            self._events = [e for e in self._events if not e.query()] + [done]
            return
        slot = self._n % self.slots
        self._n += 1
        previous = self._pending[slot]
        if previous is not None:
            previous.result()  # the host copy out of this buffer must finish before reuse
        buf = self._staging[slot]
        if buf is None or buf.shape != frames.shape:
            buf = torch.empty(frames.shape, dtype=self.transfer_dtype, pin_memory=True)
            self._staging[slot] = buf
        # Convert/permute on the compute stream (fast on GPU), copy on the side stream.
        src = frames.to(self.transfer_dtype).contiguous()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            buf.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        # The allocator must not hand src's memory to the next frame before the copy ends.
        src.record_stream(self._stream)
        target = self.out[index : index + frames.shape[0]]
        self._pending[slot] = self._pool.submit(_finish_copy, done, buf, target)

    def close(self) -> None:
        if not self.async_:
            return
        try:
            for ev in self._events:
                ev.synchronize()
            for fut in self._pending:
                if fut is not None:
                    fut.result()
        finally:
            self._pool.shutdown(wait=True)
            self._staging = [None] * self.slots


def _finish_copy(done: torch.cuda.Event, buf: torch.Tensor, target: torch.Tensor) -> None:
    done.synchronize()
    target.copy_(buf)


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
