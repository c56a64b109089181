"""Benchmark: Ultimate SD Upscale and LoRA training as users get them, in a live ComfyUI server.

One headless ComfyUI (``COMFYUI_ROOT``; its own defaults unless ``--server-args`` says
otherwise) with the pack, ssitu's ComfyUI_UltimateSDUpscale v1.7.1 (extracted from
``../shared/reference``) and the test probe nodes loaded. A full-size SDXL checkpoint with
random weights (real SDXL shapes, built once into ``--assets``) is loaded by
CheckpointLoaderSimple; API prompts are queued over HTTP and timed by the server's own
``execution_start`` -> ``execution_success`` stamps. Cases (``--cases``):

- ``usdu``: 1024x1024 photo -> 2048x2048, RealESRGAN_x4plus, 20 steps, denoise 0.3, 512 tiles,
  every other input at each node's default: ssitu's ``UltimateSDUpscale`` and
  ``SpeedKit_UltimateSDUpscale`` (defaults, and ``batch_size=1, cuda_graphs=False`` as the plain
  per-tile path; ``batch_size=4`` as the batched path; ``batching="fast"``, which batches consecutive
  tiles and so changes the picture). The first run of each (model loads) is reported apart; then ``--repeats``
  runs with new seeds. Our default output is compared with our plain path (same seed).
- ``train``: SDXL 1024, rank 32, bf16, 4 images: ComfyUI's ``TrainLoraNode`` (its defaults)
  and ``SpeedKit_TrainLoRA`` (its defaults); the per-step rate is taken from a short and a
  long run after a warm-up run (so loading and caching cancel out).
- ``diag``: ``SpeedKitProbe_SamplerTiming`` (where a sampler call spends its time).

Usage (from the pack folder, on a CUDA machine with ComfyUI's requirements installed)::

    COMFYUI_ROOT=/path/to/ComfyUI python benchmarks/server_usdu_train_bench.py --models ../shared/models \
        --assets /tmp/assets --out usdu_train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from bench_env import register_pack, run_header, server_with_assets
from PIL import Image

REPO = register_pack()
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "gpu_server")]

from server_cases import PROBE_NODES, make_photo  # noqa: E402
from tiny_models import build_sdxl  # noqa: E402

from comfy_server import ComfyServer, execution_seconds, free_port  # noqa: E402

log = logging.getLogger("server_usdu_train_bench")
SDXL = "sdxl_random.safetensors"
X4 = "RealESRGAN_x4plus.safetensors"
SSITU_NAME = "ComfyUI_UltimateSDUpscale-v1.7.1.tar.gz"
# ../shared/reference beside the pack, or .gpu/ where tests/gpu_server/stage_for_device.sh put it
SSITU_TAR = next(
    (p for p in (REPO.parent / "shared" / "reference" / SSITU_NAME, REPO / ".gpu" / SSITU_NAME) if p.is_file()),
    REPO.parent / "shared" / "reference" / SSITU_NAME,
)
USDU = {"steps": 20, "denoise": 0.3, "tile_width": 512, "tile_height": 512, "upscale_by": 2.0}
USDU_METHODS = {
    "ssitu": ("UltimateSDUpscale", {}),
    "ours": ("SpeedKit_UltimateSDUpscale", {}),
    "ours_per_tile": ("SpeedKit_UltimateSDUpscale", {"batch_size": 1, "cuda_graphs": False}),
    "ours_batch4": ("SpeedKit_UltimateSDUpscale", {"batch_size": 4}),
    "ours_eager_batch4": ("SpeedKit_UltimateSDUpscale", {"batch_size": 4, "cuda_graphs": False}),
    # consecutive tiles share a call, all cut before any is pasted back (another picture)
    "ours_fast": ("SpeedKit_UltimateSDUpscale", {"batching": "fast"}),
}


def base_graph() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a detailed photo, sharp"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
    }


def usdu_graph(method: str, image: str, seed: int, save: str = "") -> dict:
    kind, extra = USDU_METHODS[method]
    g = base_graph()
    g["4"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["5"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": X4}}
    g["6"] = {
        "class_type": kind,
        "inputs": {
            "image": ["4", 0],
            "model": ["1", 0],
            "positive": ["2", 0],
            "negative": ["3", 0],
            "vae": ["1", 2],
            "upscale_model": ["5", 0],
            "seed": seed,
            **USDU,
            **extra,
        },
    }
    g["9"] = {"class_type": "SpeedKitProbe_ImageSink", "inputs": {"image": ["6", 0], "save_name": save}}
    return g


def run_usdu(server: ComfyServer, repeats: int, methods: list[str]) -> dict:
    src = server.input_dir / "photo_1024.png"
    Image.fromarray(make_photo(1024, 1024)).save(src)
    res: dict = {"case": "usdu 1024->2048 SDXL", "settings": USDU}
    for method in methods:
        entry = server.run_prompt(usdu_graph(method, src.name, 1000), 3600)
        res[f"{method}_first_s"] = execution_seconds(entry)
        times = []
        for r in range(repeats):
            save = f"usdu_{method}" if r == 0 else ""
            times.append(execution_seconds(server.run_prompt(usdu_graph(method, src.name, 1 + r, save), 3600)))
        res[f"{method}_s"] = times
        log.info("usdu %s: first %.2f s, runs %s", method, res[f"{method}_first_s"], [f"{t:.2f}" for t in times])
    best = {m: min(res[f"{m}_s"]) for m in methods}
    for m in methods:
        if m != "ssitu" and "ssitu" in best:
            res[f"{m}_vs_ssitu"] = best[m] / best["ssitu"]
    probe = server.output_dir / "probe"
    try:
        from safetensors.torch import load_file

        b = load_file(str(probe / "usdu_ours_per_tile.safetensors"))["image"]
        for m in methods:
            if m.startswith("ours") and m != "ours_per_tile":
                a = load_file(str(probe / f"usdu_{m}.safetensors"))["image"]
                label = "ours_default" if m == "ours" else m
                res[f"{label}_vs_per_tile_max_abs"] = float((a - b).abs().max())
                res[f"{label}_vs_per_tile_mean_abs"] = float((a - b).abs().mean())
    except Exception as exc:  # noqa: BLE001 - the comparison is reported, never fatal
        res["compare_error"] = repr(exc)
    return res


# ours: the node's defaults (gradient_checkpointing auto); the others force it on / off
TRAIN_METHODS = ("comfy", "ours", "ours_checkpointing", "ours_no_checkpointing")
CHECKPOINTING = {"ours_checkpointing": "on", "ours_no_checkpointing": "off"}


def train_graphs(method: str, steps: int, dataset: Path, name: str) -> dict:
    g = base_graph()
    if method == "comfy":
        g["4"] = {"class_type": "LoadImage", "inputs": {"image": "train_0.png"}}
        g["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}}
        g["6"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": 4}}
        g["7"] = {
            "class_type": "TrainLoraNode",
            "inputs": {"model": ["1", 0], "latents": ["6", 0], "positive": ["2", 0], "steps": steps, "rank": 32},
        }
        g["8"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["7", 0], "prefix": f"loras/{name}"}}
    else:
        g["7"] = {
            "class_type": "SpeedKit_TrainLoRA",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "dataset_folder": str(dataset),
                "output_name": name,
                "steps": steps,
                "rank": 32,
                "resolution": 1024,
                "precision": "bf16",
                **({"gradient_checkpointing": CHECKPOINTING[method]} if method in CHECKPOINTING else {}),
            },
        }
    return g


def run_train(server: ComfyServer, short: int, long: int, methods: list[str], repeats: int = 1) -> dict:
    dataset = server.input_dir / "train_set"
    dataset.mkdir(exist_ok=True)
    for i in range(4):
        img = Image.fromarray(make_photo(1024, 1024, seed=i % 2)).rotate(90 * i)
        img.save(dataset / f"img_{i}.png")
        (dataset / f"img_{i}.txt").write_text(f"a photo, view {i}")
        img.save(server.input_dir / f"train_{i}.png")
    res: dict = {"case": "train SDXL 1024 rank 32 bf16, 4 images"}
    for method in methods:
        s_short, s_long = (short // 2, long // 4) if method == "comfy" else (short, long)
        n = 0
        res[f"{method}_warmup_s"] = execution_seconds(
            server.run_prompt(train_graphs(method, 2, dataset, f"w_{method}"), 3600)
        )
        rates = []
        for _ in range(repeats):
            n += 1
            t_short = execution_seconds(
                server.run_prompt(train_graphs(method, s_short, dataset, f"s{n}_{method}"), 3600)
            )
            t_long = execution_seconds(server.run_prompt(train_graphs(method, s_long, dataset, f"l{n}_{method}"), 3600))
            rates.append((s_long - s_short) / (t_long - t_short))
            res[f"{method}_runs"] = res.get(f"{method}_runs", []) + [[s_short, t_short], [s_long, t_long]]
        res[f"{method}_it_s"] = max(rates)
        log.info("train %s: %.2f it/s (%s)", method, res[f"{method}_it_s"], res[f"{method}_runs"])
    for m in methods:
        if m != "comfy" and "comfy" in methods:
            res[f"{m}_vs_comfy"] = res[f"{m}_it_s"] / res["comfy_it_s"]
    lines = server.log_text().splitlines()
    res["ours_peak_vram_lines"] = [line for line in lines if "peak VRAM" in line][-3:]
    res["ours_checkpointing_lines"] = [line for line in lines if "gradient_checkpointing auto" in line][-2:]
    return res


def run_diag(server: ComfyServer) -> dict:
    g = base_graph()
    g["4"] = {"class_type": "SpeedKitProbe_SamplerTiming", "inputs": {"model": ["1", 0], "vae": ["1", 2]}}
    entry = server.run_prompt(g, 3600)
    out = entry["outputs"]["4"]["timing"][0]
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO.parent / "shared" / "models")
    parser.add_argument("--assets", type=Path, default=Path(tempfile.gettempdir()) / "speedkit_sdxl_assets")
    parser.add_argument("--cases", default="usdu,train")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--usdu-methods", default=",".join(USDU_METHODS), help="which of " + ", ".join(USDU_METHODS))
    parser.add_argument("--train-methods", default=",".join(TRAIN_METHODS), help="which of " + ", ".join(TRAIN_METHODS))
    parser.add_argument("--profile-dir", type=Path, help="SPEEDKIT_PROFILE_DIR for the server (per-op tables)")
    parser.add_argument("--train-steps", default="10,50", help="short,long step counts of our trainer")
    parser.add_argument("--server-args", default="", help="extra ComfyUI arguments, e.g. --disable-dynamic-vram")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the server, e.g. SPEEDKIT_TRAIN_COMPILE=1 (repeatable)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(os.environ["COMFYUI_ROOT"])
    ckpts, ups = args.assets / "checkpoints", args.assets / "upscale_models"
    for d in (ckpts, ups):
        d.mkdir(parents=True, exist_ok=True)
    build_sdxl(root, ckpts / SDXL)
    if not (ups / X4).is_file():
        shutil.copyfile(args.models / X4, ups / X4)
    work = Path(tempfile.mkdtemp(prefix="usdu_train_bench_"))
    ssitu = work / "ssitu"
    with tarfile.open(SSITU_TAR) as tar:
        tar.extractall(ssitu, filter="data")
    ssitu_dir = next(p for p in ssitu.iterdir() if p.is_dir())
    server = server_with_assets(
        ComfyServer,
        root,
        work / "server",
        args.assets,
        ("checkpoints", "upscale_models"),
        free_port(),
        cpu=False,
        extra_args=tuple(args.server_args.split()),
        extra_nodes=(PROBE_NODES, ssitu_dir),
        env={
            **({"SPEEDKIT_PROFILE_DIR": str(args.profile_dir)} if args.profile_dir else {}),
            **dict(item.split("=", 1) for item in args.server_env),
        },
    )
    server.input_dir.mkdir(parents=True, exist_ok=True)
    results = run_header(args.server_args)
    if args.server_env:
        results["server_env"] = args.server_env
    server.start()
    try:
        for case in args.cases.split(","):
            try:
                if case == "diag":
                    results["diag"] = run_diag(server)
                elif case == "usdu":
                    results["usdu"] = run_usdu(server, args.repeats, args.usdu_methods.split(","))
                elif case == "train":
                    short, long = (int(v) for v in args.train_steps.split(","))
                    results["train"] = run_train(server, short, long, args.train_methods.split(","))
            except Exception as exc:  # noqa: BLE001 - one case failing must not hide the others
                log.exception("case %s failed", case)
                results[f"{case}_error"] = repr(exc)[:2000]
            log.info("results so far:\n%s", json.dumps(results, indent=1, default=str))
    finally:
        results["server_alive"] = server.alive()
        server.stop()
        tail = server.log_text()[-8000:]
        results["log_fatal"] = [k for k in ("Fatal Python error", "terminate called") if k in tail]
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))
            (args.out.with_suffix(".log")).write_text(server.log_text()[-200000:])
    log.info("results:\n%s", json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
