"""Checkpoints with random weights and real architectures, built from ComfyUI's own classes.

Built in a child process of ComfyUI's Python (``COMFYUI_PYTHON`` or this one) with
``COMFYUI_ROOT`` as its working directory, so the keys are exactly what ComfyUI writes and
detects. Shared by the integration tier (tiny SD1.5 for CPU runs) and the GPU server tier
and benchmarks (full-size SDXL shapes, built on the GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_RANDOM_SD = """
import torch

def random_sd(module, prefix, dtype=torch.float16, gen=None):
    out = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            t = torch.zeros(v.shape, dtype=v.dtype) if v.device.type == "meta" else v.to("cpu")
        elif v.ndim <= 1:
            t = torch.ones(v.shape) if k.endswith("weight") else torch.zeros(v.shape)
        else:
            t = torch.randn(v.shape, generator=gen, device=gen.device if gen is not None else "cpu") * 0.02
        out[prefix + k] = t.to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
    return out
"""

TINY_SD15_SCRIPT = _RANDOM_SD + textwrap.dedent(
    """
    import sys
    from comfy.cli_args import args
    args.cpu = True
    import comfy.ops, comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    gen = torch.Generator().manual_seed(0)
    unet = UNetModel(
        use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
        num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 0], transformer_depth_middle=0,
        transformer_depth_output=[1, 1, 0, 0], use_spatial_transformer=True, legacy=False, adm_in_channels=None,
        use_linear_in_transformer=False, context_dim=768, num_heads=8, use_temporal_attention=False,
        use_temporal_resblock=False, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init,
    )
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4, decoder_ddconfig=dict(ddconfig, ch=32))
    clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    sd = {}
    sd.update(random_sd(unet, "model.diffusion_model.", gen=gen))
    sd.update(random_sd(vae, "first_stage_model.", gen=gen))
    sd.update(random_sd(clip, "cond_stage_model.", gen=gen))
    save_file(sd, sys.argv[1])
    up = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2)
    save_file(random_sd(up, "", torch.float32, gen=gen), sys.argv[2])
    """
)

SDXL_SCRIPT = _RANDOM_SD + textwrap.dedent(
    """
    # Full-size SDXL base shapes (UNet 2.6B, CLIP-L + OpenCLIP bigG, SDXL VAE), random weights,
    # saved through ComfyUI's own SDXL key conversion so CheckpointLoaderSimple detects it as SDXL.
    import sys
    import comfy.ops, comfy.sdxl_clip, comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    config = comfy.supported_models.SDXL(dict(unet_config))
    unet = UNetModel(**unet_config, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd = config.process_unet_state_dict_for_saving(random_sd(unet, "", gen=gen))
    sd.update(config.process_clip_state_dict_for_saving(random_sd(clip, "", gen=gen)))
    sd.update(config.process_vae_state_dict_for_saving(random_sd(vae, "", gen=gen)))
    save_file(sd, sys.argv[1])
    print(f"SDXL random checkpoint: {len(sd)} tensors, {sum(t.numel() for t in sd.values()) / 1e9:.2f} B parameters")
    """
)


DIT_SCRIPT = _RANDOM_SD + textwrap.dedent(
    """
    # A diffusion model alone (what UNETLoader loads), random weights, keys as the original
    # checkpoints have them: Flux.1-dev shapes (19 double + 38 single blocks, hidden 3072) or
    # Wan 2.1 14B text-to-video shapes (40 blocks, dim 5120); "tiny" keeps what ComfyUI's model
    # detection needs (Flux: hidden 3072) and cuts the rest.
    import sys
    if not torch.cuda.is_available():
        from comfy.cli_args import args
        args.cpu = True
    import comfy.ops
    from safetensors.torch import save_file

    family, size, path = sys.argv[1], sys.argv[2], sys.argv[3]
    tiny = size == "tiny"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    ops = comfy.ops.disable_weight_init
    if family == "flux":
        from comfy.ldm.flux.model import Flux
        model = Flux(
            image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768,
            context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1 if tiny else 19,
            depth_single_blocks=1 if tiny else 38, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
            guidance_embed=True, txt_ids_dims=[], dtype=torch.bfloat16, device="meta", operations=ops,
        )
    elif family == "wan":
        from comfy.ldm.wan.model import WanModel
        dim, layers = (256, 2) if tiny else (5120, 40)
        model = WanModel(
            model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=dim, ffn_dim=dim * 27 // 10,
            freq_dim=256, text_dim=4096, out_dim=16, num_heads=dim // 128, num_layers=layers,
            dtype=torch.bfloat16, device="meta", operations=ops,
        )
    else:
        raise SystemExit(f"unknown family {family}")
    sd = random_sd(model, "", dtype=torch.bfloat16, gen=gen)
    save_file(sd, path)
    print(f"{family} random diffusion model: {sum(t.numel() for t in sd.values()) / 1e9:.2f} B parameters")
    """
)


def _run_in_comfy(comfy_root: Path, script: str, *args: Path | str, timeout: float = 900) -> str:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run(
        [python, "-c", script, *map(str, args)], cwd=comfy_root, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building models failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def build_models(comfy_root: Path, ckpt: Path, upscaler: Path) -> None:
    """A tiny random SD1.5 checkpoint (``ckpt``) and a random 2x Compact upscaler (``upscaler``)."""
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    upscaler.parent.mkdir(parents=True, exist_ok=True)
    _run_in_comfy(comfy_root, TINY_SD15_SCRIPT, ckpt, upscaler)


def build_dit(comfy_root: Path, family: str, path: Path, tiny: bool = False) -> Path:
    """A Flux-size (``flux``) or Wan 2.1 14B-size (``wan``) diffusion model with random weights at
    ``path`` (reused when it exists); ``tiny`` for CPU runs."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        _run_in_comfy(comfy_root, DIT_SCRIPT, family, "tiny" if tiny else "full", partial, timeout=3600)
        partial.replace(path)
    return path


def build_sdxl(comfy_root: Path, ckpt: Path) -> Path:
    """A full-size SDXL checkpoint with random weights at ``ckpt`` (reused when it exists)."""
    if not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        partial = ckpt.with_suffix(".partial")
        _run_in_comfy(comfy_root, SDXL_SCRIPT, partial)
        partial.replace(ckpt)
    return ckpt
