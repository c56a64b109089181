"""Test-only ComfyUI nodes, linked into the test servers' custom_nodes (never shipped with the pack).

``SpeedKitProbe_ImageSink`` is an output node that costs next to nothing: it reports what it
received (shape, dtype, device, whether it is an inference tensor) and, when given a name,
saves the float tensor as safetensors under ``output/probe/``. Tests read results in full
precision through it, and benchmarks end their graphs with it so that the time they report
is the graph's own work, not a PNG encoder's.
"""

from __future__ import annotations

from .saving import save_probe_tensor


class ImageSink:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node API
        return {
            "required": {"image": ("IMAGE",)},
            "optional": {"save_name": ("STRING", {"default": ""})},
        }

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, image, save_name: str = ""):
        info = {
            "shape": list(image.shape),
            "dtype": str(image.dtype),
            "device": str(image.device),
            "inference": bool(image.is_inference()),
        }
        if save_name:
            info["path"] = save_probe_tensor(save_name, "image", image)
        return {"ui": {"probe": [info]}}


from .cancel_inside_block import CancelInsideBlock  # noqa: E402
from .fbcache_probes import FBCachePattern, LatentSink, RandomConditioning  # noqa: E402
from .host_sync_model import HostSyncModel  # noqa: E402
from .sampler_timing import SamplerTiming  # noqa: E402

NODE_CLASS_MAPPINGS = {
    "SpeedKitProbe_ImageSink": ImageSink,
    "SpeedKitProbe_SamplerTiming": SamplerTiming,
    "SpeedKitProbe_HostSyncModel": HostSyncModel,
    "SpeedKitProbe_CancelInsideBlock": CancelInsideBlock,
    "SpeedKitProbe_RandomConditioning": RandomConditioning,
    "SpeedKitProbe_FBCachePattern": FBCachePattern,
    "SpeedKitProbe_LatentSink": LatentSink,
}
