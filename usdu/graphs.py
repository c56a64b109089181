"""CUDA-graph replay of a denoiser call whose shapes repeat (tiles of one upscale run).

At one 512-px tile per sampler call, an SDXL UNet step is bound by the host launching its
~2000 kernels, not by the GPU: ssitu's USDU runs 16 tiles at batch 1 in 2.5x the time it
needs at batch 4. A CUDA graph records the kernels of one call once and replays them with a
single launch. A tiled upscale calls the denoiser hundreds of times with a handful of input
shapes (interior, edge and corner tiles), so a few graphs serve the whole run.

Safety rules (any doubt means "run eagerly", never a wrong picture):
- a key (shapes, dtypes, devices of the tensor arguments, the non-tensor arguments) is run
  eagerly the first time and captured the second time, so one-off shapes cost no capture;
- the parameters' storage addresses are recorded at capture and checked before every replay:
  weights that moved (offloading, a LoRA re-patch) invalidate the graphs;
- every capture is preceded by a checked run of the same call that refuses host syncs and,
  under cudaMallocAsync (ComfyUI's default on NVIDIA, where a failed capture would abort the
  process), autograd and operators from outside PyTorch (:func:`torch_utils.checked_run`);
- anything that fails there or during capture disables graphs for the rest of the run with
  one log line, and that call runs eagerly;
- at most ``max_graphs`` graphs, sharing one memory pool; :meth:`GraphRunner.close` frees them;
- a graph's output is copied into buffers made outside the recording, so nothing the recording
  allocated outlives it (under cudaMallocAsync, freeing such memory after the recording makes
  PyTorch print "Attempting uncaptured free of a captured allocation" when the run ends).

This module has no ComfyUI import; the USDU adapter wraps the denoiser call with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..torch_utils import GraphBook

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: Any
    weights: tuple[int, ...]


def _split(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Hashable]:
    """The top-level tensor arguments and a hashable description of everything (the key)."""
    tensors: list[torch.Tensor] = []
    parts: list[Hashable] = []

    def describe(name: Hashable, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            parts.append((name, "T", tuple(value.shape), value.dtype, str(value.device), value.stride()))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, value))
        else:
            raise TypeError(f"argument {name!r} of type {type(value).__name__} cannot be part of a graph key")

    for i, a in enumerate(args):
        describe(i, a)
    for k in sorted(kwargs):
        describe(k, kwargs[k])
    return tensors, tuple(parts)


def _rebuild(args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
    it = iter(tensors)
    new_args = tuple(next(it) if isinstance(a, torch.Tensor) else a for a in args)
    new_kwargs = {k: next(it) if isinstance(kwargs[k], torch.Tensor) else kwargs[k] for k in sorted(kwargs)}
    return new_args, new_kwargs


def _check_output(out: Any) -> None:
    """Refuse outputs other than tensors and (nested) tuples/lists of them, without reading
    their memory: right after a recording, memory the graph allocated may not exist until
    the first replay (cudaMallocAsync maps graph allocations at launch; reading them before
    fails with "invalid argument")."""
    if isinstance(out, (tuple, list)):
        for o in out:
            _check_output(o)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"graph output of type {type(out).__name__} is not supported")


def _copy_output(static: Any, out: Any) -> None:
    """Copy ``out`` into ``static`` (same nesting)."""
    if isinstance(static, torch.Tensor):
        static.copy_(out)
        return
    for s, o in zip(static, out, strict=True):
        _copy_output(s, o)


def _clone_output(out: Any) -> Any:
    """A copy of a replayed graph's output (the graph overwrites its own at the next replay)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(_clone_output(o) for o in out)


class GraphRunner(GraphBook):
    """Runs ``fn(*args, **kwargs)`` through CUDA graphs keyed by the arguments' layout.

    ``weights`` yields the tensors whose addresses the captured kernels read (the model's
    parameters and buffers). ``passthrough`` keyword arguments (e.g. ComfyUI's
    ``transformer_options``) are handed to ``fn`` unchanged and are not part of the key:
    the caller vouches that they do not change what the call computes.
    """

    def __init__(
        self,
        weights: Callable[[], Iterable[torch.Tensor]],
        max_graphs: int = 4,
        passthrough: tuple[str, ...] = (),
    ) -> None:
        super().__init__(weights, max_graphs, "USDU", forward_only=True)
        self.passthrough = passthrough
        self.eager_calls = 0

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.disabled is not None:
            self.eager_calls += 1
            return fn(*args, **kwargs)
        passed = {k: kwargs.pop(k) for k in self.passthrough if k in kwargs}
        try:
            tensors, key = _split(args, kwargs)
        except TypeError as exc:
            self.disable(str(exc))
            return fn(*args, **kwargs, **passed)
        if not tensors or any(t.device.type != "cuda" for t in tensors):
            self.eager_calls += 1
            return fn(*args, **kwargs, **passed)
        entry = self._graphs.get(key)
        if entry is not None:
            if entry.weights != self.weight_ptrs():
                self.disable("the model's weights moved since the graphs were recorded (offloaded or re-patched)")
                return fn(*args, **kwargs, **passed)
            for static, value in zip(entry.inputs, tensors, strict=True):
                static.copy_(value)
            entry.graph.replay()
            self.replays += 1
            return _clone_output(entry.output)
        if not self.wants_capture(key):
            self.eager_calls += 1
            return fn(*args, **kwargs, **passed)
        return self._capture(key, fn, args, kwargs, tensors, passed)

    def _capture(self, key, fn, args, kwargs, tensors, passed) -> Any:
        device = tensors[0].device
        statics = [t.clone() for t in tensors]
        s_args, s_kwargs = _rebuild(args, kwargs, statics)
        weights = self.weight_ptrs()
        graph = torch.cuda.CUDAGraph()
        held: list[Any] = []  # the output buffers, made by the checked run, outside the recording

        def call() -> Any:
            out = fn(*s_args, **s_kwargs, **passed)
            if not held:  # the checked run (see GraphBook.record): keep a copy as the buffers
                _check_output(out)
                held.append(_clone_output(out))
            else:  # the recording: it writes into those buffers and frees its own output inside
                _copy_output(held[0], out)
            return held[0]

        try:
            with torch.cuda.device(device):
                output = self.record(graph, call)
        except Exception as exc:  # any capture failure: this run stays eager
            self.capture_failed(exc, device)
            return fn(*args, **kwargs, **passed)
        if weights != self.weight_ptrs():
            self.disable("the model's weights moved while recording")
            return fn(*args, **kwargs, **passed)
        self._graphs[key] = _Graph(graph, statics, output, weights)
        self.captures += 1
        for static, value in zip(statics, tensors, strict=True):
            static.copy_(value)
        graph.replay()
        self.replays += 1
        return _clone_output(output)
