"""Benchmark: the upscaler as users get it, inside a live ComfyUI server on the GPU.

One headless ComfyUI (``COMFYUI_ROOT``, started with its own defaults unless ``--server-args``
says otherwise) with the pack and a zero-cost probe output node loaded; API prompts queued
over HTTP; time from the server's own ``execution_start`` -> ``execution_success`` stamps.
ComfyUI's stock ``ImageUpscaleWithModel`` and ``SpeedKit_UpscaleImageCUDA`` (node defaults,
and with ``enable_compile``) run in the same server on the same inputs:

- ``frame_1080p``: RealESRGAN_x4plus, one 1920x1080 frame from LoadImage -> 7680x4320;
- ``batch_540p``: RealESRGAN_x4plus, LoadImage -> RepeatImageBatch(30) 960x540 -> 4K;
- ``anime_1080p``: realesr-animevideov3, LoadImage -> RepeatImageBatch(30) 1080p -> 8K.

Each graph ends in the probe sink (no PNG encoding, which would dominate both columns);
LoadImage and RepeatImageBatch are part of every column. Each repeat loads a new copy of the
input file, so LoadImage and everything after it runs again while the model loader stays
cached (what a user re-running a graph on a new picture gets). The first run of each method
(model upload, cuDNN autotuning, compiling) is reported apart; the table shows medians.

Also measured in the same run: the same graph without the upscale node (what LoadImage and
the sink cost), the engine alone in this process (labelled engine-only), the server's host
memory over a 300-frame 540p -> 4K batch (``--rss-frames``), and fidelity on a real photo
against a whole-image fp32 reference (mean / 99.99th percentile abs difference, max 8-bit
difference to stock and where it is).

Usage (from the pack folder, on a CUDA machine with ComfyUI's requirements installed)::

    COMFYUI_ROOT=/path/to/ComfyUI python benchmarks/server_upscale_bench.py --models ../shared/models --out up.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from bench_env import register_pack
from PIL import Image

REPO = register_pack()
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "gpu_server")]

from server_cases import BUNDLED_ANIME, PROBE_NODES, make_photo  # noqa: E402

from comfy_server import ComfyServer, execution_seconds, free_port  # noqa: E402

log = logging.getLogger("server_upscale_bench")
X4 = "RealESRGAN_x4plus.safetensors"
ANIME = BUNDLED_ANIME.name
CASES = {
    # name: (model, height, width, frames)
    "frame_1080p": (X4, 1080, 1920, 1),
    "batch_540p": (X4, 540, 960, 30),
    "anime_1080p": (ANIME, 1080, 1920, 30),
}
METHODS = {
    "stock": ("ImageUpscaleWithModel", {}),
    "ours": ("SpeedKit_UpscaleImageCUDA", {}),
    "ours_compile": ("SpeedKit_UpscaleImageCUDA", {"enable_compile": "enable"}),
    # whole-model compile (longer first run): only when named in --methods
    "ours_compile_whole": ("SpeedKit_UpscaleImageCUDA", {"enable_compile": "enable", "compile_mode": "default"}),
}
DEFAULT_METHODS = ("stock", "ours", "ours_compile")


def graph(image: str, frames: int, model: str, method: str | None, save: str = "") -> dict:
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
    }
    src = ["1", 0]
    if frames > 1:
        g["3"] = {"class_type": "RepeatImageBatch", "inputs": {"image": src, "amount": frames}}
        src = ["3", 0]
    if method is not None:
        kind, extra = METHODS[method]
        g["4"] = {"class_type": kind, "inputs": {"upscale_model": ["2", 0], "image": src, **extra}}
        src = ["4", 0]
    g["9"] = {"class_type": "SpeedKitProbe_ImageSink", "inputs": {"image": src, "save_name": save}}
    return g


class RssSampler:
    """Peak resident memory of a process, sampled from /proc every few milliseconds."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Inputs:
    """Copies of one picture under new names, so every repeat runs LoadImage and what follows."""

    def __init__(self, server: ComfyServer, height: int, width: int) -> None:
        self.server, self.n = server, 0
        self.source = server.input_dir / f"photo_{width}x{height}.png"
        Image.fromarray(make_photo(height, width)).save(self.source)

    def fresh(self) -> str:
        self.n += 1
        name = f"{self.source.stem}_{self.n:03d}.png"
        shutil.copyfile(self.source, self.server.input_dir / name)
        return name


