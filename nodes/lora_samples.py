"""Sample images and validation loss during Train LoRA (ComfyUI side).

The prompt parsing, held-out split and validation loss are plain Python in
``lora_train/``; this module renders the prompts with ComfyUI's own sampler and VAE on the
model being trained (its UNet carries the LoRA layers while the run lasts), writes the
pictures beside the LoRA, shows each one on the node as it is made, and reports the
validation loss to the log and the live chart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..lora_train.sample_prompts import SamplePrompt
from .comfy_bridge import throw_if_interrupted

logger = logging.getLogger(__name__)

SAMPLER, SCHEDULER = "dpmpp_2m", "karras"
"""Sampler of the sample images: a common, deterministic choice that is good at 20 steps."""
PREVIEW_MAX = 512


def _encode(clip, text: str) -> list:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _save_png(image: torch.Tensor, path: Path, info: dict) -> None:
    """``[H, W, 3]`` float -> PNG with the prompt and settings in a text chunk; written under a
    temporary name first so a cancelled run never leaves a half-written picture."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    meta = PngInfo()
    meta.add_text("speedkit_sample", json.dumps(info))
    partial = path.with_name(path.name + ".partial")
    Image.fromarray(pixels).save(partial, format="PNG", pnginfo=meta, compress_level=4)
    partial.replace(path)


class SampleRenderer:
    """Renders the sample prompts with the model as trained so far.

    Prompts are encoded once, up front (the text encoders may leave the GPU afterwards),
    unless the text encoder itself is being trained: then they are encoded again at every
    sampling point so the pictures show its LoRA too.
    """

    def __init__(self, prompts: list[SamplePrompt], clip, vae, folder: Path, name: str, reencode: bool) -> None:
        self.prompts, self.clip, self.vae = prompts, clip, vae
        self.folder, self.name, self.reencode = folder, name, reencode
        self.last: list[torch.Tensor] = []
        self.saved: list[Path] = []
        self._conds = None if reencode else [self._conditioning(p) for p in prompts]

    def _conditioning(self, p: SamplePrompt) -> tuple[list, list]:
        with torch.no_grad():
            return _encode(self.clip, p.prompt), _encode(self.clip, p.negative)

    def render(self, patcher, step: int, preview=None) -> list[Path]:
        """Render every prompt at ``step``; ``preview(image)`` sees each picture as it is made.
        Out-of-memory skips this round with a warning (training goes on); Cancel stops it."""
        import comfy.sample

        self.folder.mkdir(parents=True, exist_ok=True)
        images, paths = [], []
        try:
            with torch.no_grad():
                for k, p in enumerate(self.prompts):
                    throw_if_interrupted()
                    positive, negative = self._conditioning(p) if self._conds is None else self._conds[k]
                    latent = torch.zeros(1, 4, p.height // 8, p.width // 8)
                    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
                    noise = comfy.sample.prepare_noise(latent, p.seed)
                    samples = comfy.sample.sample(
                        patcher,
                        noise,
                        p.steps,
                        p.cfg,
                        SAMPLER,
                        SCHEDULER,
                        positive,
                        negative,
                        latent,
                        denoise=1.0,
                        callback=lambda *_a: throw_if_interrupted(),
                        disable_pbar=True,
                        seed=p.seed,
                    )
                    image = self.vae.decode(samples)[0, ..., :3].float().cpu()
                    path = self.folder / f"{self.name}_{step:06d}_{k:02d}.png"
                    info = {**p.__dict__, "step": step, "sampler": SAMPLER, "scheduler": SCHEDULER}
                    _save_png(image, path, info)
                    images.append(image)
                    paths.append(path)
                    if preview is not None:
                        preview(image)
        except Exception as exc:
            from ..torch_utils import is_oom_error

            if not is_oom_error(exc):
                raise
            logger.warning("Train LoRA: sample images of step %d skipped: out of GPU memory (%s)", step, exc)
            return paths
        logger.info("Train LoRA: %d sample image(s) of step %d saved in %s", len(paths), step, self.folder)
        self.last, self.saved = images, self.saved + paths
        return paths


def preview_payload(image: torch.Tensor) -> tuple:
    """``[H, W, 3]`` float -> the preview a ComfyUI progress-bar update shows on the node."""
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return ("PNG", Image.fromarray(pixels), PREVIEW_MAX)


def last_round_batch(images: list[torch.Tensor]) -> torch.Tensor | None:
    """The pictures of the last round that share the first one's size, as an IMAGE batch."""
    if not images:
        return None
    first = images[0].shape
    return torch.stack([im for im in images if im.shape == first])
