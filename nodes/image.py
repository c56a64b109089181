"""Image utility nodes: ``SpeedKit_ImageRangeNormalize``."""

from __future__ import annotations

from comfy_api.latest import io

from .. import torch_utils
from .comfy_bridge import to_intermediate


class ImageRangeNormalize(io.ComfyNode):
    """Stretch an IMAGE's values to [0, 1] (the Nunchaku washed-out-output fix)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_ImageRangeNormalize",
            display_name="Normalize Image Range (SpeedKit)",
            category="SpeedKit/image",
            description=(
                "Stretches an image batch's values to the full 0..1 range. Fixes the low-contrast, "
                "washed-out look of images decoded by some quantized (Nunchaku) VAEs, whose output "
                "spans e.g. 0.15..0.85. Constant images become black; NaN/Inf input is an error."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The images to normalize (any batch size)."),
                io.Combo.Input(
                    "mode",
                    options=list(torch_utils.NORMALIZE_MODES),
                    default=torch_utils.NORMALIZE_MODES[0],
                    tooltip=(
                        "minmax: one min/max for the whole batch (keeps video frames consistent). "
                        "minmax per image: each image stretched on its own. percentile: the low/high "
                        "percentiles map to 0/1, robust to single outlier pixels. off: unchanged."
                    ),
                ),
                io.Float.Input(
                    "low_percentile",
                    default=0.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="percentile mode only: values at or below this percentile (0-100) become 0.",
                    advanced=True,
                ),
                io.Float.Input(
                    "high_percentile",
                    default=99.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="percentile mode only: values at or above this percentile (0-100) become 1.",
                    advanced=True,
                ),
            ],
            outputs=[io.Image.Output(tooltip="The normalized images, values in [0, 1].")],
        )

    @classmethod
    def execute(cls, image, mode: str, low_percentile: float = 0.5, high_percentile: float = 99.5) -> io.NodeOutput:
        torch_utils.check_image(image, "image")
        out = torch_utils.normalize_range(image, mode, low_percentile, high_percentile, name="image")
        return io.NodeOutput(to_intermediate(out))


NODES: list[type[io.ComfyNode]] = [ImageRangeNormalize]
