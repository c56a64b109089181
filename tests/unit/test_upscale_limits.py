"""The upscaler stays inside the machine's memory (or a limit it is given) and stops soon after a cancel."""

from __future__ import annotations

import gc
import logging
import threading
import time

import pytest
import torch
from spandrel import ModelLoader
from spandrel.architectures.ESRGAN import ESRGAN
from test_upscale_engine import load

from speedkit.upscale_cuda import engine as engine_mod
from speedkit.upscale_cuda import planning
from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler
from speedkit.upscale_cuda.planning import MEMORY_SHARE, bytes_per_pixel


class Cancelled(Exception):
    pass


def test_cancel_is_checked_inside_a_model_call(caplog):
    # One call holds every frame (a long call on the CPU): the cancel must not wait for its end.
    caplog.set_level(logging.INFO, logger=engine_mod.__name__)
    desc = load("esrgan_x4_nf16_nb2")
    checks = []
    progress = []

    def check_cancel():
        checks.append(1)
        if len(checks) > 3:
            raise Cancelled

    up = Upscaler(desc, UpscaleOptions(precision="fp32", batch_size=8), device="cpu")
    with pytest.raises(Cancelled):
        up.upscale(torch.rand(8, 24, 24, 3), progress=lambda d, t: progress.append(d), check_cancel=check_cancel)
    assert progress == []  # stopped inside the first (and only) call
    assert "cancelled after 0 of 8 frames; stopping took" in caplog.text  # how long stopping took is logged
    copy = up.cache.module(desc.model, up.fingerprint, up.dtype)
    assert not any(m._forward_pre_hooks for m in copy.modules())  # the checks are gone after the run
    out, _ = up.upscale(torch.rand(1, 24, 24, 3))  # and a later run without cancel is unaffected
    assert out.shape == (1, 96, 96, 3)


def test_cancel_is_answered_between_preparing_the_model_and_its_first_call():
    # The first run copies, transforms and moves the model (up to a second for RRDB on a GPU):
    # a Cancel pressed meanwhile must not wait for the first model call.
    desc = load("esrgan_x4_nf16_nb2")
    checks = []
    layers = []

    def check_cancel():
        checks.append(1)
        if len(checks) == 2:  # the first check is before the first batch; the second follows the copy
            raise Cancelled

    up = Upscaler(desc, UpscaleOptions(precision="fp32"), device="cpu")
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: layers.append(m))
    try:
        with pytest.raises(Cancelled):
            up.upscale(torch.rand(2, 16, 16, 3), check_cancel=check_cancel)
    finally:
        handle.remove()
    assert layers == []  # no layer of the model ran
    assert len(checks) == 2


