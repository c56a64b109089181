"""``SpeedKitProbe_HostSyncModel``: a MODEL whose UNet reads a value on the host every call.

The clone gets an object patch (ComfyUI's own ModelPatcher mechanism, applied while the model is
loaded and undone after) that wraps ``diffusion_model.out`` in a module calling ``float()`` on
its input first: a synchronizing operation that no CUDA graph can record. The GPU tier uses it
to force the pack's capture attempts to fail inside a live server and to check that the server
survives and the run falls back to eager execution with the same result.
"""

from __future__ import annotations

import torch

from .object_patch_probe import ObjectPatchProbe


class _SyncingOut(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().amax()) < 0:  # a host read; never true
            return x
        return self.inner(x)


class HostSyncModel(ObjectPatchProbe):
    TARGET = "diffusion_model.out"
    WRAPPER = _SyncingOut
