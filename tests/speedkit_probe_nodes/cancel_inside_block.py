"""``SpeedKitProbe_CancelInsideBlock``: a MODEL that presses Cancel from inside a UNet block.

The clone gets an object patch (ComfyUI's own ModelPatcher mechanism) wrapping the first
GroupNorm of the first input ResBlock: its first call with autograd on sets ComfyUI's interrupt
flag and raises ComfyUI's interrupt exception right there, which is what a user's Cancel does when
ComfyUI checks it inside a layer. The GPU tier uses it to put a cancel deterministically inside a
checkpointed block of Train LoRA, then checks that the next training run in the same server
trains normally (PyTorch 2.11 and older left the block's checkpoint region open on the worker
thread, and every later training run failed).
"""

from __future__ import annotations

import torch

from .object_patch_probe import ObjectPatchProbe


class _CancelOnce(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.fired = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not self.fired:
            import comfy.model_management as mm

            self.fired = True
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()
        return self.inner(x)


class CancelInsideBlock(ObjectPatchProbe):
    TARGET = "diffusion_model.input_blocks.1.0.in_layers.0"
    WRAPPER = _CancelOnce
