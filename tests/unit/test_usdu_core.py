"""USDU core on CPU: tile plans, masks, seamless compositing, normalisation, seeds, errors."""

from __future__ import annotations

import pytest
import torch

from speedkit import torch_utils
from speedkit.usdu import masks, metrics, pipeline, planner, runner, upscale
from speedkit.usdu.planner import Box, PlanSettings


def settings(**kw) -> pipeline.UsduSettings:
    top = {k: kw.pop(k) for k in ("upscale_by", "normalize", "seed", "tile_seed", "batch_size", "batching") if k in kw}
    return pipeline.UsduSettings(plan=PlanSettings(**kw), **top)


def covered(jobs, width, height) -> torch.Tensor:
    hits = torch.zeros(height, width, dtype=torch.int32)
    for j in jobs:
        r = j.region.clip(width, height)
        hits[r.y0 : r.y1, r.x0 : r.x1] += 1
    return hits


# ---------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------


def test_linear_grid_hand_computed():
    # 1000 x 600 canvas, 512 tiles: 2 rows x 2 cols; the last column/row are partial.
    passes = planner.plan(1000, 600, PlanSettings(tile_width=512, tile_height=512, padding=32))
    assert [p.name for p in passes] == ["redraw"]
    jobs = passes[0].jobs
    assert [(j.region.x0, j.region.y0) for j in jobs] == [(0, 0), (512, 0), (0, 512), (512, 512)]
    # Uniform crops: 512 + 2*32 = 576 wide, shifted inside the canvas; height clipped to 600.
    assert [j.crop for j in jobs] == [
        Box(0, 0, 576, 576),
        Box(424, 0, 1000, 576),
        Box(0, 24, 576, 600),
        Box(424, 24, 1000, 600),
    ]
    assert bool((covered(jobs, 1000, 600) == 1).all())
    for j in jobs:
        assert j.crop.contains(j.region.clip(1000, 600))


def test_interior_tile_gets_padding_on_every_side():
    jobs = planner.plan(2048, 2048, PlanSettings(padding=32)).pop().jobs
    interior = jobs[5]  # row 1, col 1
    assert interior.region == Box(512, 512, 1024, 1024)
    assert interior.crop == Box(480, 480, 1056, 1056)
    # every crop has the same size: one scale for every tile (no resampling)
    assert {(j.crop.w, j.crop.h) for j in jobs} == {(576, 576)}


def test_non_uniform_crops_are_minimal_and_multiple_of_8():
    jobs = planner.plan(1000, 600, PlanSettings(padding=32, force_uniform_tiles=False))[0].jobs
    assert jobs[0].crop == Box(0, 0, 544, 544)  # 512 + 32 on the inner sides only
    assert jobs[3].crop == Box(480, 480, 1000, 600)  # clipped: 520 x 120 (canvas edge)
    for j in jobs:
        assert j.crop.contains(j.region.clip(1000, 600))
        assert j.crop.w % 8 == 0 and j.crop.h % 8 == 0


def test_chess_order_whites_then_blacks():
    order = planner.redraw_order(3, 3, "Chess")
    assert order == [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2), (0, 1), (1, 0), (1, 2), (2, 1)]
    assert sorted(order) == planner.redraw_order(3, 3, "Linear")
    assert planner.redraw_order(3, 3, "None") == []


def test_half_tile_geometry_hand_computed():
    passes = planner.plan(
        1024,
        1024,
        PlanSettings(mode_type="None", seam_fix_mode="Half Tile", seam_fix_padding=16, seam_fix_denoise=0.35),
    )
    assert [(p.name, len(p.jobs)) for p in passes] == [("seam rows", 2), ("seam columns", 2)]
    rows, cols = passes
    assert rows.jobs[0].region == Box(0, 256, 512, 768) and rows.jobs[0].mask == planner.MASK_TENT_Y
    assert cols.jobs[1].region == Box(256, 512, 768, 1024) and cols.jobs[1].mask == planner.MASK_TENT_X
    assert rows.jobs[0].crop == Box(0, 240, 544, 784)
    assert all(j.denoise == 0.35 for p in passes for j in p.jobs)


