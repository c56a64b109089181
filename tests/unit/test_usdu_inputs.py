"""``usdu.inputs.node_run``: the USDU nodes' widget values -> checked settings, without ComfyUI.

The checks run in a fixed order (missing VAE / model, image, prompts, sampler numbers,
tiling), so a prompt with several bad inputs always reports the same first one.
"""

from __future__ import annotations

import logging

import pytest
import torch

from speedkit.usdu import inputs

NAN = float("nan")


def widgets(**kw) -> dict:
    """The main node's defaults (ComfyUI objects replaced by stand-ins), overridden by ``kw``."""
    base = dict(
        image=torch.rand(2, 64, 64, 3),
        model=object(),
        vae=object(),
        positive=[[torch.zeros(2, 77, 8), {}]],
        negative=[[torch.zeros(1, 77, 8), {}]],
        upscale_by=2.0,
        seed=0,
        steps=20,
        cfg=8.0,
        denoise=0.2,
        mode_type="Linear",
        tile_width=512,
        tile_height=512,
        mask_blur=8,
        tile_padding=32,
        seam_fix_mode="None",
        seam_fix_denoise=1.0,
        seam_fix_width=64,
        seam_fix_mask_blur=8,
        seam_fix_padding=16,
        force_uniform_tiles=True,
        batch_size=4,
        normalize="minmax",
        tile_seed="same",
        batching="exact",
    )
    base.update(kw)
    return base


def test_widget_values_become_the_settings():
    run = inputs.node_run(**widgets(tile_padding=24, seam_fix_mode="Band Pass", tile_seed="per tile", batching="fast"))
    s = run.settings
    assert not run.custom
    assert (s.upscale_by, s.normalize, s.seed, s.tile_seed, s.batch_size, s.batching) == (
        2.0,
        "minmax",
        0,
        "per tile",
        4,
        "fast",
    )
    p = s.plan
    assert (p.tile_width, p.tile_height, p.padding, p.mask_blur, p.mode_type) == (512, 512, 24, 8, "Linear")
    assert (p.denoise, p.seam_fix_mode, p.seam_fix_denoise, p.seam_fix_width) == (0.2, "Band Pass", 1.0, 64)
    assert (p.seam_fix_mask_blur, p.seam_fix_padding, p.force_uniform_tiles) == (8, 16, True)


def test_missing_vae_is_reported_before_a_missing_model():
    with pytest.raises(ValueError, match=r"^vae: no VAE connected"):
        inputs.node_run(**widgets(vae=None, model=None))
    with pytest.raises(ValueError, match=r"^model: no MODEL connected"):
        inputs.node_run(**widgets(model=None))


def test_errors_come_in_input_order():
    # image before the prompts, the prompts before cfg, cfg before steps and the tiling
    bad_all = dict(cfg=NAN, steps=0, tile_width=NAN, positive=[])
    with pytest.raises(ValueError, match=r"^upscaled_image: "):
        inputs.node_run(**widgets(image=torch.rand(0, 8, 8, 3), image_name="upscaled_image", **bad_all))
    with pytest.raises(ValueError, match=r"^positive: the CONDITIONING is empty"):
        inputs.node_run(**widgets(**bad_all))
    with pytest.raises(ValueError, match=r"^cfg: nan is not a finite number"):
        inputs.node_run(**widgets(**dict(bad_all, positive=widgets()["positive"])))
    with pytest.raises(ValueError, match=r"^steps: 0 is below the minimum 1"):
        inputs.node_run(**widgets(steps=0, tile_width=NAN))
    with pytest.raises(ValueError, match=r"^tile_width: nan is not a finite number"):
        inputs.node_run(**widgets(tile_width=NAN))


def test_sampler_and_sigmas_together_replace_steps_and_denoise():
    sigmas = torch.tensor([14.6, 3.0, 0.0])
    run = inputs.node_run(**widgets(custom_sampler=object(), custom_sigmas=sigmas, steps=0, denoise=0.3))
    assert run.custom
    assert run.settings.plan.denoise == 1.0  # the schedule says how much is redrawn
    assert run.settings.plan.seam_fix_denoise == 1.0


def test_a_lone_sampler_or_sigmas_is_ignored_with_a_warning(caplog):
    for kw in ({"custom_sampler": object()}, {"custom_sigmas": torch.tensor([1.0, 0.0])}):
        with caplog.at_level(logging.WARNING, logger="speedkit.usdu.inputs"):
            caplog.clear()
            run = inputs.node_run(**widgets(**kw))
        assert not run.custom and run.settings.plan.denoise == 0.2
        assert "must both be connected" in caplog.text
    with pytest.raises(ValueError, match=r"^steps: 0 is below the minimum 1"):  # steps count again
        inputs.node_run(**widgets(custom_sampler=object(), steps=0))


def test_a_single_sigma_redraws_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="speedkit.usdu.inputs"):
        run = inputs.node_run(**widgets(custom_sampler=object(), custom_sigmas=torch.tensor([0.5])))
    assert run.custom and run.settings.plan.denoise == 0.0 and run.settings.plan.seam_fix_denoise == 0.0
    assert "single sigma" in caplog.text


def test_bad_sigmas_are_named():
    with pytest.raises(ValueError, match=r"^custom_sigmas: sigma 1 \(3\) is larger than sigma 0"):
        inputs.node_run(**widgets(custom_sampler=object(), custom_sigmas=torch.tensor([1.0, 3.0, 0.0])))
