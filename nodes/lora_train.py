"""ComfyUI adapter for lora_train/ (nodes land here as the capability is built)."""

from __future__ import annotations

from comfy_api.latest import io

NODES: list[type[io.ComfyNode]] = []
