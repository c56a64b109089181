"""Benchmark (engine-only): how soon the upscale engine stops after a Cancel, and where the host
sits while it has not yet looked.

The GPU server tier asserts that ComfyUI reports a Cancel within 2 s; when a case fails there,
the server log says how long stopping took once the engine noticed, not how long the engine went
without looking. This script answers that: it runs ``Upscaler.upscale`` on a batch of random
frames, sets the cancel flag from a timer thread after each ``--delays`` value, samples the main
thread's Python stack every 0.1 s until the engine raises, and logs, per delay, the time from the
flag to the stop, the longest stretch between two cancel checks and the stack samples taken in
the wait. Each delay runs in a fresh process by default, so every run includes a first call
(model copy and move, cuDNN autotuning); ``--warm`` runs one short batch first in that process.

Not what a user sees in ComfyUI (no server, no queue); the tier measures that
(``TIER_K="cancel" bash tests/gpu_server/run_settings.sh <setting>``).

Usage (from the pack folder)::

    python benchmarks/cancel_latency.py --model .gpu/models/RealESRGAN_x4plus.safetensors \
        --frames 150 --size 540x960 --delays 0.5 1.0 1.5 2.5
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

log = logging.getLogger("cancel_latency")
SAMPLE_S = 0.1


class Cancelled(Exception):
    """Raised by the cancel check once the flag is set (stands in for ComfyUI's interrupt)."""


def _where(frame) -> str:
    stack = traceback.extract_stack(frame, limit=8)
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))


def run_once(model: str, frames: int, size: tuple[int, int], delay: float, device: str, warm: bool) -> dict:
    """One cancelled run in this process; returns its timings and stack samples."""
    import torch
    from bench_env import register_pack
    from spandrel import ModelLoader

    register_pack()
    from speedkit.upscale_cuda.cache import ModelCache
    from speedkit.upscale_cuda.engine import UpscaleOptions, Upscaler

    descriptor = ModelLoader().load_from_file(model)
    upscaler = Upscaler(descriptor, UpscaleOptions(), device=torch.device(device), cache=ModelCache(max_models=1))
    with torch.inference_mode():
        images = torch.rand(frames, size[0], size[1], 3)
        if warm:
            upscaler.upscale(images[:1])
    checks: list[float] = []
    flag: dict[str, float] = {}
    samples: list[dict] = []
    main = threading.get_ident()

    def check() -> None:
        checks.append(time.perf_counter())
        if "set" in flag:
            raise Cancelled

    def press() -> None:
        time.sleep(delay)
        flag["set"] = time.perf_counter()
        while not checks or checks[-1] < flag["set"]:
            frame = sys._current_frames().get(main)
            if frame is None:
                return
            samples.append({"after_s": round(time.perf_counter() - flag["set"], 3), "host_at": _where(frame)})
            time.sleep(SAMPLE_S)

    start = time.perf_counter()
    threading.Thread(target=press, daemon=True).start()
    try:
        with torch.inference_mode():
            upscaler.upscale(images, check_cancel=check)
        stopped = None
    except Cancelled:
        stopped = time.perf_counter()
    if stopped is None:
        return {"delay_s": delay, "finished_before_cancel": True, "run_s": time.perf_counter() - start}
    gaps = [b - a for a, b in zip([start, *checks[:-1]], checks, strict=True)]
    return {
        "delay_s": delay,
        "cancel_to_stop_s": round(stopped - flag["set"], 3),
        "checks": len(checks),
        "longest_gap_between_checks_s": round(max(gaps), 3),
        "samples_while_waiting": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an upscale model file spandrel can load")
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--size", default="540x960", help="frame height x width")
    parser.add_argument("--delays", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.5])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warm", action="store_true", help="run one frame first in the same process")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # internal: one delay, JSON on stdout
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    if args.one is not None:
        logging.basicConfig(level=logging.WARNING)
        result = run_once(args.model, args.frames, (h, w), args.one, args.device, args.warm)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for delay in args.delays:
        cmd = [sys.executable, __file__, "--model", args.model, "--frames", str(args.frames), "--size", args.size,
               "--device", args.device, "--one", str(delay)] + (["--warm"] if args.warm else [])  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.error("delay %.2f s: the run failed:\n%s", delay, done.stderr[-3000:])
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        if result.get("finished_before_cancel"):
            log.info("delay %.2f s: the run finished first (%.2f s); use more frames", delay, result["run_s"])
            continue
        log.info(
            "delay %.2f s: stopped %.3f s after Cancel; %d checks, longest stretch without one %.3f s",
            delay, result["cancel_to_stop_s"], result["checks"], result["longest_gap_between_checks_s"],
        )  # fmt: skip
        for sample in result["samples_while_waiting"]:
            log.info("  +%.2f s: %s", sample["after_s"], sample["host_at"])
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
