"""The upscaler stays inside the machine's memory and stops soon after a cancel, on any device."""

from __future__ import annotations

import logging

import pytest
import torch
from test_upscale_engine import load

from speedkit.upscale_cuda import engine as engine_mod
from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler
from speedkit.upscale_cuda.planning import bytes_per_pixel


class Cancelled(Exception):
    pass


def test_cancel_is_checked_inside_a_model_call():
    # One call holds every frame (a long call on the CPU): the cancel must not wait for its end.
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
    copy = up.cache.module(desc.model, up.fingerprint, up.dtype)
    assert not any(m._forward_pre_hooks for m in copy.modules())  # the checks are gone after the run
    out, _ = up.upscale(torch.rand(1, 24, 24, 3))  # and a later run without cancel is unaffected
    assert out.shape == (1, 96, 96, 3)


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
