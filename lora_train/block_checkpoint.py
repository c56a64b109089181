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
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class checkpointed(contextlib.AbstractContextManager):
    """Run each block's forward under non-reentrant activation checkpointing while active.

    With ``compile=True`` the block forward is also compiled with ``torch.compile`` (regional
    compilation: blocks of one class share the compiled code). The per-instance ``forward``
    attribute is removed on exit, so no patch outlives the run.
    """

    def __init__(self, blocks: Iterable[nn.Module], checkpoint: bool = True, compile: bool = False) -> None:
        self.blocks = list(blocks) if (checkpoint or compile) else []
        self.checkpoint = checkpoint
        self.compile = compile

    def __enter__(self):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            original = torch.compile(block.forward, dynamic=False) if self.compile else block.forward
            if not self.checkpoint:
                block.forward = original
                continue

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
        for block in self.blocks:
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