def test_intersections_and_band_pass_counts():
    p = planner.plan(1536, 1024, PlanSettings(seam_fix_mode="Half Tile + Intersections"))
    # 2 rows x 3 cols: redraw 6, row seams 1*3, column seams 2*2, corners 1*2
    assert [(x.name, len(x.jobs)) for x in p] == [
        ("redraw", 6),
        ("seam rows", 3),
        ("seam columns", 4),
        ("seam intersections", 2),
    ]
    assert p[3].jobs[0].region == Box(256, 256, 768, 768)
    b = planner.plan(1536, 1024, PlanSettings(seam_fix_mode="Band Pass", seam_fix_width=64))
    assert [(x.name, len(x.jobs)) for x in b] == [("redraw", 6), ("band columns", 4), ("band rows", 3)]
    band = b[1].jobs[0]
    assert band.region == Box(480, 0, 544, 512)  # 64 px centred on x = 512, one tile long
    assert band.crop.w == 64 + 2 * 16
    # job indices are global and unique (per-tile seeds depend on it)
    idx = [j.index for x in b for j in x.jobs]
    assert idx == list(range(len(idx)))


def test_canvas_size_rounds_to_8_and_rejects_zero():
    assert planner.canvas_size(1024, 768, 2.0) == (2048, 1536)
    assert planner.canvas_size(100, 60, 1.5) == (152, 88)
    with pytest.raises(ValueError, match="upscale_by.*canvas"):
        planner.canvas_size(40, 40, 0.05)


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def test_rect_mask_feathers_inner_edges_only():
    job = planner.plan(1024, 512, PlanSettings(mask_blur=8, padding=32))[0].jobs[0]
    m = masks.job_mask(job, 1024, 512)
    assert m.shape == (job.crop.h, job.crop.w)
    assert float(m[0, 0]) == pytest.approx(1.0)  # canvas corner: not feathered
    assert float(m[256, 511]) == pytest.approx(0.5, abs=0.05)  # on the inner edge at x = 512
    assert float(m[256, 511 + 24]) < 0.01  # 3 sigma outside
    assert float(m.max()) <= 1.0 and float(m.min()) >= 0.0


def test_hard_mask_when_blur_is_zero():
    job = planner.plan(1024, 512, PlanSettings(mask_blur=0, padding=32))[0].jobs[1]
    m = masks.job_mask(job, 1024, 512)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert int(m.sum()) == 512 * 512


def test_tent_and_radial_masks_peak_on_seam_and_corner():
    p = planner.plan(1024, 1024, PlanSettings(mode_type="None", seam_fix_mode="Half Tile + Intersections"))
    row_job = p[0].jobs[0]
    m = masks.job_mask(row_job, 1024, 1024)
    seam_row = 512 - row_job.crop.y0
    assert float(m[seam_row, 100]) > 0.99 and float(m[seam_row - 255, 100]) < 0.01
    corner = p[2].jobs[0]
    r = masks.job_mask(corner, 1024, 1024)
    cy, cx = 512 - corner.crop.y0, 512 - corner.crop.x0
    assert float(r[cy, cx]) > 0.99 and float(r[cy, cx + 255]) < 0.01


# ---------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"mode_type": "Chess", "seam_fix_mode": "Half Tile + Intersections", "batch_size": 3},
        {"seam_fix_mode": "Band Pass", "force_uniform_tiles": False, "tile_seed": "per tile"},
        {"tile_width": 96, "tile_height": 64, "padding": 8, "mask_blur": 0, "seam_fix_mode": "Half Tile"},
    ],
)
def test_identity_sampler_returns_the_plain_upscaled_image_exactly(kw):
    image = torch.rand(2, 100, 76, 3) * 0.8 + 0.1
    s = settings(upscale_by=2.0, tile_width=kw.pop("tile_width", 64), tile_height=kw.pop("tile_height", 64), **kw)
    calls = []

    def identity(batch: runner.TileBatch) -> torch.Tensor:
        calls.append(batch)
        assert batch.pixels.shape[1] % 8 == 0 and batch.pixels.shape[2] % 8 == 0
        return batch.pixels.clone()

    out = pipeline.upscale_then_redraw(image, s, identity)
    plain = upscale.lanczos_resize(torch_utils.normalize_range(image, "minmax"), 152, 200)
    assert calls, "the sampler was never called"
    assert out.shape == plain.shape == (2, 200, 152, 3)
    assert torch.equal(out, plain)


