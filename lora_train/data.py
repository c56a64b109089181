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


def user_path(folder: str | Path) -> Path:
    """The path typed into a node input: whitespace and one pair of surrounding quotes removed
    (Windows' "Copy as path" adds them), ``~`` expanded."""
    text = str(folder).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return Path(text).expanduser()


def scan_folder(folder: str | Path, default_caption: str = "") -> list[Item]:
    """Images of ``folder`` (sorted, non-recursive) with their captions.

    Raises ``ValueError`` naming ``dataset_folder`` when the folder is missing, unreadable or has
    no image, when an image has no ``.txt`` caption and ``default_caption`` is empty, or when an
    image cannot be opened (zero bytes, not an image, too small): all before any model work.
    """
    if not str(folder).strip():
        raise ValueError("dataset_folder: empty; set it to the path of a folder of images with same-name .txt captions")
    path = user_path(folder)
    if not path.is_dir():
        what = "is a file, not a folder" if path.is_file() else "does not exist"
        raise ValueError(
            f"dataset_folder: {str(folder)!r} {what}; give the path of a folder of images with same-name .txt captions"
        )
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise ValueError(
            f"dataset_folder: {str(folder)!r} cannot be listed ({exc}); check that ComfyUI may read it"
        ) from exc
    images = sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(
            f"dataset_folder: {str(folder)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}); add training images "
            f"or give the folder that holds them"
        )
    items, missing = [], []
    for image in images:
        txt = image.with_suffix(".txt")
        if txt.is_file():
            try:
                caption = txt.read_text(encoding="utf-8", errors="replace").strip()
            except OSError as exc:
                raise ValueError(
                    f"dataset_folder: cannot read the caption {txt} ({exc}): check its permissions or re-save it"
                ) from exc
        elif default_caption.strip():
            caption = default_caption.strip()
        else:
            missing.append(image.name)
            continue
        items.append(Item(image, caption))
    if missing:
        raise ValueError(
            f"dataset_folder: {len(missing)} image(s) in {str(folder)!r} have no .txt caption (e.g. {missing[0]}): "
            f"add same-name .txt files or set default_caption"
        )
    for item in items:
        check_image(item.image)
    return items


def _unreadable(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"dataset_folder: cannot read image {path} ({detail}): remove it from the folder or re-save it as PNG/JPEG"
    )


def check_image(path: Path) -> tuple[int, int]:
    """Size (w, h) from the file's header only (fast: no pixel decoding); ``ValueError`` naming
    ``dataset_folder`` and the file for a zero-byte, non-image or too small file."""
    from PIL import Image

    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise _unreadable(path, str(exc)) from exc
    if empty:
        raise _unreadable(path, "empty file, 0 bytes")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError, ...
        raise _unreadable(path, str(exc) or type(exc).__name__) from exc
    _check_size(path, width, height)
    return width, height


def _check_size(path: Path, width: int, height: int) -> None:
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"dataset_folder: image {path} is {width}x{height} px; every side must be at least {MIN_IMAGE_SIDE} px: "
            f"remove it or use a larger version"
        )


def load_image(path: Path):
    """Open ``path`` as an RGB PIL image; ``ValueError`` naming the file when unreadable or tiny."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as exc:  # truncated data shows only here, when the pixels are decoded
        raise _unreadable(path, str(exc) or type(exc).__name__) from exc
    _check_size(path, *rgb.size)
    return rgb


def validate_resolution(resolution: int, multiple: int, name: str = "resolution") -> None:
    if resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"{name}={resolution} must be a positive multiple of {multiple} for this model; "
            f"use e.g. {max(multiple, round(resolution / multiple) * multiple)}"
        )


def check_buckets(resolution: int, min_bucket: int, max_bucket: int, bucket_step: int, native: bool = False) -> None:
    """``ValueError`` naming the input when the bucket settings contradict each other or ``resolution``.

    ``resolution`` is the effective side (``native``: the node's 0 was replaced by the model's size).
    Each of these used to be clamped or quietly degraded (only the square bucket, or small images
    enlarged under bucket_no_upscale); now the user decides.
    """
    res = f"resolution ({resolution}{', the model native size for resolution=0' if native else ''})"
    if bucket_step <= 0 or bucket_step % 8:
        raise ValueError(
            f"bucket_step: {bucket_step} is not a positive multiple of 8; bucket sides must be multiples of 8 px "
            f"(one latent pixel): use e.g. 64"
        )
    for name, value in (("min_bucket", min_bucket), ("max_bucket", max_bucket)):
        if value <= 0:
            raise ValueError(f"{name}: {value} must be a positive side length in px, e.g. 256 / 2048")
    if min_bucket > max_bucket:
        raise ValueError(
            f"min_bucket: {min_bucket} is larger than max_bucket ({max_bucket}), so no bucket fits between them; "
            f"set min_bucket <= max_bucket, e.g. min_bucket={min(min_bucket, max_bucket)} and "
            f"max_bucket={max(min_bucket, max_bucket)}"
        )
    if min_bucket > resolution:
        raise ValueError(
            f"min_bucket: {min_bucket} is larger than {res}; the square {resolution}x{resolution} bucket must lie "
            f"between min_bucket and max_bucket: set min_bucket <= {resolution} or raise resolution"
        )
    if max_bucket < resolution:
        raise ValueError(
            f"max_bucket: {max_bucket} is smaller than {res}; the square {resolution}x{resolution} bucket must lie "
            f"between min_bucket and max_bucket: set max_bucket >= {resolution} or lower resolution"
        )
    if bucket_step > resolution:
        raise ValueError(
            f"bucket_step: {bucket_step} is larger than {res}: no aspect-ratio bucket would fit besides the square "
            f"and bucket_no_upscale would enlarge small images to {bucket_step} px; set bucket_step <= {resolution}, "
            f"e.g. 64"
        )


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """Bucket sizes (w, h): multiples of ``step``, sides in [min_side, max_side], area <= resolution^2.

    For every width the tallest fitting height is taken (kohya's scheme), plus the transposes.
    """
    check_buckets(resolution, min_side, max_side, step)
    area = resolution * resolution
    top = max_side - max_side % step  # largest multiple of step within max_side
    buckets = {(resolution, resolution)}
    w = min_side - min_side % step or step
    while w <= top:
        h = min(top, (area // w) // step * step)
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
