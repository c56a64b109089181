"""Input checks of the USDU nodes: every bad value becomes a ``ValueError`` before any work.

ComfyUI checks the min/max of numbers typed into widgets, but not of linked values, and
NaN passes its checks (NaN compares false to everything); a bad value then surfaces deep
in the run as a raw library error (``cannot convert float NaN to integer``) or as a black
picture. These plain functions name the input, the bad value and the fix, in the style of
:func:`torch_utils.check_image` (``"<input>: <what is wrong>; <fix>"``).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping

import torch

from .. import torch_utils

logger = logging.getLogger(__name__)

UPSCALE_BY_MIN = 0.05
UPSCALE_BY_MAX = 4.0
"""The node's widget range for ``upscale_by`` (values above 0 outside it still work when linked)."""
SEED_MAX = 2**64 - 1
SCHEDULER_FIX = "connect a scheduler node such as BasicScheduler"
IMAGE_RANGE_SLACK = 0.5
"""With ``normalize`` off, values this far outside 0..1 mean the IMAGE is not a 0..1 image
(e.g. 0..255): Lanczos would clamp it to a white or black picture."""


def _fmt(limit: float) -> str:
    """``8`` / ``0.05`` / ``18446744073709551615``: whole limits without ``:g``'s exponent."""
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"use a value between {_fmt(minimum)} and {_fmt(maximum)}"
    if minimum is not None:
        return f"use {_fmt(minimum)} or more"
    if maximum is not None:
        return f"use {_fmt(maximum)} or less"
    return "use a finite number"


def check_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    fix: str | None = None,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in ``[minimum, maximum]``
    (a whole number when ``integer``): NaN slips through ``value < minimum`` checks."""
    use = fix or _range_text(minimum, maximum)
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}; {use}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: {value} is not a finite number; {use}")
    if integer and value != int(value):
        raise ValueError(f"{name}: {value} is not a whole number; {use}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: {value} is below the minimum {_fmt(minimum)}; {use}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: {value} is above the maximum {_fmt(maximum)}; {use}")


def check_upscale_by(value: object) -> None:
    """``upscale_by`` must be a finite number above 0 (NaN used to fail as ``cannot convert
    float NaN to integer`` deep in the canvas size computation)."""
    use = f"use a value between {UPSCALE_BY_MIN:g} and {UPSCALE_BY_MAX:g} (1.0 keeps the size, 2.0 doubles each side)"
    check_number("upscale_by", value, fix=use)
    if value <= 0:
        raise ValueError(f"upscale_by: {value} is not above 0; {use}")


def check_seed(value: object, name: str = "seed") -> None:
    """Seeds are 64-bit unsigned (torch refuses larger ones with ``Overflow when unpacking long long``)."""
    check_number(name, value, minimum=0, maximum=SEED_MAX, integer=True, fix=f"use a whole number in 0..{SEED_MAX}")


def check_image(image: object, name: str = "image") -> None:
    """:func:`torch_utils.check_image` (RGB, float, finite), plus a clear message for an
    image batch or side of 0 pixels (which it reports as an empty batch or not at all)."""
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        b, h, w = image.shape[:3]
        if b == 0:
            raise ValueError(
                f"{name}: the IMAGE batch holds no image (shape {tuple(image.shape)}); "
                "connect a node that outputs at least one image (e.g. Load Image)"
            )
        if h == 0 or w == 0:
            raise ValueError(
                f"{name}: the image is {w}x{h} pixels (shape {tuple(image.shape)}); "
                "connect an image at least 1 pixel on each side (check the crop or resize node before this one)"
            )
    torch_utils.check_image(image, name, channels=(3,))


def check_unit_range(image: torch.Tensor, name: str = "image") -> None:
    """With ``normalize`` off the image is used as is: refuse one that is clearly not in
    0..1 (a 0..255 image would come out white) instead of clamping it silently."""
    lo, hi = float(image.amin()), float(image.amax())
    if lo < -IMAGE_RANGE_SLACK or hi > 1.0 + IMAGE_RANGE_SLACK:
        raise ValueError(
            f"{name}: values range from {lo:g} to {hi:g} but IMAGE values must be in 0..1 and normalize is off; "
            "set normalize to minmax (or divide a 0..255 image by 255)"
        )


def check_sigmas(sigmas: object, name: str = "sigmas") -> int:
    """Validate a SIGMAS schedule; returns its number of steps (``len - 1``).

    A schedule must be a 1-D tensor of finite values that never increase and end at or
    above 0; a single sigma is a schedule of 0 steps (nothing to sample). Anything else
    used to reach the sampler and come back as a mostly black picture.
    """
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"{name}: expected a SIGMAS tensor, got {type(sigmas).__name__}; {SCHEDULER_FIX}")
    if sigmas.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D list of noise levels, got shape {tuple(sigmas.shape)}; {SCHEDULER_FIX}"
        )
    if sigmas.numel() == 0:
        raise ValueError(
            f"{name}: the schedule is empty (0 sigmas, e.g. from a scheduler with denoise 0); "
            f"{SCHEDULER_FIX} with steps >= 1 and denoise > 0"
        )
    values = sigmas.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ValueError(
            f"{name}: sigma {i} of {values.numel()} is {float(values[i])}; every sigma must be a finite number - "
            f"{SCHEDULER_FIX}"
        )
    rises = (values[1:] > values[:-1]).nonzero()
    if rises.numel():
        i = int(rises[0])
        raise ValueError(
            f"{name}: sigma {i + 1} ({float(values[i + 1]):g}) is larger than sigma {i} ({float(values[i]):g}); "
            f"sigmas must decrease from the first step to the last - {SCHEDULER_FIX} "
            "(or reverse the list if it was built by hand)"
        )
    last = float(values[-1])
    if last < 0:
        raise ValueError(f"{name}: the last sigma is {last:g}; sigmas must end at 0 or above - {SCHEDULER_FIX}")
    if last > 0 and values.numel() > 1:
        logger.info(
            "USDU: %s ends at sigma %g, not 0: the tiles keep that much noise (a partial schedule, e.g. from "
            "SplitSigmas)",
            name,
            last,
        )
    return values.numel() - 1


def is_reduced_precision(dtype: torch.dtype) -> bool:
    """fp16, bf16 and fp8: the dtypes in which a model's activations can overflow."""
    return dtype.is_floating_point and dtype.itemsize < 4


def nonfinite_hint(precision: Mapping[str, torch.dtype | None] | None) -> str:
    """Likely cause of tiles that decode to NaN/Inf, given the compute dtype of each part
    (``{"model": torch.float16, "VAE": torch.float32}``; None = unknown). Blames an fp16
    overflow only when something actually ran in reduced precision."""
    known = {k: v for k, v in (precision or {}).items() if v is not None}
    reduced = [f"the {k} runs in {torch_utils.dtype_name(v)}" for k, v in known.items() if is_reduced_precision(v)]
    if reduced:
        return (
            f"{', '.join(reduced)}: an overflow in reduced precision? run it in fp32 "
            "(ComfyUI's --fp32-unet / --fp32-vae) or lower cfg"
        )
    if known:
        parts = ", ".join(f"{k} in {torch_utils.dtype_name(v)}" for k, v in known.items())
        return (
            f"{parts}, so not an fp16 overflow: check cfg, the sigmas and the conditioning for extreme values, "
            "or the model/VAE pairing"
        )
    return "an overflow in the model or VAE, or extreme cfg / sigma / conditioning values?"
