"""Host transfers of the upscaler: chunked device->host copies, worker threads, inference tensors."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from speedkit.upscale_cuda.host_io import FrameWriter, _host_copy, _touch_pages


class _DoneEvent:
    """Stands in for a CUDA event that has already completed."""

    def synchronize(self) -> None:
        pass


def test_worker_thread_copies_into_an_inference_tensor():
    # ComfyUI runs nodes under torch.inference_mode(), which is thread-local: an output
    # allocated there is an inference tensor, and a plain worker thread may not write it.
    with torch.inference_mode():
        target = torch.zeros(4, 5, 3)
    buf = torch.rand(4, 5, 3, dtype=torch.float16)
    assert target.is_inference() and not torch.is_inference_mode_enabled()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(_host_copy, _DoneEvent(), buf[1:3], target[1:3]).result()
        pool.submit(_host_copy, _DoneEvent(), buf[:1], target[:1]).result()
    torch.testing.assert_close(target[1:3], buf[1:3].float(), atol=0, rtol=0)
    torch.testing.assert_close(target[:1], buf[:1].float(), atol=0, rtol=0)
    assert float(target[3:].abs().sum()) == 0.0


def test_plain_thread_cannot_write_an_inference_tensor_without_the_mode():
    # The failure the worker guards against, shown directly (so the test above means something).
    with torch.inference_mode():
        target = torch.zeros(2, 2)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            target.copy_(torch.ones(2, 2))
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=write)
    t.start()
    t.join()
    assert errors and "inference" in str(errors[0]).lower()


def test_touching_pages_keeps_the_tensor_usable_and_works_in_a_thread():
    with torch.inference_mode():
        out = torch.full((3, 1000, 7), 5.0)
    parts = (out.view(-1)[:10_500], out.view(-1)[10_500:])
    with ThreadPoolExecutor(2) as pool:
        for part in parts:
            pool.submit(_touch_pages, part).result()
    for part in parts:  # one element per 4 KiB page was written, nothing else
        assert float(part[:: 4096 // 4].abs().sum()) == 0.0
    assert int((out == 5.0).sum()) == out.numel() - sum(len(range(0, p.numel(), 1024)) for p in parts)


def test_host_copy_waits_for_the_page_touches_of_its_frame():
    # A touch writes one zero per page: run after the copy, it would punch zeros into the frame.
    with torch.inference_mode():
        target = torch.full((64, 1024), 7.0)
    buf = torch.rand(64, 1024)
    gate = threading.Event()

    def slow_touch() -> None:
        gate.wait(5)
        _touch_pages(target)

    with ThreadPoolExecutor(1) as toucher, ThreadPoolExecutor(1) as copier:
        touch = toucher.submit(slow_touch)
        copied = copier.submit(_host_copy, _DoneEvent(), buf, target, (touch,))
        assert not copied.done()  # held back by the touch still to come
        gate.set()
        copied.result(timeout=10)
    torch.testing.assert_close(target, buf, atol=0, rtol=0)


def test_cpu_writer_is_a_plain_copy():
    out = torch.zeros(3, 4, 5, 3)
    w = FrameWriter(out, torch.device("cpu"), torch.float32)
    w.prepare(0, 3)  # no-op off CUDA
    frames = torch.rand(2, 4, 5, 3)
    w.put(1, frames)
    w.close()
    torch.testing.assert_close(out[1:], frames, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])
def test_gpu_writer_chunks_reuse_slots_and_fill_an_inference_output(chunk_bytes):
    # Tiny chunks force many pieces per frame and every staging slot to be reused.
    with torch.inference_mode():
        out = torch.empty(5, 17, 9, 3)
        frames = torch.rand(5, 17, 9, 3, device="cuda")
    w = FrameWriter(out, torch.device("cuda"), torch.float16, slots=2, chunk_bytes=chunk_bytes)
    try:
        w.prepare(0, 2)
        w.put(0, frames[:2])
        w.put(2, frames[2:3].permute(0, 2, 1, 3).transpose(1, 2))  # non-contiguous input
        w.put(3, frames[3:])
    finally:
        w.close()
    torch.testing.assert_close(out, frames.half().float().cpu(), atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_writer_copies_after_slow_page_touches(monkeypatch):
    # Touches slower than the copies (a busy host): each frame must still end up whole.
    from speedkit.upscale_cuda import host_io

    real = host_io._touch_pages

    def slow(target):
        time.sleep(0.05)
        real(target)

    monkeypatch.setattr(host_io, "_touch_pages", slow)
    with torch.inference_mode():
        out = torch.empty(6, 64, 256, 3)
        frames = torch.rand(6, 64, 256, 3, device="cuda") + 0.5
    w = FrameWriter(out, torch.device("cuda"), torch.float16, slots=4, chunk_bytes=16 << 10)
    try:
        w.prepare(0, 1)
        for f in range(6):
            w.put(f, frames[f : f + 1])
    finally:
        w.close()
    torch.testing.assert_close(out, frames.half().float().cpu(), atol=0, rtol=0)


def test_model_fingerprint_is_remembered_until_the_weights_change(monkeypatch):
    from speedkit.upscale_cuda import cache as cache_mod

    calls = []
    real = cache_mod.model_fingerprint
    monkeypatch.setattr(cache_mod, "model_fingerprint", lambda m, a="": calls.append(a) or real(m, a))
    net = torch.nn.Conv2d(3, 3, 3)
    c = cache_mod.ModelCache()
    first = c.fingerprint(net, "x")
    assert c.fingerprint(net, "x") == first and len(calls) == 1  # not hashed again
    with torch.no_grad():
        net.weight.add_(1.0)  # edited in place: the version counter moves, so it is hashed again
    assert c.fingerprint(net, "x") != first and len(calls) == 2
    assert c.fingerprint(net, "y") != c.fingerprint(net, "x")


def test_fingerprint_of_a_model_loaded_under_inference_mode():
    # ComfyUI loads upscale models inside torch.inference_mode(): their weights have no version counter.
    from speedkit.upscale_cuda.cache import ModelCache

    with torch.inference_mode():
        net = torch.nn.Conv2d(3, 3, 3)
    assert net.weight.is_inference()
    c = ModelCache()
    assert c.fingerprint(net, "x") == c.fingerprint(net, "x")
