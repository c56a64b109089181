"""Turn a dataset folder into encoded training samples (bucketed, latents cached)."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from . import data
from .trainer import Sample

logger = logging.getLogger(__name__)


def _cache_file(folder: Path, item: data.Item, placement: data.Placement, encoder_id: str) -> Path:
    stat = item.image.stat()
    key = f"{item.image.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{placement}|{encoder_id}"
    return folder / f"{item.image.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"


def _load_latent(path: Path) -> torch.Tensor | None:
    """The cached latent, or ``None`` (logged) when the file is unreadable: it is then re-encoded."""
    from safetensors.torch import load_file

    try:
        latent = load_file(str(path))["latent"]
    except Exception as exc:  # truncated/corrupt/foreign file of any kind: re-encode and rewrite
        logger.warning("LoRA latent cache: ignoring unreadable %s (%s); re-encoding", path.name, exc)
        return None
    if latent.ndim != 3:
        logger.warning("LoRA latent cache: %s holds shape %s; re-encoding", path.name, list(latent.shape))
        return None
    return latent


def _save_latent(path: Path, latent: torch.Tensor) -> None:
    """Write through a temporary file and rename, so an interrupted write leaves no partial entry."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({"latent": latent}, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:  # the cache is optional: a full or read-only disk must not stop training
        logger.warning("LoRA latent cache: could not write %s (%s); continuing without it", path, exc)
        tmp.unlink(missing_ok=True)


def build_samples(
    items: list[data.Item],
    *,
    resolution: int,
    min_bucket: int,
    max_bucket: int,
    bucket_step: int,
    no_upscale: bool,
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    cache_dir: Path | None = None,
    encoder_id: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Load, bucket, crop and encode every image once.

    ``encode_image([H, W, 3] in [0, 1]) -> latent [C, H/8, W/8]`` (already scaled for the UNet).
    With ``cache_dir`` the latents are also stored as safetensors files keyed by the image's path,
    mtime, size, placement and ``encoder_id``, so the next run skips the VAE.
    """
    buckets = data.make_buckets(resolution, min_bucket, max_bucket, bucket_step)
    samples = []
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(items):
        image = data.load_image(item.image)
        placement = data.place(image.size, buckets, bucket_step, no_upscale)
        cached = _cache_file(cache_dir, item, placement, encoder_id) if cache_dir is not None else None
        latent = _load_latent(cached) if cached is not None and cached.is_file() else None
        if latent is None:
            latent = encode_image(data.render(image, placement)).detach().to("cpu", torch.float32).contiguous()
            if cached is not None:
                _save_latent(cached, latent)
        samples.append(
            Sample(latent=latent, caption=item.caption, time_ids=placement.time_ids, bucket=placement.bucket)
        )
        if progress is not None:
            progress(index + 1, len(items))
    sizes: dict[tuple[int, int], int] = {}
    for s in samples:
        sizes[s.bucket] = sizes.get(s.bucket, 0) + 1
    logger.info("LoRA dataset: %d images in buckets %s", len(samples), sizes)
    return samples