def test_every_layer_of_the_copy_is_a_cancel_point():
    # A single conv can take a second (cuDNN autotuning a new shape on a GPU's first call): the
    # checks sit before each layer, not only before each block.
    desc = load("esrgan_x4_nf16_nb2")
    up = Upscaler(desc, UpscaleOptions(precision="fp32"), device="cpu")
    copy = up.cache.module(desc.model, up.fingerprint, up.dtype)
    up._check_cancel = lambda: None
    up.device = torch.device("cuda")  # as on a GPU (no GPU work is done here)
    try:
        up._watch_cancel(copy)
        convs = [m for m in copy.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(m._forward_pre_hooks for m in convs)
    finally:
        for handle in up._hooks:
            handle.remove()
        up._hooks.clear()
        up._check_cancel = None


def test_automatic_tile_batch_fits_the_free_memory(monkeypatch):
    desc = load("esrgan_x4_nf16_nb2")
    budget = 300 * 1024**2
    monkeypatch.setattr(engine_mod, "free_memory_bytes", lambda device: budget)
    up = Upscaler(desc, UpscaleOptions(precision="fp32", tile_size=64), device="cpu")
    plan = up.plan(512, 512)
    assert len(plan.tiles) > 50
    batch = up._batch_for(plan, 1)
    per_tile = (plan.tile_h + plan.pad_h) * (plan.tile_w + plan.pad_w) * bytes_per_pixel(up.traits, 4)
    assert 1 <= batch < len(plan.tiles)
    assert batch * per_tile <= budget * 0.7  # the balanced share


def test_explicit_batch_that_cannot_fit_is_reduced_with_a_log_line(monkeypatch, caplog):
    desc = load("compact_x4_nc4")
    monkeypatch.setattr(engine_mod, "free_memory_bytes", lambda device: 64 * 1024**2)
    up = Upscaler(desc, UpscaleOptions(precision="fp32", batch_size=64), device="cpu")
    with caplog.at_level(logging.WARNING):
        out, rep = up.upscale(torch.rand(64, 32, 32, 3))
    assert out.shape == (64, 128, 128, 3)
    assert rep.batch < 64
    assert "batch_size 64 does not fit" in caplog.text


def test_explicit_tile_that_cannot_fit_on_the_cpu_is_reduced(monkeypatch, caplog):
    desc = load("esrgan_x4_nf16_nb2")
    monkeypatch.setattr(engine_mod, "free_memory_bytes", lambda device: 200 * 1024**2)
    up = Upscaler(desc, UpscaleOptions(precision="fp32", tile_size=1024), device="cpu")
    with caplog.at_level(logging.WARNING):
        plan = up.plan(1024, 1024)
    assert plan.tile_h < 1024 and "tile_size 1024 does not fit" in caplog.text


def test_output_larger_than_host_memory_is_refused_before_any_work(monkeypatch):
    desc = load("compact_x4_nc4")
    monkeypatch.setattr(engine_mod, "host_available_bytes", lambda: 10 * 1024**2)
    up = Upscaler(desc, UpscaleOptions(precision="fp32"), device="cpu")
    with pytest.raises(ValueError, match=r"image: 4 frame\(s\) upscaled to 1024x1024 need .* GB of host memory"):
        up.upscale(torch.rand(4, 256, 256, 3))


# -- the automatic batch of a real RealESRGAN_x4plus architecture stays inside a memory limit ----

LIMIT = 2 * 1024**3  # what the planner is told is free (UpscaleOptions.memory_limit)


def realesrgan_x4plus(num_blocks: int = 23):
    """RealESRGAN_x4plus's architecture (RRDBNet, 64 filters, x4) with random weights."""
    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=num_blocks, scale=4)
    return ModelLoader().load_from_state_dict(net.state_dict()).eval()


def test_automatic_batch_of_realesrgan_x4plus_fits_the_memory_limit():
    desc = realesrgan_x4plus()
    assert sum(p.numel() for p in desc.model.parameters()) == 16_697_987  # RealESRGAN_x4plus's size
    up = Upscaler(desc, UpscaleOptions(precision="fp32", tile_size=128, memory_limit=LIMIT), device="cpu")
    out = torch.empty(1, 4096, 4096, 3)  # the output batch a 1024x1024 frame needs (untouched pages)
    reserved = up.reserved_bytes(out)
    assert reserved == out.numel() * 4 + 16_697_987 * 4
    plan = up.plan(1024, 1024, reserved=reserved)
    assert (plan.tile_h, plan.tile_w, len(plan.tiles)) == (128, 128, 121)  # 11 x 11, overlap 32
    batch = up._batch_for(plan, 1, reserved=reserved)
    budget = LIMIT * MEMORY_SHARE["balanced"]
    # The largest batch whose estimated working set (weights, output, accumulators, activations)
    # fits the share of the limit; without the bound the planner would take all 121 tiles per call.
    assert planning.choose_batch(plan.tile_h * plan.tile_w, "balanced", 0, len(plan.tiles)) == 121
    assert 1 <= batch < 121
    assert up.working_set(plan, batch, reserved) <= budget < up.working_set(plan, batch + 1, reserved)
    # A larger limit allows a larger batch: the bound, not a constant, decides.
    roomy = Upscaler(desc, UpscaleOptions(precision="fp32", tile_size=128, memory_limit=4 * LIMIT), device="cpu")
    assert roomy._batch_for(plan, 1, reserved=reserved) > batch


