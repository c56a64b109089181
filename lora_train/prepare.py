"""Turn a dataset folder into encoded training samples (bucketed, latents cached)."""

from __future__ import annotations

import hashlib
import logging
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
    from safetensors.torch import load_file, save_file

    buckets = data.make_buckets(resolution, min_bucket, max_bucket, bucket_step)
    samples = []
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(items):
        image = data.load_image(item.image)
        placement = data.place(image.size, buckets, bucket_step, no_upscale)
        cached = _cache_file(cache_dir, item, placement, encoder_id) if cache_dir is not None else None
        if cached is not None and cached.is_file():
            latent = load_file(str(cached))["latent"]
        else:
            latent = encode_image(data.render(image, placement)).detach().to("cpu", torch.float32).contiguous()
            if cached is not None:
                save_file({"latent": latent}, str(cached))
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
