"""Training curves (from the run's log or TensorBoard files) and GPU status (nvidia-smi)."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .progress import ProgressState


def loss_from_log(path: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, avr_loss) pairs parsed from a musubi console log."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"log_path {str(p)!r} does not exist: use the log written next to the LoRA (<name>_train.log)")
    state = ProgressState()
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            state.feed(line.rstrip("\n"))
    return state.loss_history


EVENT_GLOB = "events.out.tfevents.*"
EPOCH_TAGS = ("loss/epoch",)
"""musubi logs these with step = the 1-based epoch number (trainer_base.py), not the optimizer step."""


def _run_key(logdir: Path, folder: Path) -> str:
    """The run an event-file folder belongs to: its first folder below ``logdir`` ('' = ``logdir`` itself).

    musubi writes ``<logging_dir>/<log_prefix><timestamp>/network_train/events...`` (plus an
    hparams-only sub-folder), so under the trainer's ``logs`` folder each top-level folder is one run.
    """
    parts = folder.relative_to(logdir).parts
    return parts[0] if parts else ""


def _read_scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))  # keeps up to 10000 points per tag, always the last one
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags().get("scalars", [])}


@dataclass
class TensorBoardLog:
    """The scalars of one run under a TensorBoard log folder."""

    runs: list[str]  # runs with scalars under the folder, oldest first ('' = the folder itself)
    run: str  # the run the series come from
    series: dict[str, list[tuple[int, float]]]  # tag -> (step, value), sorted by step


def read_tensorboard(logdir: str | os.PathLike, run: str | None = None) -> TensorBoardLog:
    """Scalar series of one run under ``logdir`` (default: the newest; needs the ``tensorboard`` package).

    Runs are never mixed: the trainer's ``logs`` folder collects one sub-folder per training
    run and their steps restart at 1. A step logged twice (a resumed run) keeps its last value.
    """
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "reading TensorBoard logs needs the tensorboard package in ComfyUI's Python: `pip install tensorboard`"
        )
    root = Path(logdir)
    files = sorted(root.rglob(EVENT_GLOB)) if root.is_dir() else []
    if not files:
        raise ValueError(
            f"tensorboard_dir {str(logdir)!r} holds no TensorBoard event files: train with log_tensorboard on "
            "and give its <output_dir>/logs folder"
        )
    by_run: dict[str, dict[str, list]] = {}
    written: dict[str, float] = {}
    for folder in sorted({f.parent for f in files}):
        scalars = _read_scalars(folder)
        if not scalars:  # e.g. accelerate's hparams-only sub-folder
            continue
        key = _run_key(root, folder)
        for tag, items in scalars.items():
            by_run.setdefault(key, {}).setdefault(tag, []).extend(items)
        stamp = max(f.stat().st_mtime for f in folder.glob(EVENT_GLOB))
        written[key] = max(written.get(key, 0.0), stamp)
    runs = sorted(written, key=lambda k: (written[k], k))
    if not runs:
        raise ValueError(
            f"tensorboard_dir {str(logdir)!r} has event files but no scalars yet: wait for the first steps"
        )
    run = runs[-1] if run is None else run
    if run not in by_run:
        raise ValueError(f"run {run!r} has no scalars under {str(logdir)!r}; runs: {', '.join(runs)}")
    series = {}
    for tag, items in by_run[run].items():
        last: dict[int, float] = {}
        for e in sorted(items, key=lambda e: (e.step, e.wall_time)):
            last[e.step] = e.value
        series[tag] = sorted(last.items())
    return TensorBoardLog(runs=runs, run=run, series=series)


def scalars_from_tensorboard(logdir: str | os.PathLike, run: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of one run under ``logdir`` (see :func:`read_tensorboard`)."""
    return read_tensorboard(logdir, run).series


