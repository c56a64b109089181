"""Dataset: image/caption discovery, aspect-ratio buckets, crops, SDXL size conditioning, captions.

A dataset is a folder of images with same-name ``.txt`` captions (``cat.png`` + ``cat.txt``).
Every image is resized to cover its bucket (never stretched) and center-cropped; the crop offsets
and the original size are kept because SDXL is conditioned on them (``time_ids``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGE_SIDE = 32


@dataclass(frozen=True)
class Item:
    """One dataset entry before encoding."""

    image: Path
    caption: str


@dataclass(frozen=True)
class Placement:
    """How an image of ``original`` size (w, h) lands in its ``bucket`` (w, h)."""

    original: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_left: int
    crop_top: int

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

        The order ComfyUI's SDXL ``encode_adm`` embeds (height, width, crop_h, crop_w,
        target_height, target_width) and diffusers' ``add_time_ids``.
        """
        ow, oh = self.original
        bw, bh = self.bucket
        return (oh, ow, self.crop_top, self.crop_left, bh, bw)


def scan_folder(folder: str | Path, default_caption: str = "") -> list[Item]:
    """Images of ``folder`` (sorted, non-recursive) with their captions.

    Raises ``ValueError`` when the folder is missing or has no image, or when an image has no
    ``.txt`` caption and ``default_caption`` is empty.
    """
    path = Path(folder).expanduser()
    if not str(folder).strip():
        raise ValueError("dataset_folder is empty: set it to a folder of images with same-name .txt captions")
    if not path.is_dir():
        raise ValueError(f"dataset_folder={str(folder)!r} is not a folder: give the path of a folder of images")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(
            f"dataset_folder={str(folder)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}): add training images"
        )
    items, missing = [], []
    for image in images:
        txt = image.with_suffix(".txt")
        if txt.is_file():
            caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        elif default_caption.strip():
            caption = default_caption.strip()
        else:
            missing.append(image.name)
            continue
        items.append(Item(image, caption))
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) in {str(folder)!r} have no .txt caption (e.g. {missing[0]}): add "
            f"same-name .txt files or set default_caption"
        )
    return items


def load_image(path: Path):
    """Open ``path`` as an RGB PIL image; ``ValueError`` naming the file when unreadable or tiny."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}; remove or re-save the file") from exc
    if min(rgb.size) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image {path} is {rgb.size[0]}x{rgb.size[1]} px; every side must be at least {MIN_IMAGE_SIDE} px: "
            f"remove it or use a larger version"
        )
    return rgb


def validate_resolution(resolution: int, multiple: int, name: str = "resolution") -> None:
    if resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"{name}={resolution} must be a positive multiple of {multiple} for this model; "
            f"use e.g. {max(multiple, round(resolution / multiple) * multiple)}"
        )


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """Bucket sizes (w, h): multiples of ``step``, sides in [min_side, max_side], area <= resolution^2.

    For every width the tallest fitting height is taken (kohya's scheme), plus the transposes.
    """
    if step <= 0 or step % 8:
        raise ValueError(f"bucket_step={step} must be a positive multiple of 8")
    if not (0 < min_side <= resolution <= max_side):
        raise ValueError(
            f"buckets need min_bucket ({min_side}) <= resolution ({resolution}) <= max_bucket ({max_side})"
        )
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    w = min_side - min_side % step or step
    while w <= max_side:
        h = min(max_side, (area // w) // step * step)
        if h >= min_side and w >= min_side:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


def place(size: tuple[int, int], buckets: list[tuple[int, int]], step: int, no_upscale: bool) -> Placement:
    """Choose the bucket with the closest aspect ratio, scale to cover it, center-crop.

    With ``no_upscale`` an image smaller (in area) than its bucket gets its own bucket: its size
    rounded down to ``step`` at the same aspect, so it is never enlarged.
    """
    w, h = size
    ratio = math.log(w / h)
    bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if no_upscale and w * h < bucket[0] * bucket[1]:
        bucket = (max(step, w // step * step), max(step, h // step * step))
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return Placement(
        original=(w, h), bucket=bucket, resized=(rw, rh), crop_left=(rw - bw) // 2, crop_top=(rh - bh) // 2
    )


def render(image, placement: Placement) -> torch.Tensor:
    """Resize (Lanczos) and crop a PIL image as ``placement`` says; returns [H, W, 3] float in [0, 1]."""
    from PIL import Image

    resized = image.resize(placement.resized, Image.Resampling.LANCZOS)
    bw, bh = placement.bucket
    cropped = resized.crop((placement.crop_left, placement.crop_top, placement.crop_left + bw, placement.crop_top + bh))
    data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(bh, bw, 3)
    return data.float() / 255.0


def process_caption(caption: str, rng: random.Random, dropout: float, shuffle: bool, keep_tokens: int) -> str:
    """Caption augmentation: drop the whole caption with probability ``dropout``; otherwise, when
    ``shuffle``, shuffle the comma-separated tags after the first ``keep_tokens`` ones."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)