def test_compositing_changes_only_the_masked_region():
    canvas = torch.zeros(1, 256, 256, 3)
    passes = planner.plan(256, 256, PlanSettings(tile_width=128, tile_height=128, padding=16, mask_blur=0))
    only_first = [planner.TilePass("redraw", passes[0].jobs[:1], passes[0].denoise)]
    out = runner.run_passes(canvas, only_first, lambda b: torch.ones_like(b.pixels))
    assert torch.equal(out[0, :128, :128], torch.ones(128, 128, 3))
    assert float(out[0, 128:, :].abs().sum()) == 0 and float(out[0, :, 128:].abs().sum()) == 0


def test_later_tiles_see_earlier_results_and_blend_in_float():
    canvas = torch.full((1, 128, 256, 3), 0.25)
    passes = planner.plan(256, 128, PlanSettings(tile_width=128, tile_height=128, padding=16, mask_blur=4))
    seen = []

    def add(batch):
        seen.append(batch.pixels.clone())
        return batch.pixels + 0.001  # below one 8-bit step: an 8-bit round trip would lose it

    out = runner.run_passes(canvas, passes, add)
    assert float(seen[1][0, 64, 0, 0]) > 0.25  # the second tile's left padding holds tile 1's output
    assert float(out[0, 64, 10, 0]) == pytest.approx(0.251, abs=1e-6)


def test_zero_denoise_skips_sampling():
    def boom(batch):
        raise AssertionError("sampler called")

    image = torch.rand(1, 64, 64, 3)
    out = pipeline.upscale_then_redraw(image, settings(tile_width=64, tile_height=64, denoise=0.0), boom)
    assert out.shape == (1, 128, 128, 3)


def test_batches_group_equal_sized_tiles():
    passes = planner.plan(1000, 600, PlanSettings(force_uniform_tiles=False))
    groups = runner.group_jobs(passes[0].jobs, 4)
    assert [len(g) for g in groups] == [1, 1, 1, 1]  # four different crop sizes
    uniform = planner.plan(1000, 600, PlanSettings())[0].jobs
    assert [len(g) for g in runner.group_jobs(uniform, 3)] == [3, 1]


def test_cancel_stops_before_next_batch_and_returns_nothing():
    calls = []

    class Cancelled(Exception):
        pass

    def cancel():
        if len(calls) == 2:
            raise Cancelled

    def proc(b):
        calls.append(1)
        return b.pixels

    with pytest.raises(Cancelled):
        pipeline.upscale_then_redraw(
            torch.rand(1, 128, 128, 3), settings(tile_width=64, tile_height=64), proc, check_cancel=cancel
        )
    assert len(calls) == 2


def test_wrong_tile_shape_from_sampler_is_an_error():
    with pytest.raises(RuntimeError, match="changed the tile size"):
        pipeline.upscale_then_redraw(
            torch.rand(1, 64, 64, 3), settings(tile_width=64, tile_height=64), lambda b: b.pixels[:, :8]
        )


# ---------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------


def test_tile_seeds_same_and_per_tile():
    assert runner.tile_seed(5, 3, "same") == 5
    assert runner.tile_seed(5, 3, "per tile") == 8
    assert runner.tile_seed(2**64 - 1, 2, "per tile") == 1  # wraps to the 64-bit seed range
    with pytest.raises(ValueError, match="tile_seed"):
        runner.tile_seed(0, 0, "random")


def test_runner_passes_per_tile_seeds_in_job_order():
    seen = []
    pipeline.upscale_then_redraw(
        torch.rand(1, 64, 64, 3),
        settings(
            tile_width=64,
            tile_height=64,
            seed=100,
            tile_seed="per tile",
            batch_size=2,
            batching="fast",
            seam_fix_mode="Half Tile",
        ),
        lambda b: seen.append(b.seeds) or b.pixels,
    )
    assert seen == [[100, 101], [102, 103], [104, 105], [106, 107]]


def _contextual(batch: runner.TileBatch) -> torch.Tensor:
    """A stand-in sampler whose every output pixel depends on the whole crop (like a
    diffusion model's receptive field) and on the tile's seed."""
    px = batch.pixels
    n = px.shape[0] // batch.images
    seeds = torch.tensor(batch.seeds, dtype=px.dtype).repeat_interleave(batch.images)
    mean = px.mean(dim=(1, 2, 3)) + 0.01 * (seeds % 7)
    return (0.6 * px + 0.4 * mean[:, None, None, None]).clamp(0, 1).reshape(n * batch.images, *px.shape[1:])


