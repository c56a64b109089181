"""Full GPU residency of a MODEL for one node's run, through ComfyUI's own model management.

On NVIDIA, ComfyUI loads models as dynamic-VRAM patchers (``ModelPatcherDynamic``): every
layer's weights are looked up and cast on each call, and every sampler call re-prepares the
whole model. Measured in a v0.19.3 server on an H200 with full-size SDXL, one 576-px tile
costs 0.36 s of setup per sampler call and 0.10 s per step that way, against 0.02 s and
0.05 s for the same model loaded plainly. A node that calls the model hundreds of times
(tiled upscaling, training) therefore asks ComfyUI for the model's non-dynamic form
(``clone(disable_dynamic=True)``, what ComfyUI's own TorchCompileModel does), loads it fully
with ``load_models_gpu(..., force_full_load=True)`` when the GPU has room, and gives the
VRAM back when the node ends. When it cannot (no room, a model ComfyUI cannot reload, a
CPU device), the node runs on the model it was given, as before.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

HEADROOM = 0.9
"""Fraction of the GPU's total memory the resident model plus the run's working memory may take."""


def _is_dynamic(model) -> bool:
    return bool(getattr(model, "is_dynamic", lambda: False)())


def residency_blocker(model, working_bytes: int) -> str | None:
    """Why ``model`` is not swapped for a fully loaded copy, or None when it will be."""
    import comfy.model_management as mm

    if not _is_dynamic(model):
        return "the model is not streamed by the dynamic VRAM manager"
    device = getattr(model, "load_device", None)
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return "the model does not run on a CUDA device"
    if getattr(model, "cached_patcher_init", None) is None:
        return "ComfyUI cannot reload this model without dynamic VRAM (custom loader)"
    need = model.model_size() + working_bytes + mm.minimum_inference_memory()
    total = mm.get_total_memory(device)
    if need > total * HEADROOM:
        return f"it needs {need / 2**30:.1f} GiB and the GPU has {total / 2**30:.1f} GiB"
    return None


@contextmanager
def full_residency(model, label: str, working_bytes: int = 0) -> Iterator[object]:
    """Yield a patcher that computes what ``model`` computes with every weight on the GPU
    for the block (or ``model`` itself when that is not possible), then give the VRAM back.

    ``working_bytes``: what the run needs besides the weights (activations, batches), so a
    model that would leave the run too little room stays dynamic. The user's MODEL is not
    modified; its patches (LoRAs) and options travel with the clone.
    """
    import comfy.model_management as mm

    reason = residency_blocker(model, working_bytes)
    if reason is not None:
        if _is_dynamic(model):
            logger.info("%s: model kept on ComfyUI's dynamic VRAM loading: %s", label, reason)
        yield model
        return
    started = time.perf_counter()
    try:
        resident = model.clone(disable_dynamic=True)
        mm.load_models_gpu([resident], force_full_load=True)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
        logger.warning(
            "%s: could not load the model fully (%s: %s); using dynamic loading", label, type(exc).__name__, exc
        )
        resident = None
        mm.soft_empty_cache()
    if resident is None or getattr(resident.model, "model_lowvram", False):
        if resident is not None:
            logger.info("%s: the model did not fit fully; using dynamic loading", label)
            _release(resident)
        yield model
        return
    logger.info(
        "%s: model loaded fully on the GPU for this run (%.1f GiB in %.2f s)",
        label,
        resident.model_size() / 2**30,
        time.perf_counter() - started,
    )
    try:
        yield resident
    finally:
        _release(resident)


def _release(resident) -> None:
    """Drop the resident copy and make sure its weights leave the GPU now, not at some
    later garbage collection (ComfyUI's loaded list only holds weak references)."""
    import comfy.model_management as mm

    ref = weakref.ref(resident.model)
    del resident
    if ref() is not None:
        gc.collect()
    base = ref()
    if base is not None:  # still referenced elsewhere: move its weights off the GPU explicitly
        for loaded in list(mm.current_loaded_models):
            patcher = loaded.model
            if patcher is not None and patcher.model is base:
                patcher.detach(unpatch_all=True)
    mm.soft_empty_cache()
