"""Ultimate SD Upscale: SpeedKit's node vs ssitu's UltimateSDUpscale, one ComfyUI process.

Both nodes get the same objects: an SDXL-shaped diffusion model with random weights
(ComfyUI's own SDXL UNet config, loaded through ``comfy.sd.load_diffusion_model_state_dict``
so it is detected as SDXL), an SD/SDXL-shaped VAE with random weights, random SDXL-shaped
conditioning (77x2048 tokens + 1280 pooled), a real Real-ESRGAN x4 upscale model, and a
synthetic 1024x1024 picture. Defaults follow the issue: 1024 -> 2048, 20 steps, denoise
0.3, 512 px tiles, Linear, no seam fix, cfg 8, euler/normal.

Each configuration runs once to warm up (model loads, cuDNN autotune), then ``--repeats``
times; the table shows the best and median wall time, the ratio to the baseline at
batch 1, and the seam-visibility ratio (``usdu.metrics``) of each output on the same grid.

Run (ComfyUI's Python files on PYTHONPATH; the baseline checkout is not part of the repo):

    PYTHONPATH=$COMFYUI_ROOT python benchmarks/usdu_bench.py \
        --baseline .models/usdu_baseline/ComfyUI_UltimateSDUpscale \
        --upscale-model .models/RealESRGAN_x4plus.safetensors

``--tiny`` runs a short CPU smoke version (tiny SD1.5-shaped model, 64 -> 128, 64 px tiles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from bench_env import stub_pyav

REPO = Path(__file__).resolve().parents[1]


def say(message: str) -> None:
    """The benchmark's report goes to stdout (ComfyUI's own logging goes to stderr)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


SDXL_UNET = dict(
    use_checkpoint=False,
    image_size=32,
    out_channels=4,
    use_spatial_transformer=True,
    legacy=False,
    num_classes="sequential",
    adm_in_channels=2816,
    in_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    channel_mult=[1, 2, 4],
    transformer_depth_middle=10,
    use_linear_in_transformer=True,
    context_dim=2048,
    num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    use_temporal_attention=False,
    use_temporal_resblock=False,
)
TINY_SD15_UNET = dict(
    use_checkpoint=False,
    image_size=32,
    out_channels=4,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    in_channels=4,
    model_channels=320,
    num_res_blocks=[1, 1],
    transformer_depth=[1, 0],
    channel_mult=[1, 1],
    transformer_depth_middle=0,
    use_linear_in_transformer=False,
    context_dim=768,
    num_heads=8,
    transformer_depth_output=[1, 1, 0, 0],
    use_temporal_attention=False,
    use_temporal_resblock=False,
)
VAE_CONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def random_state_dict(module, device, gen_seed: int = 0) -> dict:
    """Random weights for every tensor of ``module`` (built on the meta device)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(gen_seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.ndim <= 1:
            t = torch.ones(v.shape) if k.endswith("weight") else torch.zeros(v.shape)
        else:
            t = (torch.randn(v.shape, generator=gen, device=device, dtype=torch.float16) * 0.02).cpu()
        out[k] = t.to(torch.float16).contiguous()
    return out


def build_model(tiny: bool, device: str):
    import comfy.ops
    import comfy.sd
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = TINY_SD15_UNET if tiny else SDXL_UNET
    unet = UNetModel(**cfg, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    model = comfy.sd.load_diffusion_model_state_dict(random_state_dict(unet, device))
    if model is None:
        raise RuntimeError("ComfyUI did not recognise the random UNet")
    return model


def build_vae(device: str):
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4)
    return comfy.sd.VAE(sd=random_state_dict(vae, device, 1))


def build_conditioning(tiny: bool):
    import torch

    gen = torch.Generator().manual_seed(2)
    width, pooled = (768, None) if tiny else (2048, 1280)

    def one():
        extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=gen)}
        return [[torch.randn(1, 77, width, generator=gen), extra]]

    return one(), one()


def test_picture(size: int):
    """A smooth synthetic picture with edges, gradients and fine texture, [1, H, W, 3]."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    r = 0.5 + 0.4 * torch.sin(6.0 * x + 2.0 * y)
    g = 0.5 + 0.4 * torch.cos(4.0 * y - 3.0 * x)
    b = ((x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.08).float() * 0.6 + 0.2
    texture = 0.05 * torch.sin(80.0 * x) * torch.sin(90.0 * y)
    img = torch.stack([r + texture, g - texture, b + texture], dim=-1).clamp(0, 1)
    return img[None].contiguous()


def load_packs(baseline: Path | None):
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(REPO))):
        raise RuntimeError(f"ComfyUI could not load the SpeedKit pack from {REPO}")
    if baseline is not None:
        if not (baseline / "repositories" / "ultimate_sd_upscale" / "scripts").is_dir():
            raise RuntimeError(
                f"{baseline}: the Coyote-A script is missing under repositories/ultimate_sd_upscale "
                "(the baseline would try to download it)"
            )
        if not asyncio.run(nodes.load_custom_node(str(baseline))):
            raise RuntimeError(f"ComfyUI could not load the baseline from {baseline}")
    return nodes.NODE_CLASS_MAPPINGS


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return out, times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, default=REPO / ".models/usdu_baseline/ComfyUI_UltimateSDUpscale")
    ap.add_argument("--upscale-model", type=Path, default=REPO / ".models/RealESRGAN_x4plus.safetensors")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--upscale-by", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--denoise", type=float, default=0.3)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch-sizes", default="1,4,8", help="our tile batch sizes to time")
    ap.add_argument("--baseline-batch-sizes", default="1", help="the baseline's batch sizes to time")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--eager-batch-sizes", default="1", help="our batch sizes to also time with cuda_graphs off (same-run diff)"
    )
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny SD1.5-shaped model, 64 -> 128")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()

    from comfy.cli_args import args as comfy_args

    if a.tiny:
        comfy_args.cpu = True
        a.size, a.steps, a.tile = min(a.size, 64), min(a.steps, 2), min(a.tile, 64)
    stub_pyav()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import comfy.model_management as mm
    import spandrel
    import torch
    import utils.extra_config  # noqa: F401  (must precede `nodes`: ComfyUI's own import order)

    with torch.inference_mode():  # what ComfyUI's executor wraps every node in
        return run(a, comfy_args, mm, spandrel, torch)