@pytest.mark.parametrize(
    "plan",
    [
        {"mode_type": "Linear"},
        {"mode_type": "Chess"},
        {"mode_type": "Linear", "seam_fix_mode": "Half Tile + Intersections", "seam_fix_denoise": 0.5},
        {"mode_type": "Linear", "seam_fix_mode": "Band Pass", "seam_fix_width": 16, "mask_blur": 0},
        {"mode_type": "Linear", "force_uniform_tiles": False, "padding": 8},
    ],
)
def test_exact_batching_gives_the_one_tile_at_a_time_picture(plan):
    image = torch.rand(2, 96, 128, 3, generator=torch.Generator().manual_seed(3))
    common = dict(upscale_by=2.0, tile_width=64, tile_height=64, tile_seed="per tile", seed=5, **plan)
    one = pipeline.upscale_then_redraw(image, settings(batch_size=1, **common), _contextual)
    calls = []

    def counted(b):
        calls.append(len(b.jobs))
        return _contextual(b)

    many = pipeline.upscale_then_redraw(image, settings(batch_size=8, **common), counted)
    assert torch.allclose(one, many, atol=1e-6), float((one - many).abs().max())
    if plan.get("force_uniform_tiles", True):  # uneven crops rarely share a size (and a call)
        assert max(calls) > 1  # the grid really was batched
    fast = pipeline.upscale_then_redraw(image, settings(batch_size=8, batching="fast", **common), _contextual)
    assert (fast - one).abs().max() > 1e-3  # cutting every tile first is another picture


