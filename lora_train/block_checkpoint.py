"""Activation checkpointing of the UNet's blocks for one training run, and the cleanup PyTorch
2.11 and older skip when a checkpointed forward raises.

Checkpointing trades a second forward of each block in the backward for not keeping its
activations (an SDXL step at 1024 px fits in far less VRAM). The blocks get a per-instance
``forward`` only inside the ``with`` block, so no patch outlives the run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..torch_utils import error_line

logger = logging.getLogger(__name__)


class _CompiledForward:
    """A block's forward through ``torch.compile``. A compile failure (raised before the block
    runs anything) logs one line and the blocks of the run go on eagerly (``state`` is shared by
    the blocks of one :class:`checkpointed`)."""

    def __init__(self, fn: Callable, state: dict[str, str]) -> None:
        self.fn = fn
        # dynamic=None: the first shape is compiled static, a second one (another aspect bucket)
        # once with dynamic sizes, so buckets do not pile up compiled variants
        self.compiled = torch.compile(fn, dynamic=None)
        self.state = state

    def __call__(self, *args, **kwargs):
        if "failed" in self.state:
            return self.fn(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            reason = error_line(exc)
            self.state["failed"] = reason
            logger.warning("Train LoRA: torch.compile of the blocks failed (%s); they run eagerly", reason)
            return self.fn(*args, **kwargs)


class checkpointed(contextlib.AbstractContextManager):
    """Run each block's forward under non-reentrant activation checkpointing while active, and
    optionally through ``torch.compile``.

    ``compile=True`` compiles the forward of the blocks in ``compiled`` (default: ``blocks``),
    or ``call(block)`` when given (e.g. the forward with arguments the run never varies fixed, so
    the compiled code does not specialise on them); compiled blocks in ``blocks`` are also
    checkpointed. The per-instance ``forward`` attributes are removed on exit, so no patch
    outlives the run.
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        checkpoint: bool = True,
        compile: bool = False,
        compiled: Iterable[nn.Module] | None = None,
        call: Callable[[nn.Module], Callable] | None = None,
    ) -> None:
        blocks = list(blocks)
        self.blocks = blocks if checkpoint else []
        self.compiled = (blocks if compiled is None else list(compiled)) if compile else []
        self.call = call
        self.state: dict[str, str] = {}

    def __enter__(self):
        from torch.utils.checkpoint import checkpoint

        for block in self.compiled:
            block.forward = _CompiledForward(self.call(block) if self.call else block.forward, self.state)
        for block in self.blocks:
            original = block.forward

            def run(*args, _f=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _f(*args, **kwargs)
                # No RNG state round trip: the UNet runs in eval mode (no dropout), and reading the
                # CUDA RNG state is not allowed while a CUDA graph records the step.
                try:
                    return checkpoint(_f, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
                except BaseException as exc:
                    close_checkpoint_frames(exc.__traceback__)
                    raise

            block.forward = run
        return self

    def __exit__(self, *exc: Any) -> None:
        for block in [*self.compiled, *self.blocks]:
            block.__dict__.pop("forward", None)


def close_checkpoint_frames(tb) -> int:
    """Finish the checkpoint regions an exception left open; returns how many were closed.

    PyTorch 2.11 and older run non-reentrant ``checkpoint``'s pre-forward logic in a generator
    and resume it only after a forward that returned (fixed upstream in May 2026). When the
    forward raises (ComfyUI's cancel arrives inside a block, an out-of-memory error), the region's
    saved-tensor hooks stay pushed on the thread for as long as the exception's frames live, and
    ComfyUI keeps them: every later autograd graph on its worker thread is packed into the dead
    region, the next training run fails with "A different number of tensors was saved during the
    original forward and recomputation", and when the frames are finally freed the late cleanup
    pops whatever hook is on top then. Closing the suspended generators of torch's checkpoint
    module found in the traceback (innermost first: the hook stack is last in, first out) runs
    each region's own cleanup once, now; with a fixed PyTorch nothing is found.
    """
    import torch.utils.checkpoint as torch_checkpoint

    source = torch_checkpoint.__file__
    found: list = []
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if (
                inspect.isgenerator(value)
                and value.gi_frame is not None
                and not value.gi_running
                and value.gi_code.co_filename == source
                and not any(value is g for g in found)
            ):
                found.append(value)
        tb = tb.tb_next
    for gen in reversed(found):
        try:
            gen.close()
        except Exception:  # noqa: BLE001 - the original exception is the one to report
            logger.warning("Train LoRA: could not close a checkpointed region after an error", exc_info=True)
    return len(found)