def run_case(server: ComfyServer, name: str, repeats: int, methods: list[str]) -> dict:
    model, h, w, frames = CASES[name]
    inputs = Inputs(server, h, w)
    res: dict = {"case": name, "model": model, "frames": frames, "in": [w, h]}
    times: dict[str, list[float]] = {m: [] for m in ["graph_without_upscale", *methods]}
    for m in ["graph_without_upscale", *methods]:
        entry = server.run_prompt(graph(inputs.fresh(), frames, model, None if m.startswith("graph") else m), 1800)
        res[f"{m}_first_s"] = execution_seconds(entry)
        log.info("%s %s first run %.3f s", name, m, res[f"{m}_first_s"])
    for r in range(repeats):
        for m in ["graph_without_upscale", *methods]:  # interleaved rounds: drift hits every column alike
            entry = server.run_prompt(graph(inputs.fresh(), frames, model, None if m.startswith("graph") else m), 1800)
            times[m].append(execution_seconds(entry))
        log.info("%s round %d: %s", name, r, {m: round(t[-1], 3) for m, t in times.items()})
    for m, t in times.items():
        res[f"{m}_median_s"] = statistics.median(t)
        res[f"{m}_all_s"] = t
    for m in methods:
        res[f"{m}_fps"] = frames / res[f"{m}_median_s"]
        if "stock" in methods and m != "stock":
            res[f"{m}_speedup"] = res["stock_median_s"] / res[f"{m}_median_s"]
    return res


def engine_only(models: Path, name: str, frames: int, h: int, w: int, repeats: int, compile_: bool) -> dict:
    """The engine called directly in this process (CPU frames in, CPU frames out), for the second column."""
    from spandrel import ModelLoader

    from speedkit.upscale_cuda.cache import ModelCache
    from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler

    model = ModelLoader().load_from_file(str(models / name)).eval()
    img = torch.from_numpy(make_photo(h, w)).float().div(255)[None].repeat(frames, 1, 1, 1)
    up = Upscaler(model, UpscaleOptions(compile=compile_), device="cuda", cache=ModelCache())
    with torch.inference_mode():
        up.upscale(img)  # first call: upload, autotune, compile
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out, _rep = up.upscale(img)
            t.append(time.perf_counter() - t0)
            del out
    return {"median_s": statistics.median(t), "all_s": t, "fps": frames / statistics.median(t)}


def rss_run(server: ComfyServer, frames: int) -> dict:
    """Host memory of the server over one long 540p -> 4K batch (ours, node defaults)."""
    inputs = Inputs(server, 540, 960)
    server.free(unload_models=False, free_memory=True)  # drop cached outputs of earlier cases
    server.run_prompt(graph(inputs.fresh(), 1, X4, None), 600)
    sampler = RssSampler(server.pid)
    before = sampler.rss()
    with sampler:
        entry = server.run_prompt(graph(inputs.fresh(), frames, X4, "ours"), 3600)
    out_bytes = frames * 2160 * 3840 * 3 * 4
    in_bytes = frames * 540 * 960 * 3 * 4
    res = {
        "frames": frames,
        "seconds": execution_seconds(entry),
        "rss_before_gb": before / 1e9,
        "rss_peak_gb": sampler.peak / 1e9,
        "output_gb": out_bytes / 1e9,
        "input_batch_gb": in_bytes / 1e9,
        "peak_minus_before_minus_output_gb": (sampler.peak - before - out_bytes) / 1e9,
    }
    res["fps"] = frames / res["seconds"]
    server.free(unload_models=False, free_memory=True)
    return res


