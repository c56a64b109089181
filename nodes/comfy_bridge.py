"""Small, lazily-imported bridges to ComfyUI internals shared by every adapter.

Each helper imports ComfyUI inside the function so importing the adapter modules only
needs ``comfy_api`` (present in every ComfyUI new enough to run the pack).
"""

from __future__ import annotations

import torch


def to_intermediate(image: torch.Tensor) -> torch.Tensor:
    """Move an IMAGE to ComfyUI's intermediate device and dtype (CPU fp32 by default)."""
    import comfy.model_management as mm

    return image.to(device=mm.intermediate_device(), dtype=mm.intermediate_dtype())


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def progress_bar(total: int, node_id: str | None = None):
    """A ``comfy.utils.ProgressBar`` for ``total`` steps (its ``update`` may raise on cancel)."""
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)