def test_exact_waves_of_a_4x4_grid():
    # 512 tiles, 32 px padding, blur 8 on 2048 px: a tile waits for its left, upper-left,
    # upper and upper-right neighbours only, so wave = 2 * row + column.
    passes = planner.plan(2048, 2048, PlanSettings(tile_width=512, tile_height=512, padding=32, mask_blur=8))
    wave = runner.levels(passes[0].jobs, 2048, 2048)
    assert wave == [2 * (k // 4) + k % 4 for k in range(16)]
    groups = runner.schedule(passes[0].jobs, 4, "exact", 2048, 2048)
    assert [len(g) for g in groups] == [1, 1, 2, 2, 2, 2, 2, 2, 1, 1]
    assert [len(g) for g in runner.schedule(passes[0].jobs, 1, "exact", 2048, 2048)] == [1] * 16


def test_write_box_is_where_the_mask_is_not_zero():
    passes = planner.plan(256, 256, PlanSettings(tile_width=128, tile_height=128, padding=32, mask_blur=4))
    job = passes[0].jobs[0]
    box = runner.write_box(job, 256, 256)
    mask = masks.job_mask(job, 256, 256)
    c = job.crop
    inside = mask[box.y0 - c.y0 : box.y1 - c.y0, box.x0 - c.x0 : box.x1 - c.x0]
    assert float(mask.sum()) == pytest.approx(float(inside.sum()))
    assert box.x1 > job.region.x1  # the feather reaches past the tile
    assert box.x1 < c.x1  # but not over the whole padding


def test_unknown_batching_is_named():
    with pytest.raises(ValueError, match="batching: unknown value 'quick'"):
        pipeline.check_settings(settings(batching="quick"))


def test_out_of_memory_batches_are_split_and_keep_the_picture():
    image = torch.rand(1, 160, 160, 3, generator=torch.Generator().manual_seed(1))
    common = dict(upscale_by=2.0, tile_width=64, tile_height=64, mask_blur=4, tile_seed="per tile")
    one = pipeline.upscale_then_redraw(image, settings(batch_size=1, **common), _contextual)
    sizes = []

    def oom_above_one(b):
        sizes.append(len(b.jobs))
        if len(b.jobs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _contextual(b)

    got = pipeline.upscale_then_redraw(image, settings(batch_size=4, **common), oom_above_one)
    assert torch.equal(got, one)
    assert max(sizes) > 1 and sizes.count(1) == 25  # 5 x 5 tiles, each finally alone


# ---------------------------------------------------------------------------
# Normalisation (reuses torch_utils.normalize_range)
# ---------------------------------------------------------------------------


def _canvas_of(image, normalize):
    got = []
    pipeline.upscale_then_redraw(
        image,
        settings(upscale_by=1.0, tile_width=64, tile_height=64, denoise=0.0, normalize=normalize),
        lambda b: b.pixels,
        on_canvas=got.append,
    )
    return got[0]


def test_minmax_normalize_stretches_washed_out_image():
    image = torch.rand(1, 64, 64, 3) * 0.7 + 0.15  # the "whitish" 0.15..0.85 range
    c = _canvas_of(image, "minmax")
    assert float(c.min()) == 0.0 and float(c.max()) == 1.0
    assert torch.allclose(c, (image - image.min()) / (image.max() - image.min()), atol=1e-6)
    assert torch.equal(_canvas_of(image, "off"), image)


def test_constant_image_maps_to_zero_and_outlier_is_ignored_by_percentile():
    assert float(_canvas_of(torch.full((1, 64, 64, 3), 0.6), "minmax").abs().max()) == 0.0
    image = torch.rand(1, 64, 64, 3) * 0.5 + 0.25
    image[0, 0, 0] = 1.0
    image[0, 1, 1] = 0.0
    mm = _canvas_of(image, "minmax")
    pc = _canvas_of(image, "percentile")
    assert float(mm[0, 10:, 10:].std()) < float(pc[0, 10:, 10:].std())  # the outliers defeat min-max


def test_minmax_per_image_uses_each_image_range():
    image = torch.stack([torch.rand(64, 64, 3) * 0.5, torch.rand(64, 64, 3) * 0.5 + 0.5])
    c = _canvas_of(image, "minmax per image")
    for i in range(2):
        assert float(c[i].min()) == 0.0 and float(c[i].max()) == 1.0


# ---------------------------------------------------------------------------
# Upscaling stage
# ---------------------------------------------------------------------------


def test_lanczos_keeps_constants_and_matches_size():
    x = torch.full((1, 30, 40, 3), 0.4)
    y = upscale.lanczos_resize(x, 100, 75)
    assert y.shape == (1, 75, 100, 3) and torch.allclose(y, torch.full_like(y, 0.4), atol=1e-6)
    m = upscale.lanczos_matrix(40, 100)
    assert torch.allclose(m.sum(1), torch.ones(100, dtype=m.dtype))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "kw", "match"),
    [
        (torch.rand(1, 64, 64, 3), {"tile_width": 512, "tile_height": 512}, "tile_width x tile_height.*larger"),
        (torch.rand(1, 64, 64, 3), {"upscale_by": 0.05}, "upscale_by"),
        (torch.full((1, 64, 64, 3), float("nan")), {}, "NaN"),
        (torch.rand(1, 64, 64), {}, "image"),
        (torch.rand(1, 64, 64, 3), {"mode_type": "Spiral"}, "mode_type"),
        (torch.rand(1, 64, 64, 3), {"normalize": "auto"}, "normalize"),
        (torch.rand(1, 64, 64, 3), {"seam_fix_mode": "Band Pass", "seam_fix_width": 0}, "seam_fix_width"),
    ],
)
def test_bad_input_raises_clear_value_error(image, kw, match):
    kw = {"tile_width": 64, "tile_height": 64, **kw}
    with pytest.raises(ValueError, match=match):
        pipeline.upscale_then_redraw(image, settings(**kw), lambda b: b.pixels)


# ---------------------------------------------------------------------------
# Seam metric
# ---------------------------------------------------------------------------


def test_seam_visibility_ratio_detects_a_tile_step():
    image = upscale.lanczos_resize(torch.rand(1, 64, 64, 3), 256, 256)
    clean = metrics.seam_visibility_ratio(image, 64, 64)
    stepped = image.clone()
    stepped[:, :, 64:128] = (stepped[:, :, 64:128] + 0.2).clamp(0, 1)
    assert 0.8 < clean < 1.2
    assert metrics.seam_visibility_ratio(stepped, 64, 64) > clean + 0.3


def test_automatic_batch_size_is_one_tile_per_call_under_graphs_else_the_eager_batch():
    from speedkit.usdu.pipeline import AUTO_EAGER_BATCH, resolve_batch_size

    assert resolve_batch_size(0, graphs=True) == 1
    assert resolve_batch_size(0, graphs=False) == AUTO_EAGER_BATCH > 1
    assert resolve_batch_size(3, graphs=True) == resolve_batch_size(3, graphs=False) == 3  # a chosen size stays
    assert resolve_batch_size(0, graphs=True, batching="fast") == AUTO_EAGER_BATCH  # not exact anyway