def fidelity(server: ComfyServer, models: Path) -> dict:
    """Stock and ours on a real photo vs a whole-image fp32 pass of the same model."""
    from safetensors.torch import load_file
    from spandrel import ModelLoader

    from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler

    inputs = Inputs(server, 1080, 1920)
    name = inputs.fresh()
    outs = {}
    for m in ("stock", "ours"):
        entry = server.run_prompt(graph(name, 1, X4, m, save=f"fidelity_{m}"), 900)
        outs[m] = load_file(entry["outputs"]["9"]["probe"][0]["path"])["image"]
    server.free(unload_models=True, free_memory=True)
    model = ModelLoader().load_from_file(str(models / X4)).eval()
    img = torch.from_numpy(np.asarray(Image.open(server.input_dir / name).convert("RGB"))).float().div(255)[None]
    ref_up = Upscaler(model, UpscaleOptions(precision="fp32", use_autocast=False, cudnn_benchmark=False, tile_size=0))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.inference_mode():
        torch.backends.cuda.matmul.allow_tf32 = False
        ref, rep = ref_up.upscale(img)
    res: dict = {"reference": rep.tile, "image": "scikit-image astronaut (real photo) resized to 1920x1080"}
    for m, out in outs.items():
        d = (out - ref).abs().flatten()
        res[f"{m}_vs_fp32_mean"] = float(d.mean())
        res[f"{m}_vs_fp32_p9999"] = float(torch.quantile(d[:: max(1, d.numel() // 16_000_000)].double(), 0.9999))
        res[f"{m}_vs_fp32_max"] = float(d.max())
    q = {m: (o * 255).round().to(torch.int16) for m, o in outs.items()}
    d8 = (q["ours"] - q["stock"]).abs()
    idx = int(d8.flatten().argmax())
    _, hh, ww, cc = d8.shape
    res["max_8bit_diff_to_stock"] = int(d8.max())
    res["max_8bit_diff_at_xyc"] = [idx // cc % ww, idx // (cc * ww) % hh, idx % cc]
    res["pixels_differing_8bit_pct"] = float((d8 > 0).float().mean() * 100)
    return res


def table(results: list[dict]) -> str:
    lines = [
        "| case | stock | ours (defaults) | ours (enable_compile) | ours (compile_mode default) | graph without upscale "
        "| engine-only ours / compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:

        def cell(m: str, r: dict = r) -> str:
            if f"{m}_median_s" not in r:
                return "-"
            s = f"{r[f'{m}_median_s']:.3f} s"
            if f"{m}_speedup" in r:
                s += f" ({r[f'{m}_speedup']:.2f}x)"
            if r["frames"] > 1:
                s += f", {r[f'{m}_fps']:.1f} fps"
            return s + f"; first {r[f'{m}_first_s']:.2f} s"

        eng = r.get("engine", {})
        e = " / ".join(f"{eng[k]['median_s']:.3f} s" for k in ("eager", "compiled") if k in eng) or "-"
        lines.append(
            f"| {r['case']} ({r['frames']} x {r['in'][0]}x{r['in'][1]}, {r['model']}) | {cell('stock')} | "
            f"{cell('ours')} | {cell('ours_compile')} | {cell('ours_compile_whole')} | "
            f"{r['graph_without_upscale_median_s']:.3f} s | {e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=REPO.parent / "shared" / "models")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rss-frames", type=int, default=300, help="0 skips the host-memory run")
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--no-engine", action="store_true")
    ap.add_argument("--server-args", default="", help="extra ComfyUI flags, e.g. '--disable-dynamic-vram'")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(os.environ["COMFYUI_ROOT"])
    work = args.work or Path(tempfile.mkdtemp(prefix="speedkit-bench-"))
    server = ComfyServer(
        root=root, work=work, port=free_port(), cpu=False,
        extra_args=tuple(args.server_args.split()), extra_nodes=(PROBE_NODES,),
    )  # fmt: skip
    ups = server.models_dir / "upscale_models"
    ups.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.models / X4, ups / X4)
    shutil.copyfile(BUNDLED_ANIME, ups / ANIME)
    server.start()
    results: list[dict] = []
    extra: dict = {}
    methods = args.methods.split(",")
    try:
        stats = server.get("/system_stats")
        extra["system"] = stats.get("system", {})
        extra["devices"] = stats.get("devices", [])
        extra["server_args"] = args.server_args
        for name in args.cases.split(","):
            res = run_case(server, name, args.repeats, methods)
            results.append(res)
            log.info("%s: %s", name, json.dumps({k: v for k, v in res.items() if not k.endswith("_all_s")}))
        if args.rss_frames:
            extra["rss"] = rss_run(server, args.rss_frames)
            log.info("rss: %s", extra["rss"])
        if not args.no_fidelity:
            extra["fidelity"] = fidelity(server, args.models)
            log.info("fidelity: %s", extra["fidelity"])
    finally:
        server.stop()
        extra["server_log_tail"] = server.log_text()[-3000:]
    if not args.no_engine:
        for res in results:
            model, h, w, frames = CASES[res["case"]]
            res["engine"] = {
                "eager": engine_only(args.models if model == X4 else BUNDLED_ANIME.parent, model, frames, h, w,
                                     args.repeats, False),
                "compiled": engine_only(args.models if model == X4 else BUNDLED_ANIME.parent, model, frames, h, w,
                                        args.repeats, True),
            }  # fmt: skip
    print(table(results))  # noqa: T201 - the benchmark's report
    for key in ("rss", "fidelity"):
        if key in extra:
            print(key, json.dumps(extra[key], indent=1))  # noqa: T201
    if args.out:
        args.out.write_text(json.dumps({"results": results, **extra}, indent=1))


if __name__ == "__main__":
    main()
