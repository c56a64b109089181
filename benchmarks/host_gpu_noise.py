"""How steady this machine is: GPU math, kernel-launch rate and plain Python, each timed repeatedly.

Step timings of a host-bound model (ComfyUI's SDXL UNet launches ~2000 small kernels per call)
follow the CPU, so before trusting a speedup measured on a shared machine, check how much the
same fixed work varies between repetitions. Prints mean / min / max and the coefficient of
variation of each probe, plus the CPU quota the process sees.

Run: ``python benchmarks/host_gpu_noise.py [--repeats 10]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

logger = logging.getLogger("host_gpu_noise")


def _stats(times: list[float]) -> dict:
    mean = statistics.mean(times)
    return {
        "mean_ms": round(mean * 1e3, 3),
        "min_ms": round(min(times) * 1e3, 3),
        "max_ms": round(max(times) * 1e3, 3),
        "cv_pct": round(100 * statistics.pstdev(times) / mean, 2) if mean else 0.0,
    }


def _timed(fn, repeats: int, sync: bool) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def cpu_quota() -> dict:
    info: dict = {"os_cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        p = Path(path)
        if p.exists():
            info[path] = p.read_text().strip()
    try:
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        model = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu_model"] = model[0].split(":", 1)[1].strip() if model else "?"
    except OSError:
        pass
    info["torch_threads"] = torch.get_num_threads()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res: dict = {"cpu": cpu_quota()}

    def python_loop() -> None:
        total = 0
        for i in range(2_000_000):
            total += i & 7

    res["python_loop_2M"] = _stats(_timed(python_loop, args.repeats, sync=False))
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

        def gemm() -> None:
            for _ in range(50):
                torch.mm(a, b)

        g = _timed(gemm, args.repeats, sync=True)
        res["gpu_gemm_8192_x50"] = _stats(g)
        res["gpu_gemm_tflops_mean"] = round(50 * 2 * 8192**3 / statistics.mean(g) / 1e12, 1)
        x = torch.zeros(1, device=dev)

        def launches() -> None:
            for _ in range(5000):
                x.add_(1)

        res["launch_5000_tiny_kernels"] = _stats(_timed(launches, args.repeats, sync=True))
        res["gpu"] = torch.cuda.get_device_name()
    logger.info("%s", json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
