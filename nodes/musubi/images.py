"""ComfyUI IMAGE tensors <-> the numpy frames musubi's media helpers read and write."""

from __future__ import annotations

from pathlib import Path

from ...musubi import media


def to_numpy(image):
    """A ComfyUI IMAGE (torch tensor) as float32 numpy, unchecked."""
    import numpy as np

    return np.asarray(image.detach().float().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32)


def image_frames(image, name: str):
    """A ComfyUI IMAGE as float32 numpy [T, H, W, 3], checked (NaN, empty, channels, range) and named."""
    arr = to_numpy(image)
    media.check_frames(arr, name)
    return arr


def first_frame_png(frames, folder: Path, name: str) -> str:
    """First frame of checked float frames (see :func:`image_frames`) as ``<folder>/<name>.png``."""
    from PIL import Image

    path = folder / f"{name}.png"
    Image.fromarray(media.frames_to_uint8(frames[:1], name)[0]).save(path)
    return str(path)


def to_image(frames):
    """uint8 frames [T, H, W, 3] as a ComfyUI IMAGE on the intermediate device."""
    import torch

    from ..comfy_bridge import to_intermediate

    return to_intermediate(torch.from_numpy(frames).float() / 255.0)
