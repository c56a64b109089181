"""Tile planning for the CUDA upscaler: sizes, padding, coverage and blend weights."""

from __future__ import annotations

import pytest
import torch

from speedkit.upscale_cuda import planning
from speedkit.upscale_cuda.planning import ModelTraits


def traits(**kw) -> ModelTraits:
    base = {"scale": 4, "in_channels": 3, "out_channels": 3}
    base.update(kw)
    return ModelTraits(**base)


@pytest.mark.parametrize(
    ("kw", "size", "expected"),
    [
        ({}, (37, 53), (0, 0)),
        ({"minimum": 16}, (10, 12), (6, 4)),
        ({"multiple_of": 4}, (37, 53), (3, 3)),
        ({"minimum": 16, "multiple_of": 8, "square": True}, (20, 9), (4, 15)),
    ],
)
def test_padding_meets_size_requirements(kw, size, expected):
    t = traits(**kw)
    w, h = size
    pw, ph = t.padding(w, h)
    assert (pw, ph) == expected
    ww, hh = w + pw, h + ph
    assert ww >= t.minimum and hh >= t.minimum
    assert ww % t.multiple_of == 0 and hh % t.multiple_of == 0
    if t.square:
        assert ww == hh


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(300, 500, 128, 32), (129, 1000, 64, 16), (64, 64, 64, 8)])
def test_tiles_have_one_shape_and_cover_the_frame(h, w, tile, overlap):
    plan = planning.plan_tiles(h, w, traits(), tile, overlap)
    assert {(t.h, t.w) for t in plan.tiles} == {(plan.tile_h, plan.tile_w)}
    covered = torch.zeros(h, w, dtype=torch.int32)
    for t in plan.tiles:
        assert 0 <= t.y0 and t.y1 <= h and 0 <= t.x0 and t.x1 <= w
        covered[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert int(covered.min()) >= 1


def test_whole_frame_when_tile_is_zero_or_model_tiles_internally():
    assert planning.plan_tiles(300, 500, traits(), 0, 32).whole
    assert planning.plan_tiles(300, 500, traits(tiling="internal"), 128, 32).whole
    assert not planning.plan_tiles(300, 500, traits(), 128, 32).whole


def test_small_frame_tile_is_padded_to_the_minimum():
    plan = planning.plan_tiles(10, 12, traits(minimum=16), 0, 32)
    assert plan.model_shape == (16, 16)


def test_overlap_is_capped_at_half_a_tile():
    plan = planning.plan_tiles(400, 400, traits(), 64, 60)
    assert plan.overlap == 32


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(300, 500, 128, 32), (200, 200, 100, 50), (90, 300, 64, 24)])
def test_blend_weights_cover_every_pixel_and_sum_positive(h, w, tile, overlap):
    s = 2
    plan = planning.plan_tiles(h, w, traits(scale=s), tile, overlap)
    total = torch.zeros(h * s, w * s)
    for t in plan.tiles:
        wt = planning.tile_weights(plan, t, s)
        assert wt.shape == (t.h * s, t.w * s)
        assert float(wt.min()) >= 0.0 and float(wt.max()) <= 1.0
        total[t.y0 * s : t.y1 * s, t.x0 * s : t.x1 * s] += wt
    assert float(total.min()) > 0.05


def test_blend_ramp_zero_margin_then_linear():
    w = planning.blend_ramp(40, lead=16, trail=0, scale=1)
    assert torch.all(w[:4] == 0)  # context quarter of the overlap
    assert torch.all(w[12:] == 1)
    assert torch.all(w[4:12].diff() > 0)


def test_auto_overlap_uses_receptive_field_for_local_cnns():
    assert planning.auto_overlap(traits(receptive_field=18)) == 72
    assert planning.auto_overlap(traits(receptive_field=100)) == 128
    assert planning.auto_overlap(traits()) == 32
    assert planning.auto_overlap(traits(tiling="discouraged")) == 64
    assert planning.auto_overlap(traits(multiple_of=12)) % 12 == 0


def test_choose_tile_whole_when_it_fits_else_bounded():
    t = traits()
    big = 80 * 1024**3
    assert planning.choose_tile(1080, 1920, t, 2, big) == 0
    tile = planning.choose_tile(1080, 1920, t, 2, 2 * 1024**3)
    assert 64 <= tile < 1080
    assert planning.choose_tile(1080, 1920, traits(multiple_of=16), 2, 2 * 1024**3) % 16 == 0
    assert planning.choose_tile(4000, 4000, traits(tiling="internal"), 4, 1024**3) == 0
    assert planning.choose_tile(2000, 2000, t, 2, big, level="memory") <= 2000
    with pytest.raises(ValueError, match="optimization_level"):
        planning.choose_tile(10, 10, t, 2, big, level="turbo")


def test_choose_batch():
    assert planning.choose_batch(960 * 540, "balanced", 0, 100) == 4
    assert planning.choose_batch(1920 * 1080, "balanced", 0, 100) == 1
    assert planning.choose_batch(64 * 64, "balanced", 0, 5) == 5
    assert planning.choose_batch(64 * 64, "balanced", 3, 100) == 3


def test_choose_tile_leaves_reserved_memory_out_of_the_budget():
    t = traits()
    free = 2 * 1024**3
    whole = planning.choose_tile(256, 256, t, 4, free)
    assert whole == 0
    # Weights and an output batch on the same device take memory the tiles cannot use.
    reserved = int(free * 0.6)
    tile = planning.choose_tile(256, 256, t, 4, free, reserved=reserved)
    assert 0 < tile < 256
    assert planning.choose_tile(256, 256, t, 4, free, reserved=free) == planning.MIN_TILE  # never below the floor
