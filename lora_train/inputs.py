"""Checks of Train LoRA's inputs that ComfyUI's own validation lets through.

ComfyUI refuses a value below ``min`` or above ``max`` by comparing, and every comparison with
NaN is false: a NaN learning rate reaches the node and would train a NaN LoRA. The adapter runs
these before any model, image or file work; each error names the node input, the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import data, validation
from .sample_prompts import SIZE_MAX, SamplePrompt, parse_prompts

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


@dataclass(frozen=True)
class Extras:
    """What the run does between steps besides training: sample images, validation loss."""

    prompts: tuple[SamplePrompt, ...] = ()
    sample_every: int = 0
    validation_split: float = 0.0
    validate_every: int = 50


def check_extras(
    sample_every: int,
    prompts_text: str,
    size: int,
    seed: int,
    validation_split: float,
    validate_every: int,
    image_count: int,
) -> Extras:
    """Check the sampling and validation inputs (before any model work) and bundle them.

    ``size``: the sample side length already resolved (``sample_size`` or the training resolution).
    """
    for label, value in (("sample_every", sample_every), ("validate_every", validate_every), ("sample_seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label}: {value!r} must be a whole number >= 0")
    if not 64 <= size <= SIZE_MAX or size % 8:
        raise ValueError(
            f"sample_size: {size} must be a multiple of 8 between 64 and {SIZE_MAX} (0 = training resolution)"
        )
    prompts = tuple(parse_prompts(prompts_text or "", width=size, height=size, seed=seed))
    if sample_every and not prompts:
        raise ValueError(
            "sample_prompts: sample_every is set but there is no prompt; write one prompt per line or set sample_every to 0"
        )
    validation.split_holdout(image_count, validation_split, 0)  # refuses a split that leaves nothing to train on
    return Extras(prompts, sample_every, validation_split, max(1, validate_every))


def resolve_resume(value: str, state_dir: Path) -> Path | None:
    """``resume_from`` as a path: a state file path, or an ``output_name`` whose state is in ``state_dir``."""
    if not value.strip():
        return None
    path = data.user_path(value)
    if path.is_absolute() or path.exists() or Path(f"{path}-state.json").exists():
        return path
    return state_dir / path
