"""Benchmark: ComfyUI's stock model upscale vs SpeedKit's engine, same model/image/GPU, one run.

Stock = ComfyUI v0.19.3 ``ImageUpscaleWithModel``: fp32 model through the spandrel
descriptor, 512 px tiles, 32 px overlap, every tile copied to the CPU and feather-blended
there in fp32, one frame at a time. With ``COMFYUI_ROOT`` set and importable, ComfyUI's
own ``comfy.utils.tiled_scale`` is used; otherwise a re-implementation of the same loop
(``stock_tiled_scale`` below; the printed header says which ran).

Usage (from the pack folder, on a CUDA machine)::

    python benchmarks/upscale_cuda_bench.py --models .models --out bench.json

Cases: RealESRGAN_x4plus 1080p->8K (1 frame, steady state over 3 frames), RealESRGAN_x4plus
100 frames 960x540->4K, realesr-animevideov3 1080p->8K (30 frames). For each: stock time,
ours eager and compiled (fp16, whole frames), ratio, fps, peak GPU memory, host peak RSS,
faithfulness vs a whole-image fp32 pass (mean and 99.99th percentile abs diff, NaN/Inf),
first-compile time and (``--warm-probe``) the time a fresh process with the on-disk
inductor cache takes to its first finished frame.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_env import register_pack

REPO = register_pack()

from speedkit.upscale_cuda.cache import ModelCache  # noqa: E402
from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler  # noqa: E402

log = logging.getLogger("upscale_bench")


# ---------------------------------------------------------------------------------------
# Stock ComfyUI algorithm
# ---------------------------------------------------------------------------------------


def stock_tiled_scale(model, frames_bchw: torch.Tensor, tile: int = 512, overlap: int = 32) -> torch.Tensor:
    """ComfyUI v0.19.3's tiled upscale, re-implemented (same tiling, same CPU blend).

    Per frame: tile origins every ``tile - overlap`` px (clamped into the image, the last
    tiles shorter), each tile through ``model(tile.float())`` (the descriptor: pad, run,
    clamp), output moved to the CPU, multiplied by a mask that ramps linearly over
    ``overlap * scale`` px on all four sides ((t+1)/feather), accumulated with the mask
    sum, divided at the end; a frame that fits one tile is run whole.
    """
    s = model.scale
    b, _c, h, w = frames_bchw.shape
    out = torch.empty((b, model.output_channels, h * s, w * s), device="cpu")
    for i in range(b):
        x = frames_bchw[i : i + 1]
        if h <= tile and w <= tile:
            out[i : i + 1] = model(x.float()).to("cpu")
            continue
        acc = torch.zeros((1, model.output_channels, h * s, w * s))
        div = torch.zeros((1, 1, h * s, w * s))
        ys = range(0, h - overlap, tile - overlap) if h > tile else [0]
        xs = range(0, w - overlap, tile - overlap) if w > tile else [0]
        feather = round(overlap * s)
        for y in ys:
            for xx in xs:
                py = max(0, min(h - overlap, y))
                px = max(0, min(w - overlap, xx))
                th, tw = min(tile, h - py), min(tile, w - px)
                ps = model(x[:, :, py : py + th, px : px + tw].float()).to("cpu")
                mask = torch.ones((1, 1, th * s, tw * s))
                for dim in (2, 3):
                    if feather >= mask.shape[dim]:
                        continue
                    for t in range(feather):
                        f = (t + 1) / feather
                        mask.narrow(dim, t, 1).mul_(f)
                        mask.narrow(dim, mask.shape[dim] - 1 - t, 1).mul_(f)
                acc[:, :, py * s : (py + th) * s, px * s : (px + tw) * s] += ps * mask
                div[:, :, py * s : (py + th) * s, px * s : (px + tw) * s] += mask
        out[i : i + 1] = acc / div
    return out


def comfy_tiled_scale():
    """ComfyUI's own ``tiled_scale`` when COMFYUI_ROOT is set and importable, else None."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        return None
    try:
        sys.path.insert(0, root)  # benchmark script only; the pack never edits sys.path
        import comfy.utils

        return comfy.utils.tiled_scale
    except Exception as exc:  # ComfyUI's deps (einops, comfy_aimdo...) may be missing on a bare GPU box
        log.warning("could not import ComfyUI from %s (%s); using the re-implementation", root, exc)
        return None