def split_epoch_series(
    series: dict[str, list[tuple[int, float]]],
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """(per-step series, per-epoch series): they cannot share a step axis in one plot."""
    per_epoch = {k: v for k, v in series.items() if k in EPOCH_TAGS}
    return {k: v for k, v in series.items() if k not in EPOCH_TAGS}, per_epoch


def plot_series(series: dict[str, list[tuple[int, float]]], width: int = 768, height: int = 384) -> np.ndarray:
    """A simple line chart (one colour per series, each scaled to its own range) as uint8 [H, W, 3]."""
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 12, 12, height - 28
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    colours = [(90, 170, 255), (255, 160, 60), (120, 220, 120), (230, 90, 200)]
    points_all = [(s, v) for pts in series.values() for s, v in pts if math.isfinite(v)]
    if not points_all:
        draw.text((left + 8, top + 8), "no data yet", fill=(220, 220, 220))
        return np.asarray(img)
    s_min = min(s for s, _ in points_all)
    s_max = max(max(s for s, _ in points_all), s_min + 1)
    for i, (name, pts) in enumerate(series.items()):
        pts = [(s, v) for s, v in pts if math.isfinite(v)]
        if not pts:
            continue
        v_min, v_max = min(v for _, v in pts), max(v for _, v in pts)
        span = v_max - v_min or 1.0
        xy = [
            (left + (s - s_min) / (s_max - s_min) * (right - left), bottom - (v - v_min) / span * (bottom - top))
            for s, v in pts
        ]
        colour = colours[i % len(colours)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        else:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        draw.text((left + 8, top + 6 + 14 * i), f"{name}: {pts[-1][1]:.4g} ({v_min:.3g}..{v_max:.3g})", fill=colour)
    draw.text((left, bottom + 8), f"step {s_min}", fill=(200, 200, 200))
    draw.text((right - 80, bottom + 8), f"step {s_max}", fill=(200, 200, 200))
    return np.asarray(img)


@dataclass
class GpuStatus:
    index: int
    name: str
    memory_used_mib: float
    memory_total_mib: float
    utilization_pct: float
    temperature_c: float


def nvidia_smi(timeout: float = 15.0, executable: str = "nvidia-smi") -> tuple[list[GpuStatus], list[dict]]:
    """GPUs and compute processes as reported by ``nvidia-smi``.

    Raises ValueError with the fix when nvidia-smi is missing (no NVIDIA driver, or not on PATH).
    """
    exe = shutil.which(executable)
    if exe is None:
        raise ValueError(
            "nvidia-smi was not found: it comes with the NVIDIA driver. Install the driver, or add its folder "
            "to PATH (Windows: C:\\Windows\\System32 holds nvidia-smi.exe). Without an NVIDIA GPU this monitor "
            "has nothing to show"
        )
    query = "index,name,memory.used,memory.total,utilization.gpu,temperature.gpu"
    out = subprocess.run(
        [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise ValueError(f"nvidia-smi failed (code {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    gpus = []
    for row in csv.reader(io.StringIO(out.stdout)):
        if len(row) < 6:
            continue
        idx, name, used, total, util, temp = (c.strip() for c in row[:6])
        gpus.append(GpuStatus(int(idx), name, _f(used), _f(total), _f(util), _f(temp)))
    apps = subprocess.run(
        [exe, "--query-compute-apps=gpu_uuid,pid,process_name,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    procs = []
    if apps.returncode == 0:
        for row in csv.reader(io.StringIO(apps.stdout)):
            if len(row) >= 4:
                procs.append({"pid": row[1].strip(), "name": row[2].strip(), "used_mib": _f(row[3])})
    return gpus, procs


def _f(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")  # "[N/A]" on some GPUs


def format_status(gpus: list[GpuStatus], procs: list[dict]) -> str:
    lines = [
        f"GPU {g.index} {g.name}: {g.memory_used_mib:.0f}/{g.memory_total_mib:.0f} MiB, "
        f"{g.utilization_pct:.0f}% busy, {g.temperature_c:.0f} C"
        for g in gpus
    ]
    lines += [f"  pid {p['pid']} {p['name']}: {p['used_mib']:.0f} MiB" for p in procs]
    return "\n".join(lines) or "no GPU reported"
