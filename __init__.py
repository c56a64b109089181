"""ComfyUI-SpeedKit: faster upscaling, caching and LoRA training nodes for ComfyUI.

ComfyUI imports this file when it loads the pack. It only collects the node classes of
the adapter modules in ``nodes/``; nothing is downloaded, installed or started here.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# One adapter module per capability; each exposes NODES = [io.ComfyNode subclasses].
NODE_MODULES: tuple[str, ...] = ("image", "upscale_cuda", "fbcache", "usdu", "musubi", "lora_train")

WEB_DIRECTORY = "./web"

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


def _load() -> None:
    import os

    if os.environ.get("SPEEDKIT_TRAIN_WORKER_CHILD") == "1":
        return  # Train LoRA's worker process imports the pack for its training loop only
    from .registry import MIN_COMFYUI, collect_nodes, missing_modules

    if missing_modules(["comfy"]):
        # Not running inside ComfyUI (e.g. the command-line upscaler): no nodes to register.
        logger.debug("ComfyUI-SpeedKit: ComfyUI not found, node registration skipped")
        return
    if missing_modules(["comfy_api.latest"]):
        logger.warning(
            "ComfyUI-SpeedKit needs ComfyUI %s or newer (it uses comfy_api.latest); update ComfyUI to use its nodes",
            MIN_COMFYUI,
        )
        return
    classes, names = collect_nodes(__name__, NODE_MODULES)
    NODE_CLASS_MAPPINGS.update(classes)
    NODE_DISPLAY_NAME_MAPPINGS.update(names)


_load()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
