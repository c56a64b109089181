"""Probe nodes for First Block Cache runs in a live server (tests and ``benchmarks/server_fbcache_bench.py``).

- ``SpeedKitProbe_RandomConditioning``: a CONDITIONING of random text embeddings in the shapes a
  model family expects (Flux: 256 x 4096 plus a 768 pooled vector and a guidance value; Wan 2.1:
  512 x 4096), for checkpoints with random weights that come without their text encoders.
- ``SpeedKitProbe_FBCachePattern``: the MODEL of ``SpeedKit_FirstBlockCache`` with a forced hit
  pattern (the cache's benchmark hook ``force_pattern``): random weights have no meaningful
  dynamics, so the speed of a given share of skipped steps is measured by forcing it.
- ``SpeedKitProbe_LatentSink``: an output node that takes a LATENT (so a prompt can end at the
  sampler without a VAE), reports its shape and, when given a name, saves it under ``output/probe/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .saving import save_probe_tensor

HOLDER_KEY = "speedkit_fbcache"  # fbcache.holder.HOLDER_KEY (the pack is not importable by name here)


class RandomConditioning:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node API
        return {
            "required": {
                "tokens": ("INT", {"default": 256, "min": 1, "max": 4096}),
                "dim": ("INT", {"default": 4096, "min": 1, "max": 16384}),
                "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 8192}),
                "guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, tokens, dim, pooled_dim, guidance, seed):
        gen = torch.Generator().manual_seed(seed)
        extra: dict = {}
        if pooled_dim:
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=gen)
        if guidance >= 0:
            extra["guidance"] = guidance
        return ([[torch.randn(1, tokens, dim, generator=gen), extra]],)


class FBCachePattern:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node API
        return {
            "required": {"model": ("MODEL",), "pattern": ("STRING", {"default": "01"})},
            "optional": {
                "sync_debug": ("BOOLEAN", {"default": False}),
                "decide_ahead": ("BOOLEAN", {"default": True}),
                "profile_name": ("STRING", {"default": ""}),
                "skip_whole_step": ("BOOLEAN", {"default": False}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(
        self,
        model,
        pattern,
        sync_debug: bool = False,
        decide_ahead: bool = True,
        profile_name: str = "",
        skip_whole_step: bool = False,
    ):
        """``pattern``: one character per model evaluation of each conditioning, ``1`` = skip (repeats).

        ``sync_debug``: sample with CUDA's sync debug mode on "warn", so every place that makes the
        host wait for the GPU during the run is logged once (a maintainers' diagnostic).
        ``decide_ahead`` False: every decision waits for the GPU (the node's input of that name).
        ``profile_name``: the sampling run's host time by Python function (cProfile) goes to
        ``output/probe/<profile_name>.txt``.
        ``skip_whole_step``: skipped steps run no block (the node's input of that name)."""
        options = model.model_options.get("transformer_options", {})
        holder = options.get(HOLDER_KEY)
        if holder is None:
            raise ValueError("SpeedKitProbe_FBCachePattern needs the MODEL output of SpeedKit_FirstBlockCache")
        patched = model.clone()
        patched.model_options = {**patched.model_options}
        patched.model_options["transformer_options"] = {**options}
        forced = holder.clone()
        forced.force_pattern = tuple(c == "1" for c in pattern.strip()) or None
        forced.decide_ahead = bool(decide_ahead)
        forced.skip_whole_step = bool(skip_whole_step)
        patched.model_options["transformer_options"][HOLDER_KEY] = forced
        if sync_debug or profile_name.strip():
            import comfy.patcher_extension

            outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
            if sync_debug:
                patched.add_wrapper_with_key(outer, "speedkit_probe", _warn_syncs)
            if profile_name.strip():
                patched.add_wrapper_with_key(outer, "speedkit_probe_profile", _profiled(profile_name.strip()))
        return (patched,)


def _profiled(name: str):
    def wrapper(executor, *args, **kwargs):
        import cProfile
        import io
        import pstats

        import folder_paths

        profile = cProfile.Profile()
        profile.enable()
        try:
            return executor(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            profile.disable()
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumulative").print_stats(60)
            folder = Path(folder_paths.get_output_directory()) / "probe"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text(text.getvalue())

    return wrapper


def _warn_syncs(executor, *args, **kwargs):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return executor(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class LatentSink:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node API
        return {"required": {"samples": ("LATENT",)}, "optional": {"save_name": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, samples, save_name: str = ""):
        latent = samples["samples"]
        info = {"shape": list(latent.shape), "finite": bool(torch.isfinite(latent).all())}
        if save_name:
            info["path"] = save_probe_tensor(save_name, "latent", latent)
        return {"ui": {"probe": [info]}}
