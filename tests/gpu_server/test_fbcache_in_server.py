"""First Block Cache on a full-size SDXL checkpoint in a server on the GPU, under every setting.

Hits are forced (test probe ``SpeedKitProbe_FBCachePattern``: random weights have no meaningful
dynamics). With every step computed the cached model samples what the plain model samples
(the hooks only record); with every other step skipped the result stays finite, differs, and the
node reports the hit rate. A speed target's calibration run (every step computed) equals the
plain run too, and the next run follows the plan it reported.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from test_example_workflows_in_server import SDXL_NAME, sdxl_checkpoint  # noqa: F401 - fixture

from comfy_server import widget_inputs

pytestmark = pytest.mark.gpu
STEPS = 10  # above the node's default min_steps (8)


def sampling_prompt(
    save: str, info: dict | None = None, pattern: str | None = None, seed: int = 5, sampler: str = "euler", **fbc
) -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a detailed photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 768, "height": 768, "batch_size": 1}},
    }
    model = ["1", 0]
    if info is not None:
        inputs = widget_inputs(info, "SpeedKit_FirstBlockCache", model=model, max_consecutive_hits=-1, **fbc)
        g["5"] = {"class_type": "SpeedKit_FirstBlockCache", "inputs": inputs}
        model = ["5", 0]
        if pattern is not None:
            g["6"] = {"class_type": "SpeedKitProbe_FBCachePattern", "inputs": {"model": model, "pattern": pattern}}
            model = ["6", 0]
    g["7"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": STEPS, "cfg": 5.0, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0,
        },
    }  # fmt: skip
    g["8"] = {"class_type": "SpeedKitProbe_LatentSink", "inputs": {"samples": ["7", 0], "save_name": save}}
    return g


def _latent(server, name: str) -> torch.Tensor:
    return load_file(str(server.output_dir / "probe" / f"{name}.safetensors"))["latent"]


def test_fbcache_computed_steps_match_and_hits_run(gpu_server, sdxl_checkpoint):  # noqa: F811
    tag = gpu_server.setting
    info = gpu_server.object_info()
    # a warm-up run on another seed first: the first sampling of a fresh server may pick other
    # kernels (autotuning, the first dynamic-VRAM load) and differ from later runs by rounding
    gpu_server.run_prompt(sampling_prompt(f"fbc_warmup_{tag}", seed=99), 900)
    gpu_server.run_prompt(sampling_prompt(f"fbc_plain_{tag}"), 900)
    gpu_server.run_prompt(sampling_prompt(f"fbc_computed_{tag}", info, "0"), 900)
    before = len(gpu_server.log_text())
    gpu_server.run_prompt(sampling_prompt(f"fbc_half_{tag}", info, "01"), 900)
    log = gpu_server.log_text()[before:]
    plain, computed, half = (_latent(gpu_server, f"fbc_{k}_{tag}") for k in ("plain", "computed", "half"))
    assert plain.shape == (1, 4, 96, 96) and torch.isfinite(plain).all()
    # the hooks only record on computed steps: the same kernels on the same inputs
    assert float((computed - plain).abs().max()) < 1e-3, float((computed - plain).abs().max())
    assert torch.isfinite(half).all() and not torch.equal(half, plain)
    assert "hit rate 50%" in log, log[-3000:]
    assert gpu_server.alive()


def test_fbcache_speed_target_plans_on_the_gpu(gpu_server, sdxl_checkpoint):  # noqa: F811
    tag = gpu_server.setting
    info = gpu_server.object_info()
    gpu_server.run_prompt(sampling_prompt(f"fbt_plain_{tag}"), 900)
    before = len(gpu_server.log_text())
    gpu_server.run_prompt(sampling_prompt(f"fbt_calib_{tag}", info, target_speedup=2.0, hit_residual="taylor1"), 900)
    # another seed, so that ComfyUI does not answer from its cache: the same sampler and schedule use the plan
    prompt = sampling_prompt(f"fbt_planned_{tag}", info, seed=6, target_speedup=2.0, hit_residual="taylor1")
    gpu_server.run_prompt(prompt, 900)
    log = gpu_server.log_text()[before:]
    plain, calib, planned = (_latent(gpu_server, f"fbt_{k}_{tag}") for k in ("plain", "calib", "planned"))
    assert float((calib - plain).abs().max()) < 1e-3  # the calibration run computes every step
    assert "chose plan computing steps" in log and "Target 2x: calibrated plan computing steps" in log, log[-3000:]
    assert "hit rate 50%" in log, log[-3000:]  # 2x of 10 steps: 5 planned skips
    assert torch.isfinite(planned).all()
    assert gpu_server.alive()


def test_fbcache_whole_step_skips_on_the_gpu(gpu_server, sdxl_checkpoint):  # noqa: F811
    """``skip_whole_step``: the planned run's skips run no block (cond and uncond batched: one call per step)."""
    tag = gpu_server.setting
    info = gpu_server.object_info()
    settings = {"target_speedup": 2.0, "hit_residual": "taylor1", "skip_whole_step": True}
    before = len(gpu_server.log_text())
    gpu_server.run_prompt(sampling_prompt(f"fbw_calib_{tag}", info, **settings), 900)
    gpu_server.run_prompt(sampling_prompt(f"fbw_planned_{tag}", info, seed=6, **settings), 900)
    log = gpu_server.log_text()[before:]
    planned = _latent(gpu_server, f"fbw_planned_{tag}")
    assert "Target 2x: calibrated plan computing steps" in log, log[-3000:]
    assert "5 skipped calls ran no block" in log and "Skips decided ahead" in log, log[-3000:]
    assert torch.isfinite(planned).all()
    assert gpu_server.alive()


