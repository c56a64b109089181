"""ComfyUI adapter for musubi/ (nodes land here as the capability is built)."""

from __future__ import annotations

from comfy_api.latest import io

NODES: list[type[io.ComfyNode]] = []