def run(a, comfy_args, mm, spandrel, torch) -> int:
    device = "cpu" if a.tiny else "cuda"
    classes = load_packs(None if a.no_baseline else a.baseline)
    pack = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(REPO / "__init__.py"))
    metrics = sys.modules.get(pack.__name__ + ".usdu.metrics") or __import__(
        pack.__name__ + ".usdu.metrics", fromlist=["seam_visibility_ratio"]
    )
    ours_sampling = sys.modules[pack.__name__ + ".nodes.usdu_sampling"]

    t0 = time.perf_counter()
    model = build_model(a.tiny, device)
    vae = build_vae(device)
    positive, negative = build_conditioning(a.tiny)
    upscaler = spandrel.ModelLoader().load_from_file(str(a.upscale_model))
    image = test_picture(a.size)
    say(f"setup {time.perf_counter() - t0:.1f} s; device {mm.get_torch_device()}; torch {torch.__version__}")
    say(
        f"model {type(model.model).__name__}, VAE random SD-shaped, upscaler {upscaler.architecture.name} "
        f"x{upscaler.scale} ({a.upscale_model.name}); {a.size} -> {round(a.size * a.upscale_by)}, "
        f"{a.steps} steps, denoise {a.denoise}, tile {a.tile}"
    )

    common = dict(
        model=model,
        positive=positive,
        negative=negative,
        vae=vae,
        upscale_by=a.upscale_by,
        seed=1,
        steps=a.steps,
        cfg=8.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=a.denoise,
        upscale_model=upscaler,
        mode_type="Linear",
        tile_width=a.tile,
        tile_height=a.tile,
        mask_blur=8,
        tile_padding=32,
        seam_fix_mode="None",
        seam_fix_denoise=1.0,
        seam_fix_width=64,
        seam_fix_mask_blur=8,
        seam_fix_padding=16,
        force_uniform_tiles=True,
        tiled_decode=False,
    )
    results = []

    def record(name, batch, out, times, ref=None):
        sv = metrics.seam_visibility_ratio(out.float().cpu(), a.tile, a.tile)
        row = {
            "node": name,
            "batch_size": batch,
            "best_s": min(times),
            "median_s": statistics.median(times),
            "times_s": times,
            "seam_visibility_ratio": sv,
            "shape": list(out.shape),
        }
        results.append(row)
        if a.json is not None:  # written after every run, so a timeout keeps what was measured
            a.json.write_text(json.dumps({"partial": True, "results": results}, indent=2))
        say(
            f"{name:<28} batch {batch:>2}: best {row['best_s']:7.2f} s  median {row['median_s']:7.2f} s  "
            f"seam ratio {sv:.3f}",
        )

    def attempt(name, bs, fn):
        """Time one configuration; a failure is reported and the next one still runs."""
        try:
            out, times = run_timed(fn, a.repeats)
        except Exception as exc:  # noqa: BLE001 - reported, then the benchmark goes on
            logging.exception("%s batch %d failed", name, bs)
            results.append({"node": name, "batch_size": bs, "error": f"{type(exc).__name__}: {exc}"})
            return
        record(name, bs, out, times)
        outs[(name, bs)] = out

    outs: dict = {}
    if not a.no_baseline:
        theirs = classes["UltimateSDUpscale"]()
        for bs in [int(b) for b in a.baseline_batch_sizes.split(",") if b]:
            attempt(
                "ssitu UltimateSDUpscale", bs, lambda bs=bs: theirs.upscale(image=image, batch_size=bs, **common)[0]
            )
    ours = classes["SpeedKit_UltimateSDUpscale"]
    runs = [(int(b), True) for b in a.batch_sizes.split(",") if b]
    runs += [(int(b), False) for b in a.eager_batch_sizes.split(",") if b]
    for bs, graphs in runs:
        attempt(
            "SpeedKit UltimateSDUpscale" + ("" if graphs else " (no graphs)"),
            bs,
            lambda bs=bs, graphs=graphs: (
                ours.PREPARE_CLASS_CLONE({"hidden_inputs": {}})
                .execute(image=image, batch_size=bs, normalize="off", tile_seed="same", cuda_graphs=graphs, **common)
                .args[0]
            ),
        )
        eager = outs.get(("SpeedKit UltimateSDUpscale (no graphs)", bs))
        graphed = outs.get(("SpeedKit UltimateSDUpscale", bs))
        if eager is not None and graphed is not None:
            diff = (eager.float() - graphed.float()).abs()
            say(
                f"  cuda_graphs on vs off, batch {bs}: max |diff| {diff.max().item():.2e}, mean {diff.mean().item():.2e}"
            )
            results[-1]["graphs_vs_eager_max_abs"] = diff.max().item()

    # Where the time goes: the upscale stage alone (ComfyUI's node + PIL-free resize vs ours).
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

    _, t_core = run_timed(lambda: ImageUpscaleWithModel.execute(upscaler, image).args[0], a.repeats)
    fn = ours_sampling.make_model_fn(upscaler)
    _, t_ours = run_timed(lambda: fn(image.to(mm.get_torch_device())), a.repeats)
    say(f"upscale stage only: ComfyUI ImageUpscaleWithModel {min(t_core):.2f} s, ours {min(t_ours):.2f} s")

    base = next((r for r in results if r["node"].startswith("ssitu") and r["batch_size"] == 1 and "best_s" in r), None)
    if base is not None:
        say("\nratio to ssitu batch 1 (best of runs; target <= 0.80 at batch 1):")
        for r in (r for r in results if "best_s" in r):
            r["ratio_to_baseline_b1"] = r["best_s"] / base["best_s"]
            say(f"  {r['node']:<28} batch {r['batch_size']:>2}: {r['ratio_to_baseline_b1']:.3f}x")
    summary = {
        "device": str(mm.get_torch_device()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(a).items() if not isinstance(v, Path)},
        "upscale_stage_s": {"comfy_ImageUpscaleWithModel": min(t_core), "ours": min(t_ours)},
        "results": results,
    }
    if a.json is not None:
        a.json.write_text(json.dumps(summary, indent=2))
    return 0 if all("best_s" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
