"""Where a USDU run spends its time, per stage (upscale, VAE encode, sampling, VAE decode).

A run of the node can take from seconds to minutes depending on the server's settings (graphs
on or off, dynamic VRAM, tile batching), so the node ends every run with one log line naming
the time of each stage: what a user or maintainer looks at first when a run is slower than
expected. Host time comes from ``time.perf_counter``; on CUDA each stage also records a pair of
events on the current stream, read once at the end (no extra synchronisation while the run
goes), which gives the GPU span of the stage's work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class _Stage:
    calls: int = 0
    host_s: float = 0.0
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)


class StageClock:
    """Accumulates host time and (on CUDA) GPU spans per named stage of one run."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = dev.type == "cuda" and torch.cuda.is_available()
        self.started = time.perf_counter()
        self.stages: dict[str, _Stage] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as one call of stage ``name`` (also when it raises)."""
        st = self.stages.setdefault(name, _Stage())
        begin = end = None
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            st.host_s += time.perf_counter() - t0
            st.calls += 1
            if end is not None and begin is not None:
                end.record()
                st.events.append((begin, end))

    def gpu_seconds(self, name: str) -> float | None:
        """Sum of the GPU spans of stage ``name`` (None without CUDA); synchronises once."""
        st = self.stages.get(name)
        if st is None or not st.events:
            return None
        st.events[-1][1].synchronize()
        return sum(b.elapsed_time(e) for b, e in st.events) / 1000.0

    def summary(self) -> str:
        """``stage N x: host H s[, GPU G s]; ...; run T s`` in the order the stages first ran."""
        parts = []
        for name, st in self.stages.items():
            text = f"{name} {st.calls}x {st.host_s:.2f} s"
            gpu = self.gpu_seconds(name)
            if gpu is not None:
                text += f" (GPU span {gpu:.2f} s)"
            parts.append(text)
        total = time.perf_counter() - self.started
        return "; ".join([*parts, f"whole run {total:.2f} s"])
