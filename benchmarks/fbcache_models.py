"""Build ComfyUI models with random, explicitly initialised weights for FBCache tests and benchmarks.

Needs ComfyUI importable (run with ``PYTHONPATH=$COMFYUI_ROOT``). Not part of the pack: used by
``benchmarks/fbcache_*.py`` and by the integration test (as a subprocess).
"""

from __future__ import annotations

import math

import torch


def init_weights(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """ComfyUI's ops skip ``reset_parameters``; give every tensor finite, sane values."""
    gens: dict[str, torch.Generator] = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                # 1-D weights are norm scales (Linear/Conv weights have >= 2 dims); biases start at 0.
                is_scale = name.endswith(("weight", "scale"))
                value = torch.ones_like(p) if is_scale else torch.zeros_like(p)
            else:
                fan_in = p[0].numel()
                dev = str(p.device)
                if dev not in gens:
                    gens[dev] = torch.Generator(device=p.device).manual_seed(seed)
                value = torch.randn(p.shape, generator=gens[dev], device=p.device, dtype=torch.float32)
                value *= min(std, 1.0 / math.sqrt(fan_in))
            p.copy_(value.to(p.dtype))
        for b in module.buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


def sd15_config(tiny: bool) -> dict:
    if tiny:
        return {
            "model_channels": 32,
            "num_res_blocks": [1, 1],
            "channel_mult": [1, 2],
            "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1],
            "transformer_depth_middle": 1,
            "context_dim": 64,
            "num_head_channels": 16,
        }
    return {
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
        "context_dim": 768,
        "num_heads": 8,
    }


def sdxl_config(tiny: bool) -> dict:
    if tiny:
        return {
            "model_channels": 32,
            "num_res_blocks": [1, 1, 1],
            "channel_mult": [1, 2, 2],
            "transformer_depth": [0, 1, 1],
            "transformer_depth_output": [0, 0, 1, 1, 1, 1],
            "transformer_depth_middle": 1,
            "context_dim": 64,
            "num_head_channels": 16,
            "adm_in_channels": 1600,
        }
    return {
        "model_channels": 320,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "transformer_depth_middle": 10,
        "context_dim": 2048,
        "num_head_channels": 64,
        "adm_in_channels": 2816,
    }


def _unet_common(cfg: dict, dtype) -> dict:
    base = {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "dtype": dtype,
        "in_channels": 4,
        "use_linear_in_transformer": True,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
        "num_heads": -1,
        "num_head_channels": -1,
    }
    base.update(cfg)
    if base["adm_in_channels"]:
        base["num_classes"] = "sequential"
    if len(base["num_res_blocks"]) != len(base["channel_mult"]):
        raise ValueError("num_res_blocks and channel_mult differ in length")
    return base


def build_patcher(family: str, tiny: bool, device, dtype=torch.float32, seed: int = 0):
    """A ModelPatcher of ``family`` (sd15, sdxl, flux) with initialised random weights."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    if family == "sd15":
        cfg = _unet_common(sd15_config(tiny), dtype)
        cfg["use_linear_in_transformer"] = False
        mc = sm.SD15(cfg)
    elif family == "sdxl":
        mc = sm.SDXL(_unet_common(sdxl_config(tiny), dtype))
    elif family == "flux":
        mc = sm.Flux(flux_config(tiny, dtype))
    else:
        raise ValueError(family)
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "", device=device)
    init_weights(model.diffusion_model, seed=seed)
    model.diffusion_model.to(device=device, dtype=dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def flux_config(tiny: bool, dtype) -> dict:
    cfg = {
        "image_model": "flux",
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "vec_in_dim": 768,
        "context_in_dim": 4096,
        "hidden_size": 3072,
        "mlp_ratio": 4.0,
        "num_heads": 24,
        "depth": 19,
        "depth_single_blocks": 38,
        "axes_dim": [16, 56, 56],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": True,
        "txt_ids_dims": [],
        "dtype": dtype,
    }
    if tiny:
        cfg.update(
            vec_in_dim=16,
            context_in_dim=32,
            hidden_size=64,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=[8, 12, 12],
        )
    return cfg


def conditioning(family: str, tiny: bool, batch: int, device, width: int, height: int, seed: int = 1):
    """(positive, negative) in ComfyUI's CONDITIONING format with random embeddings."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if family == "flux":
        ctx, pooled, tokens = (32, 16, 8) if tiny else (4096, 768, 256)
    elif family == "sdxl":
        ctx, pooled, tokens = (64, 64, 8) if tiny else (2048, 1280, 77)
    else:
        ctx, pooled, tokens = (64, 0, 8) if tiny else (768, 0, 77)

    def one():
        extra = {}
        if pooled:
            extra["pooled_output"] = torch.randn(batch, pooled, generator=gen)
        if family == "sdxl":
            extra.update(width=width, height=height, target_width=width, target_height=height)
        if family == "flux":
            extra["guidance"] = 3.5
        return [[torch.randn(batch, tokens, ctx, generator=gen), extra]]

    return one(), one()


def easycache_patcher(mp, channels: int, threshold: float):
    """``mp`` with ComfyUI's native EasyCache attached the way its node does (default window)."""
    import comfy_extras.nodes_easycache as ec
    from comfy.patcher_extension import WrappersMP

    m = mp.clone()
    m.model_options["transformer_options"]["easycache"] = ec.EasyCacheHolder(
        threshold, 0.15, 0.95, subsample_factor=8, offload_cache_diff=False, verbose=False, output_channels=channels
    )
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "easycache", ec.easycache_sample_wrapper)
    m.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, "easycache", ec.easycache_calc_cond_batch_wrapper)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "easycache", ec.easycache_forward_wrapper)
    return m


def prepare_comfy() -> None:
    """Make ComfyUI importable on bare machines: CPU mode without CUDA, a stub for PyAV when absent.

    ``comfy_api.latest`` imports PyAV for its video types at import time; these benchmarks never
    touch video, so an empty stand-in module is enough where the wheel is not installed.
    """
    from bench_env import stub_pyav

    stub_pyav()
    if not torch.cuda.is_available():
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True


def import_pack():
    """Import the pack as ``speedkit`` from the repository root, like tests/conftest.py does."""
    import importlib

    from bench_env import register_pack

    register_pack()
    return importlib.import_module("speedkit.fbcache"), importlib.import_module("speedkit.nodes.fbcache")
