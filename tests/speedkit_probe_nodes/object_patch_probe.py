"""Base of the probe MODEL nodes that wrap one submodule of the diffusion model.

The wrapper goes in through ComfyUI's own object patches on a clone (applied while the model is
loaded, undone after), so the input MODEL is left as it was.
"""

from __future__ import annotations

import torch


class ObjectPatchProbe:
    """``run(model)`` -> a clone whose ``TARGET`` module is ``WRAPPER(original module)``."""

    TARGET = ""
    WRAPPER: type[torch.nn.Module] = torch.nn.Module

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node API
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model):
        patched = model.clone()
        patched.add_object_patch(self.TARGET, self.WRAPPER(model.get_model_object(self.TARGET)))
        return (patched,)
