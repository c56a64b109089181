"""Checks of Train LoRA's number inputs that ComfyUI's own validation lets through.

ComfyUI refuses a value below ``min`` or above ``max`` by comparing, and every comparison with
NaN is false: a NaN learning rate reaches the node and would train a NaN LoRA. The adapter runs
these before any model, image or file work; each error names the node input, the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# node input -> (lowest allowed, lowest is allowed itself, a value to suggest)
FLOAT_INPUTS: dict[str, tuple[float, bool, str]] = {
    "learning_rate": (0.0, False, "1e-4"),
    "text_encoder_lr": (0.0, True, "5e-5"),
    "alpha": (0.0, False, "the rank, e.g. 16 (scale 1)"),
    "min_snr_gamma": (0.0, True, "0 (off) or 5"),
    "noise_offset": (0.0, True, "0 (off) or 0.05"),
    "caption_dropout": (0.0, True, "0 (off) or 0.1"),
}


def check_numbers(values: Mapping[str, float]) -> None:
    """``ValueError`` for the first NaN/Inf or out-of-range value among the node's float inputs."""
    for name, value in values.items():
        low, inclusive, example = FLOAT_INPUTS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: {value!r} is not a finite number; set it to a number such as {example}")
        if value < low or (value == low and not inclusive):
            rule = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ValueError(f"{name}: {value!r} must be {rule}; set it to a number such as {example}")
    dropout = values.get("caption_dropout")
    if dropout is not None and dropout > 1:
        raise ValueError(f"caption_dropout: {dropout!r} is a probability and must be <= 1; e.g. 0.1")


def check_text_encoder_lr(text_encoder_lr: float, train_text_encoder: bool) -> None:
    """A text-encoder LoRA at learning rate 0 would be saved untrained: refuse it."""
    if train_text_encoder and text_encoder_lr == 0:
        raise ValueError(
            "text_encoder_lr: 0 with train_text_encoder on would save a text-encoder LoRA that never trains; "
            "set text_encoder_lr to e.g. 5e-5, or turn train_text_encoder off"
        )