class _RssPeak:
    """Peak resident memory of this process, sampled on a thread (torch allocations are invisible
    to tracemalloc)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.002)

    def sample(self) -> int:
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss - self.base

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def growth(self) -> int:
        return self.peak - self.base


class _OverLimit(Exception):
    pass


def test_automatic_run_of_realesrgan_x4plus_stays_inside_the_memory_limit():
    """The automatic path on a 1024x1024 frame with 128 px tiles, run until its first model call
    is done, with the resident memory measured: it must grow by less than the limit given.

    The network has RealESRGAN_x4plus's widths with one RRDB block instead of 23: activation
    memory per pixel is the same (the trunk holds one block's activations at a time; the peak is
    in the x4 upsampler), the CPU time is a tenth. Were the batch not bounded, the first call
    would hold all 121 tiles (~27 GB of activations): the memory check inside the model (before
    every layer) stops it as soon as the limit is crossed and the test fails.
    """
    desc = realesrgan_x4plus(num_blocks=1)
    up = Upscaler(desc, UpscaleOptions(precision="fp32", tile_size=128, memory_limit=LIMIT), device="cpu")
    frame = torch.rand(1, 1024, 1024, 3)
    progress: list[int] = []

    def check(peak: _RssPeak) -> None:
        if peak.sample() > LIMIT:
            raise _OverLimit(f"resident memory grew by {peak.growth / 1e9:.2f} GB, over the {LIMIT / 1e9:.2f} GB limit")
        if progress:
            raise Cancelled  # the first call is done: its batch is what was planned

    gc.collect()
    with _RssPeak() as peak, pytest.raises(Cancelled):
        up.upscale(frame, progress=lambda done, total: progress.append(done), check_cancel=lambda: check(peak))
    reserved = up.reserved_bytes(torch.empty(1, 4096, 4096, 3))
    plan = up.plan(1024, 1024, reserved=reserved)
    planned = up._batch_for(plan, 1, reserved=reserved)
    assert progress[0] == planned >= 2  # the first call ran the planned (bounded) number of tiles
    assert up.working_set(plan, planned, reserved) <= LIMIT * MEMORY_SHARE["balanced"]
    assert peak.growth < LIMIT, f"resident memory grew by {peak.growth / 1e9:.2f} GB"


def test_memory_limit_must_not_be_negative():
    with pytest.raises(ValueError, match=r"memory_limit: must be >= 0"):
        Upscaler(load("compact_x4_nc4"), UpscaleOptions(memory_limit=-1), device="cpu")


def test_explicit_tile_that_cannot_fit_the_memory_limit_is_reduced(caplog):
    desc = realesrgan_x4plus(num_blocks=1)
    up = Upscaler(desc, UpscaleOptions(precision="fp32", tile_size=1024, memory_limit=LIMIT), device="cpu")
    with caplog.at_level(logging.WARNING):
        plan = up.plan(1024, 1024)
    assert plan.tile_h < 1024 and "tile_size 1024 does not fit" in caplog.text
    # A tile larger than the frame is the frame: nothing to reduce for a small one.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert up.plan(64, 64).whole
    assert "does not fit" not in caplog.text


def test_background_offload_keeps_the_cache_locked_until_the_move_is_done(monkeypatch):
    """After a Cancel the copies move to the CPU in a worker thread; a run that starts meanwhile
    must wait for the move (not pick up a copy being moved), also when the move fails."""
    from speedkit.upscale_cuda.cache import ModelCache

    cache = ModelCache()
    moved = threading.Event()

    def slow_move(keep):
        time.sleep(0.3)
        moved.set()

    monkeypatch.setattr(cache, "_offload_locked", slow_move)
    t0 = time.perf_counter()
    thread = cache.offload_in_background()
    assert time.perf_counter() - t0 < 0.2  # returns at once
    assert cache.kept_modules() == []  # answers at once: a cancelled run keeps nothing
    assert not moved.is_set()
    cache.clear()  # takes the cache's lock (as fetching a copy does): waits for the move
    assert moved.is_set() and time.perf_counter() - t0 >= 0.3
    thread.join()

    def failing_move(keep):
        raise RuntimeError("CUDA error")

    monkeypatch.setattr(cache, "_offload_locked", failing_move)
    cache.offload_in_background().join(5)
    done = threading.Thread(target=cache.clear)  # needs the cache's lock: it was given back
    done.start()
    done.join(5)
    assert not done.is_alive()