def run_stock(model, image_bhwc: torch.Tensor, device: torch.device, tiled_scale) -> torch.Tensor:
    """The stock node's execute(): model to GPU in fp32, tiled scale, clamp, back to CPU."""
    model.to(device)
    try:
        x = image_bhwc.movedim(-1, -3).to(device)
        if tiled_scale is not None:
            s = tiled_scale(
                x,
                lambda a: model(a.float()),
                tile_x=512,
                tile_y=512,
                overlap=32,
                upscale_amount=model.scale,
                output_device="cpu",
            )
        else:
            s = stock_tiled_scale(model, x)
    finally:
        model.to("cpu")
    return torch.clamp(s.movedim(-3, -1), 0, 1)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def test_image(height: int, width: int, frames: int = 1, seed: int = 0) -> torch.Tensor:
    """Deterministic photo-like content (smooth shading, hard edges, fine texture)."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, height)[:, None]
    xx = torch.linspace(0, 1, width)[None, :]
    out = []
    for f in range(frames):
        phase = 0.05 * f
        base = torch.stack(
            [
                0.5 + 0.35 * torch.sin(6.0 * xx + 3.0 * yy + phase),
                0.5 + 0.35 * torch.cos(4.0 * yy - 2.0 * xx + phase),
                0.5 + 0.3 * torch.sin(9.0 * (xx * yy) + phase),
            ],
            dim=-1,
        )
        for _ in range(24):
            y0, x0 = (
                int(torch.randint(0, height - 8, (1,), generator=g)),
                int(torch.randint(0, width - 8, (1,), generator=g)),
            )
            hh, ww = (
                int(torch.randint(4, height // 4, (1,), generator=g)),
                int(torch.randint(4, width // 4, (1,), generator=g)),
            )
            base[y0 : y0 + hh, x0 : x0 + ww] = torch.rand(3, generator=g)
        base += 0.04 * torch.randn(base.shape, generator=g)
        out.append(base.clamp(0, 1))
    return torch.stack(out).contiguous()


def diff_stats(ours: torch.Tensor, ref: torch.Tensor, device: torch.device) -> dict:
    """Mean, 99.99th percentile and max abs difference, computed on the GPU frame by frame."""
    total, count, worst, bad = 0.0, 0, 0.0, 0
    p9999 = 0.0
    for i in range(ref.shape[0]):
        a = ours[i].to(device, torch.float32)
        b = ref[i].to(device, torch.float32)
        bad += int((~torch.isfinite(a)).sum())
        d = (a - b).abs().flatten()
        total += float(d.sum(dtype=torch.float64))
        count += d.numel()
        worst = max(worst, float(d.max()))
        k = max(1, math.ceil(d.numel() * 1e-4))
        p9999 = max(p9999, float(d.topk(k).values.min()))
    return {"mean_abs": total / count, "p99_99_abs": p9999, "max_abs": worst, "nonfinite": bad}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def load(models: Path, name: str):
    from spandrel import ModelLoader

    path = models / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: copy the real weights there (see ../shared/models)")
    return ModelLoader().load_from_file(str(path)).eval()


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------


def run_case(
    name: str,
    model,
    frames: torch.Tensor,
    device: torch.device,
    stock_frames: int,
    tiled_scale,
    compile_modes: list[str],
    reference: bool,
    cache: ModelCache,
) -> dict:
    res: dict = {"case": name, "frames": frames.shape[0], "in": list(frames.shape[1:3])}
    log.info("== %s: %d frame(s) %s", name, frames.shape[0], tuple(frames.shape[1:3]))
    # Stock, on the first `stock_frames` frames (per-frame time; it is linear in frames).
    stock_in = frames[:stock_frames]
    run_stock(model, stock_in[:1, :256, :256], device, tiled_scale)  # warm-up: CUDA/cuDNN init
    stock_out, t = timed(lambda: run_stock(model, stock_in, device, tiled_scale), device)
    res["stock_s_per_frame"] = t / stock_in.shape[0]
    log.info("stock: %.3f s/frame (%d frame(s))", res["stock_s_per_frame"], stock_in.shape[0])

    ref = None
    if reference:
        # cuDNN autotuning of fp32 8K convs takes ~45 s and is irrelevant for a reference.
        ref_opts = UpscaleOptions(precision="fp32", use_autocast=False, cudnn_benchmark=False)
        up = Upscaler(model, ref_opts, device=device, cache=cache)
        with torch.backends.cudnn.flags(enabled=device.type == "cuda", allow_tf32=False):
            ref, t = timed(lambda: up.upscale(stock_in)[0], device)
        log.info("fp32 whole-image reference: %.3f s/frame", t / stock_in.shape[0])
        res["stock_vs_ref"] = diff_stats(stock_out, ref, device)
    del stock_out

    for mode in ["eager", "eager_biased_convs", *compile_modes]:
        if mode.startswith("eager"):
            # eager_biased_convs: cuDNN's fused conv+bias, to show what splitting the bias gains
            opts = UpscaleOptions(split_bias=mode == "eager")
        else:
            opts = UpscaleOptions(compile=True, compile_mode=mode)
        up = Upscaler(model, opts, device=device, cache=cache)
        # First call: compiles (or autotunes cuDNN) for this frame shape.
        # (enough frames to use the run's batch size, so the timed run compiles nothing new)
        _, first = timed(lambda up=up: up.upscale(frames[:8]), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        (out, report), t = timed(lambda up=up: up.upscale(frames), device)
        peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0
        entry = {
            "backend": report.backend,
            "precision": report.precision,
            "tiles": report.tile,
            "batch": report.batch,
            "first_call_s": first,
            "s_per_frame": t / frames.shape[0],
            "fps": frames.shape[0] / t,
            "speedup_vs_stock": res["stock_s_per_frame"] / (t / frames.shape[0]),
            "peak_gpu_gb": peak,
            "host_max_rss_gb": max_rss_gb(),
        }
        if ref is not None:
            entry["vs_fp32_whole"] = diff_stats(out[: ref.shape[0]], ref, device)
        res[mode] = entry
        log.info("%s: %s", mode, json.dumps(entry))
        del out
    return res


def warm_probe(args, mode: str) -> dict:
    """Time a fresh process (a restarted ComfyUI) compiling RRDB 1080p with the disk cache
    the in-process run filled."""
    cmd = [sys.executable, __file__, "--probe", "--models", str(args.models), "--compile-mode", mode]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": proc.stderr[-2000:]}
    data = json.loads(line[6:])
    data["process_wall_s"] = wall
    return data


def probe(args) -> None:
    """Child process: load, compile (from the disk cache), upscale one 1080p frame."""
    t0 = time.perf_counter()
    device = torch.device("cuda")
    model = load(args.models, "RealESRGAN_x4plus.safetensors")
    frame = test_image(1080, 1920)
    up = Upscaler(model, UpscaleOptions(compile=True, compile_mode=args.compile_mode), device=device)
    t1 = time.perf_counter()
    up.upscale(frame)
    t2 = time.perf_counter()
    up.upscale(frame)
    t3 = time.perf_counter()
    sys.stdout.write(
        "PROBE "
        + json.dumps({"import_and_load_s": t1 - t0, "first_frame_s": t2 - t1, "second_frame_s": t3 - t2})
        + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_models = REPO / ".models" if (REPO / ".models").is_dir() else REPO.parent / "shared" / "models"
    ap.add_argument("--models", type=Path, default=default_models, help="folder with the real weights")
    ap.add_argument("--cases", default="rrdb_1080p,rrdb_540p_x100,compact_1080p")
    ap.add_argument("--compile-mode", default="regional,default", help="comma-separated: regional,default,...")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--warm-probe", action="store_true", help="also time a fresh process with the disk cache warm")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script, not speed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.probe:
        probe(args)
        return
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("this benchmark needs a CUDA GPU (--smoke runs tiny sizes on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k = 10 if args.smoke else 1  # --smoke: every side 10x smaller
    n100 = 10 if args.smoke else 100
    tiled_scale = comfy_tiled_scale()
    header = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "stock": "ComfyUI comfy.utils.tiled_scale" if tiled_scale else "re-implementation of ComfyUI's loop",
        "inductor_cache": os.environ.get("SPEEDKIT_CACHE_DIR", "default user cache"),
    }
    log.info("%s", json.dumps(header))
    modes = [] if args.no_compile else args.compile_mode.split(",")
    cache = ModelCache(max_models=2)
    results: dict = {"header": header, "cases": []}
    wanted = args.cases.split(",")
    if "rrdb_1080p" in wanted:
        model = load(args.models, "RealESRGAN_x4plus.safetensors")
        results["cases"].append(
            run_case(
                "RealESRGAN_x4plus 1080p->8K",
                model,
                test_image(1080 // k, 1920 // k, 3),
                device,
                1,
                tiled_scale,
                modes,
                True,
                cache,
            )
        )
    if "rrdb_540p_x100" in wanted:
        model = load(args.models, "RealESRGAN_x4plus.safetensors")
        results["cases"].append(
            run_case(
                "RealESRGAN_x4plus 100x 960x540->4K",
                model,
                test_image(540 // k, 960 // k, n100),
                device,
                3,
                tiled_scale,
                modes,
                True,
                cache,
            )
        )
    if "compact_1080p" in wanted:
        model = load(args.models, "realesr-animevideov3-x4.safetensors")
        results["cases"].append(
            run_case(
                "animevideov3 30x 1080p->8K",
                model,
                test_image(1080 // k, 1920 // k, 30 // k * 3 if k > 1 else 30),
                device,
                1,
                tiled_scale,
                modes,
                True,
                cache,
            )
        )
    if args.warm_probe and "rrdb_1080p" in wanted:
        for mode in modes:
            results[f"warm_process_{mode}"] = warm_probe(args, mode)
            log.info("warm process (%s): %s", mode, json.dumps(results[f"warm_process_{mode}"]))
    text = json.dumps(results, indent=1)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