def test_fbcache_quality_target_reads_the_sampler_on_the_gpu(gpu_server, sdxl_checkpoint):  # noqa: F811
    """``target_psnr`` with ``check_quality`` off: the calibration run reads from its own CUDA steps that
    dpmpp_2m reuses earlier predictions and euler does not, plans, and the next euler run follows the plan."""
    tag = gpu_server.setting
    info = gpu_server.object_info()
    before = len(gpu_server.log_text())
    for sampler in ("dpmpp_2m", "euler"):
        settings = {"target_psnr": 30.0, "hit_residual": "fit1", "sampler": sampler, "check_quality": False}
        gpu_server.run_prompt(sampling_prompt(f"fbq_calib_{sampler}_{tag}", info, **settings), 900)
    gpu_server.run_prompt(sampling_prompt(f"fbq_planned_{tag}", info, seed=6, **settings), 900)
    log = gpu_server.log_text()[before:]
    assert "steps read dpmpp_2m as multistep" in log and "steps read euler as single-step" in log, log[-3000:]
    assert "Target PSNR >= 30 dB: calibrated " in log, log[-3000:]  # the euler run's plan, reused
    assert torch.isfinite(_latent(gpu_server, f"fbq_planned_{tag}")).all()
    assert gpu_server.alive()


def test_fbcache_quality_target_is_checked_by_sampling_on_the_gpu(gpu_server, sdxl_checkpoint):  # noqa: F811
    """``target_psnr`` with its check (the default): the first prompt returns the uncached result, its
    plan's PSNR was measured by sampling the same inputs again on the GPU (at or above the target, or
    every step computed), and the next prompt follows the checked plan."""
    tag = gpu_server.setting
    info = gpu_server.object_info()
    settings = {"target_psnr": 30.0, "hit_residual": "fit1", "skip_whole_step": True, "seed": 7}
    gpu_server.run_prompt(sampling_prompt(f"fbk_plain_{tag}", seed=7), 900)
    before = len(gpu_server.log_text())
    gpu_server.run_prompt(sampling_prompt(f"fbk_calib_{tag}", info, **settings), 900)
    gpu_server.run_prompt(sampling_prompt(f"fbk_planned_{tag}", info, **{**settings, "seed": 8}), 900)
    log = gpu_server.log_text()[before:]
    plain, calib, planned = (_latent(gpu_server, f"fbk_{k}_{tag}") for k in ("plain", "calib", "planned"))
    assert float((calib - plain).abs().max()) < 1e-3  # the prompt's result is the uncached run's
    assert "First Block Cache: quality check run:" in log, log[-3000:]
    found = re.search(r"measured PSNR ([0-9.]+) dB against the calibration run", log)
    assert found or "every step is computed" in log, log[-3000:]
    if found:
        assert float(found.group(1)) >= 30.0, log[-3000:]
        assert "Target PSNR >= 30 dB: calibrated plan computing steps" in log, log[-3000:]
    assert torch.isfinite(planned).all()
    assert gpu_server.alive()
