"""A training micro-step (forward + backward of the LoRA loss) replayed as a CUDA graph.

An SDXL LoRA step at batch 1 is bound by the host: ComfyUI's UNet launches thousands of
kernels per forward, checkpointing re-runs the forward in the backward, and every LoRA layer
adds its own; the H100 waits for Python most of the time (1.2 it/s eager). A CUDA graph
records the kernels of one micro-step once and replays them with one launch.

How it stays exact and safe:
- inputs (latents, noise, timesteps, cached conditioning) are copied into static buffers that
  the graph reads; the random draws stay on the host generators, so a graphed run draws the
  same noise/timesteps as an eager one;
- gradients come from ``torch.autograd.grad`` into the graph's own output tensors and are then
  added into ``param.grad`` (one foreach add), so accumulation never depends on how autograd
  would have accumulated inside a capture;
- a shape (aspect bucket) runs eagerly the first time and is captured the second time; at
  most ``max_graphs`` graphs share one memory pool (they never run concurrently and their
  outputs are consumed right after each replay);
- the parameters' storage addresses are checked before each replay; a host sync inside the
  model is found by a checked run before recording (``GraphBook.record``), and any capture
  failure switches the run back to eager with one log line.

No ComfyUI import; the trainer decides when it is eligible (CUDA, no fp16 GradScaler, frozen
text encoders).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..torch_utils import GraphBook

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    keys: list[str]
    loss: torch.Tensor
    grads: list[torch.Tensor | None]
    weights: tuple[int, ...]


class GraphedMicroStep(GraphBook):
    """``step(x0, noise, t, cond, scale)`` -> detached loss; adds ``scale * dloss/dparam`` into
    each ``param.grad`` (which must exist: the trainer zeroes grads without freeing them)."""

    def __init__(
        self,
        loss_fn: LossFn,
        params: list[torch.nn.Parameter],
        weights: Callable[[], list[torch.Tensor]] | None = None,
        max_graphs: int = 4,
    ) -> None:
        extra = weights or (lambda: [])
        super().__init__(lambda: [*params, *extra()], max_graphs, "LoRA training")
        self.loss_fn = loss_fn
        self.params = params

    def _accumulate(self, grads: list[torch.Tensor | None], scale: float) -> None:
        pairs = [(p.grad, g) for p, g in zip(self.params, grads, strict=True) if g is not None]
        if not pairs:
            return
        targets, values = zip(*pairs, strict=True)
        if scale == 1.0:
            torch._foreach_add_(list(targets), list(values))
        else:
            torch._foreach_add_(list(targets), list(values), alpha=scale)

    def _compute(self, x0, noise, t, cond) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        loss = self.loss_fn(x0, noise, t, cond)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), list(grads)

    def __call__(self, x0, noise, t, cond: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        keys = sorted(cond)
        tensors = [x0, noise, t, *(cond[k] for k in keys)]
        key = tuple((tuple(v.shape), v.dtype, v.stride()) for v in tensors) + (tuple(keys),)
        entry = self._graphs.get(key)
        if entry is None:
            on_cuda = all(v.device.type == "cuda" for v in tensors)
            if self.wants_capture(key) and on_cuda:
                entry = self._capture(key, x0, noise, t, cond, keys)
            if entry is None:
                loss, grads = self._compute(x0, noise, t, cond)
                self._accumulate(grads, scale)
                return loss
        elif entry.weights != self.weight_ptrs():
            self.disable("the model's weights moved since the graph was recorded")
            return self(x0, noise, t, cond, scale)
        for static, value in zip(entry.inputs, tensors, strict=True):
            static.copy_(value)
        entry.graph.replay()
        self.replays += 1
        self._accumulate(entry.grads, scale)
        return entry.loss.clone()

    def _capture(self, key, x0, noise, t, cond, keys) -> _Graph | None:
        statics = [v.clone() for v in (x0, noise, t, *(cond[k] for k in keys))]
        s_cond = dict(zip(keys, statics[3:], strict=True))
        graph = torch.cuda.CUDAGraph()
        ptrs = self.weight_ptrs()
        try:
            loss, grads = self.record(graph, lambda: self._compute(statics[0], statics[1], statics[2], s_cond))
        except Exception as exc:  # anything not capturable: the run continues eagerly
            self.capture_failed(exc)
            return None
        if ptrs != self.weight_ptrs():
            self.disable("the model's weights moved while recording")
            return None
        entry = _Graph(graph, statics, keys, loss, grads, ptrs)
        self._graphs[key] = entry
        self.captures += 1
        logger.info("LoRA training: recorded a CUDA graph for input shape %s", tuple(x0.shape))
        return entry
