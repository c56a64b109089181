"""Keep a sampling run's conditioning on the model's device while the cache is on.

Why: ComfyUI keeps the conditioning where the text encoder left it (the CPU unless ``--gpu-only``),
and every model call concatenates it on the CPU and copies it to the device. While the GPU computes
a full step that host work hides behind it. A cached step is different: the host waits for the
first block to decide, and then the GPU idles while the host prepares the next call. On our H100
host the CPU concatenation alone was about 4 ms of a Flux-size hit step's 8.4 ms
(``benchmarks/fbcache_cost.py --profile-hits``). Copying the run's conditioning to the device once
removes that work from every call; the values do not change (the same tensors are concatenated and
cast, on the device instead of the host).

Only per-run copies are touched: ComfyUI builds new cond dicts for every sampling run
(``process_conds``), and :func:`conditioning_on_device` copies those again, so the user's
CONDITIONING and the objects of other runs keep their tensors where they were.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch


def _moved(obj: object, device: torch.device) -> tuple[object, int]:
    """``obj`` with its ``cond`` tensor on ``device`` (a shallow copy), and the bytes copied."""
    tensor = getattr(obj, "cond", None)
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
        return obj, 0
    clone = copy.copy(obj)
    clone.cond = tensor.to(device)
    return clone, tensor.numel() * tensor.element_size()


def conditioning_on_device(
    conds: Mapping[str, Sequence[dict] | None], device: torch.device | str
) -> tuple[dict[str, list[dict] | None], int]:
    """Copies of ComfyUI's processed ``conds`` whose CPU ``model_conds`` tensors live on ``device``.

    ``conds`` maps a prompt type ("positive", "negative", ...) to a list of cond dicts, each with
    a ``model_conds`` dict of ComfyUI COND objects that hold their tensor in ``.cond``. Objects
    without a CPU tensor there (constants, lists, tensors already on a device) are kept as they are.
    Returns the new mapping and the number of bytes copied; with a CPU ``device`` nothing is copied.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return dict(conds), 0
    total = 0
    out: dict[str, list[dict] | None] = {}
    for prompt_type, entries in conds.items():
        if entries is None:
            out[prompt_type] = None
            continue
        new_entries = []
        for entry in entries:
            model_conds = entry.get("model_conds") if isinstance(entry, dict) else None
            if not isinstance(model_conds, dict):
                new_entries.append(entry)
                continue
            new_model_conds = {}
            for name, obj in model_conds.items():
                new_model_conds[name], size = _moved(obj, device)
                total += size
            new_entry = dict(entry)
            new_entry["model_conds"] = new_model_conds
            new_entries.append(new_entry)
        out[prompt_type] = new_entries
    return out, total
