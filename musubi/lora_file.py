"""Recognise a LoRA file and its key format from the safetensors header (no tensors loaded)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_keys(path: str | os.PathLike) -> tuple[list[str], dict]:
    """Tensor names and ``__metadata__`` of a .safetensors file, from its JSON header only."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"LoRA file {str(p)!r} does not exist: check the path")
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{str(p)!r} is not a .safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size <= 0 or size > MAX_HEADER:
            raise ValueError(f"{str(p)!r} is not a .safetensors file (bad header size {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ValueError(f"{str(p)!r} is not a .safetensors file: {exc}") from exc
    meta = header.pop("__metadata__", {}) or {}
    return sorted(header), meta


def detect_lora_format(keys: list[str], name: str = "lora") -> str:
    """``"default"`` (musubi/kohya: ``lora_unet_*.lora_down``) or ``"other"`` (``lora_A/B``).

    Raises a ValueError when the keys are not a LoRA at all (e.g. a full checkpoint).
    """
    kohya = sum(1 for k in keys if k.endswith((".lora_down.weight", ".lora_up.weight")))
    peft = sum(1 for k in keys if k.endswith((".lora_A.weight", ".lora_B.weight")))
    if kohya == 0 and peft == 0:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise ValueError(
            f"{name} is not a LoRA: none of its {len(keys)} tensors are lora_down/lora_up or lora_A/lora_B "
            f"weights (e.g. {sample}). Pick a LoRA .safetensors file, not a model checkpoint"
        )
    return "default" if kohya >= peft else "other"
