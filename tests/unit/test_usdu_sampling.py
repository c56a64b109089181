"""The model-free half of a USDU sampler call (``usdu.sampling``, ``usdu.forward_args``):
which tiles share a call, what their prompts and noise become, which sigmas a pass runs,
and how a denoiser call is named for the CUDA-graph key. No ComfyUI."""

from __future__ import annotations

import pytest
import torch

from speedkit.usdu import cond, planner, runner, sampling
from speedkit.usdu.forward_args import ForwardArgs
from speedkit.usdu.planner import Box, PlanSettings

CANVAS = sampling.Canvas(width=128, height=96, source_w=64, source_h=48)


def linear_batch(images: int = 1, tile: int = 64) -> runner.TileBatch:
    """Every job of a Linear pass over ``CANVAS`` (no padding), in one batch."""
    (redraw,) = planner.plan(CANVAS.width, CANVAS.height, PlanSettings(tile_width=tile, tile_height=48, padding=0))
    jobs = list(redraw.jobs)
    pixels = torch.rand(len(jobs) * images, 48, tile, 3)
    return runner.TileBatch(jobs, pixels, [10 + j.index for j in jobs], 0.5, "redraw", images)


def prompt(**extra) -> list:
    return [[torch.zeros(1, 77, 8), dict(extra)]]


def test_plain_prompts_share_one_call_with_per_tile_sizes():
    batch = linear_batch()
    (call,) = sampling.TileConditioner(prompt(), prompt(), CANVAS).calls(batch)
    assert call.batch is batch
    assert call.sizes == cond.tile_size_values(sampling.TileConditioner(prompt(), prompt(), CANVAS).geometries(batch))
    assert [s["crop_w"] for s in call.sizes] == [0, 64, 0, 64]
    assert [s["crop_h"] for s in call.sizes] == [0, 0, 48, 48]


def test_a_single_tile_call_has_no_per_tile_sizes():
    batch = sampling.sub_batch(linear_batch(), 2, 3)
    (call,) = sampling.TileConditioner(prompt(), prompt(), CANVAS).calls(batch)
    assert call.sizes is None and [j.index for j in call.batch.jobs] == [2]


def test_an_area_prompt_splits_the_batch_where_it_crops_differently():
    # An area over the top half of the source (latent units: h 3, w 8 at y 0, x 0):
    # the top row of tiles sees it, the bottom row does not.
    area = prompt(area=(3, 8, 0, 0), strength=1.0)
    batch = linear_batch(images=2)
    calls = list(sampling.TileConditioner(prompt() + area, prompt(), CANVAS).calls(batch))
    assert [[j.index for j in c.batch.jobs] for c in calls] == [[0, 1], [2, 3]]
    # pixels, seeds and the image count follow the jobs (job-major: 2 images per job)
    assert torch.equal(calls[1].batch.pixels, batch.pixels[4:8])
    assert calls[1].batch.seeds == batch.seeds[2:] and calls[1].batch.images == 2
    assert len(calls[0].positive) == 2 and len(calls[1].positive) == 1  # the area misses the bottom row
    assert all(c.sizes is not None and len(c.sizes) == 2 for c in calls)


def test_tile_noise_is_per_seed_and_leaves_the_global_rng_alone():
    latent = torch.zeros(4, 4, 6, 8)  # 2 tiles x 2 images
    torch.manual_seed(123)
    before = torch.get_rng_state()
    noise = sampling.tile_noise(latent, [5, 6], images=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert noise.dtype == torch.float32 and noise.shape == latent.shape
    expected = torch.randn((2, 4, 6, 8), generator=torch.Generator().manual_seed(6))
    assert torch.equal(noise[2:], expected)
    assert not torch.equal(noise[:2], noise[2:])


@pytest.mark.parametrize(
    ("fraction", "kept"),
    [(1.0, 5), (1.5, 5), (0.5, 3), (0.3, 2), (0.01, 2)],  # 4 steps: at least one step is kept
)
def test_shorten_sigmas_keeps_the_tail(fraction, kept):
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    out = sampling.shorten_sigmas(sigmas, fraction)
    assert out.tolist() == sigmas[-kept:].tolist()


def test_pass_sigmas_runs_the_whole_schedule_for_the_redraw_and_the_tail_for_seams():
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    job = planner.TileJob(0, "redraw", Box(0, 0, 8, 8), Box(0, 0, 8, 8), "rect", 0.0, 0.25)
    redraw = runner.TileBatch([job], torch.zeros(1, 8, 8, 3), [0], 0.25, "redraw", 1)
    seam = runner.TileBatch([job], torch.zeros(1, 8, 8, 3), [0], 0.25, "band", 1)
    assert sampling.pass_sigmas(sigmas, redraw) is sigmas
    assert sampling.pass_sigmas(sigmas, seam).tolist() == [1.0, 0.0]


class UNetLike:
    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        return x


def test_forward_args_names_positional_and_keyword_calls_alike():
    forward = ForwardArgs(UNetLike()._forward)
    x, t = torch.zeros(1), torch.ones(1)
    by_position = forward.name((x, t), {"context": None, "extra": 3})
    by_name = forward.name((), {"x": x, "timesteps": t, "context": None, "extra": 3})
    assert by_position == by_name == {"x": x, "timesteps": t, "context": None, "extra": 3}


def test_forward_args_refuses_calls_it_cannot_name():
    forward = ForwardArgs(UNetLike()._forward)
    assert forward.name((1, 2, 3, 4, 5, 6, 7), {}) is None  # too many positional arguments

    def with_var_positional(x, *rest):
        return x

    varargs = ForwardArgs(with_var_positional)
    assert varargs.name((1, 2), {}) is None
    assert varargs.name((1,), {}) == {"x": 1}  # no extra positional arguments: nothing to refuse
    with pytest.raises((TypeError, ValueError)):
        ForwardArgs(42)
