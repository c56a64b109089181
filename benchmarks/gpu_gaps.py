"""Where the GPU sits idle in a torch.profiler Chrome trace, and what the host was doing then.

A cache that skips work makes a step partly host-bound: the GPU runs dry while Python prepares
the next kernels. This reads a trace exported with ``with_stack=True`` and attributes every idle
gap between GPU operations to the Python call stack of the launching thread at the gap's middle,
so the host code that starves the GPU is named (file:line of ComfyUI's or our code).

Run on a trace: ``python benchmarks/gpu_gaps.py TRACE.json [--top 20]``; also used by
``fbcache_cost.py --profile-hits``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# frames worth naming: the model code, the sampler, the pack, the benchmark scripts
INTERESTING = ("comfy", "speedkit", "fbcache", "benchmarks", "hooks.py", "holder.py")


def _frames_at(events: list[dict], times: list[float]) -> list[list[str]]:
    """Python frames (outer to inner) open at each of ``times`` (sorted), by one sweep over
    ``events`` (properly nested ``python_function`` intervals of one thread, sorted by start)."""
    out: list[list[str]] = []
    stack: list[tuple[float, str]] = []  # (end, name)
    i = 0
    for t in times:
        while i < len(events) and events[i]["ts"] <= t:
            e = events[i]
            while stack and stack[-1][0] < e["ts"]:
                stack.pop()
            stack.append((e["ts"] + e.get("dur", 0.0), e["name"]))
            i += 1
        while stack and stack[-1][0] < t:
            stack.pop()
        out.append([name for end, name in stack if end >= t])
    return out


def _signature(frames: list[str], depth: int) -> str:
    named = [f for f in frames if any(k in f for k in INTERESTING)]
    tail = named[-depth:] if named else frames[-depth:]
    if frames and (not tail or frames[-1] != tail[-1]):
        tail = tail + [frames[-1]]
    return " > ".join(tail) or "(no python frame)"


def gpu_gaps(trace: Path | dict, min_gap_us: float = 10.0, top: int = 20, depth: int = 3) -> dict:
    """Idle time between GPU operations, grouped by the host's Python stack during the gap."""
    data = json.loads(Path(trace).read_text()) if not isinstance(trace, dict) else trace
    events = [e for e in data.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = Counter(e["tid"] for e in events if e.get("cat") == "cuda_runtime")
    if not gpu or not launches:
        return {"error": "no GPU operations or CUDA runtime calls in the trace"}
    main_tid = launches.most_common(1)[0][0]
    py = sorted(
        (e for e in events if e.get("cat") == "python_function" and e.get("tid") == main_tid), key=lambda e: e["ts"]
    )
    gaps: list[tuple[float, float]] = []
    busy_end = gpu[0]["ts"]
    busy = 0.0
    for e in gpu:
        start, end = e["ts"], e["ts"] + e.get("dur", 0.0)
        if start > busy_end:
            if start - busy_end >= min_gap_us:
                gaps.append((busy_end, start))
        busy += max(0.0, end - max(start, busy_end))
        busy_end = max(busy_end, end)
    span = busy_end - gpu[0]["ts"]
    mids = [(a + b) / 2 for a, b in gaps]
    order = sorted(range(len(mids)), key=mids.__getitem__)
    stacks = _frames_at(py, [mids[k] for k in order])
    per_sig: dict[str, list[float]] = defaultdict(list)
    for k, frames in zip(order, stacks, strict=True):
        a, b = gaps[k]
        per_sig[_signature(frames, depth)].append(b - a)
    # host syncs: runtime calls that wait for the GPU
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and "Synchronize" in e.get("name", "")]
    memcpy_d2h = [e for e in gpu if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")]
    rows = sorted(per_sig.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "gpu_span_ms": round(span / 1e3, 3),
        "gpu_busy_ms": round(busy / 1e3, 3),
        "gpu_idle_ms": round((span - busy) / 1e3, 3),
        "gaps_counted": len(gaps),
        "idle_in_counted_gaps_ms": round(sum(b - a for a, b in gaps) / 1e3, 3),
        "host_sync_calls": len(syncs),
        "device_to_host_copies": len(memcpy_d2h),
        "by_host_stack": [
            {"idle_ms": round(sum(v) / 1e3, 3), "gaps": len(v), "max_us": round(max(v), 1), "stack": sig}
            for sig, v in rows
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--min-gap-us", type=float, default=10.0)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()
    sys.stdout.write(json.dumps(gpu_gaps(args.trace, args.min_gap_us, args.top, args.depth), indent=1) + "\n")


if __name__ == "__main__":
    main()
