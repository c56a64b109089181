"""ComfyUI adapter for lora_train/: ``SpeedKit_TrainLoRA`` (SD1.5 / SDXL LoRA from the loaded checkpoint).

Everything ComfyUI-specific lives here: reading the family from the MODEL object, text encoding
through the CLIP object (SDXL size conditioning through the model's own ``encode_adm``), latents
through the VAE, loading through ComfyUI's model management, progress / cancel / live chart, and
applying the trained file with ComfyUI's own LoRA loader. The loop itself is ``lora_train.trainer``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from comfy_api.latest import io

from .. import torch_utils
from ..lora_train import checkpoint, data, inputs, layers, optim, text_cache, validation
from ..lora_train.chart import loss_chart
from ..lora_train.naming import ldm_to_diffusers_path
from ..lora_train.prepare import build_samples
from ..lora_train.sample_prompts import SEED_MAX, SIZE_MAX, SamplePrompt, parse_prompts
from ..lora_train.trainer import (
    PRECISIONS,
    RunInfo,
    TrainConfig,
    Trainer,
    check_resume,
    precompute_conditioning,
    stack_conditioning,
)
from . import comfy_bridge, lora_samples, residency
from .comfy_bridge import progress_bar, to_intermediate

logger = logging.getLogger(__name__)

LOSS_EVENT = "speedkit.lora_train.loss"
# With the fused LoRA branch, recomputing the transformer blocks AND the ResBlocks measured both
# faster and smaller than transformer blocks alone (SDXL 1024 on an H100: 1.21 vs 1.13 it/s,
# 5.99 vs 6.37 GiB peak; README "Speed (measured)").
CHECKPOINT_BLOCKS = ("BasicTransformerBlock", "ResBlock")
STATE_SUBDIR = "speedkit_lora_state"
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT_CACHE_SUBDIR = "text_encoder"  # inside <dataset>/_latent_cache
TEXT_LAYOUTS = {
    "sd15": text_cache.Layout("sd15", context_dim=768),
    "sdxl": text_cache.Layout("sdxl", context_dim=2048, pooled_dim=1280),
}
# encoded once per run to fingerprint the CLIP as it will really encode (patches, clip skip, dtype)
TEXT_CACHE_PROBE = "speedkit text cache probe, a photo of a red cube on a table"


@dataclass(frozen=True)
class Family:
    """What the trainer needs to know about the loaded checkpoint."""

    name: str  # "sd15" | "sdxl"
    prediction: str  # "eps" | "v"
    resolution_multiple: int
    default_resolution: int
    base_model_version: str
    architecture: str
    implementation: str
    text_encoders: tuple[tuple[str, str], ...]  # (attribute of cond_stage_model, kohya prefix)


def detect_family(model) -> Family:
    """SD1.5 or SDXL, eps or v, from a ComfyUI MODEL; ``ValueError`` for anything else."""
    import comfy.model_base
    import comfy.supported_models

    base = model.model
    config = getattr(base, "model_config", None)
    config_name = type(config).__name__ if config is not None else type(base).__name__
    model_type = getattr(base, "model_type", None)
    kind = getattr(model_type, "name", str(model_type))
    if kind == "EPS":
        prediction = "eps"
    elif kind == "V_PREDICTION":
        prediction = "v"
    else:
        prediction = ""
    if type(base) is comfy.model_base.SDXL and isinstance(config, comfy.supported_models.SDXL):
        family = Family(
            "sdxl",
            prediction,
            64,
            1024,
            "sdxl_base_v1-0" if prediction == "eps" else "sdxl_base_v1-0_v",
            "stable-diffusion-xl-v1-base/lora",
            "https://github.com/Stability-AI/generative-models",
            (("clip_l", "lora_te1"), ("clip_g", "lora_te2")),
        )
    elif type(base) is comfy.model_base.BaseModel and type(config) is comfy.supported_models.SD15:
        family = Family(
            "sd15",
            prediction,
            8,
            512,
            "sd_v1" if prediction == "eps" else "sd_v1_v",
            "stable-diffusion-v1/lora",
            "diffusers",
            (("clip_l", "lora_te"),),
        )
    else:
        raise ValueError(
            f"model: this is a {config_name} checkpoint; Train LoRA (SpeedKit) supports SD1.5 and SDXL only "
            f"(SD2, SD3, Flux and other families are not supported yet). Load an SD1.5 or SDXL checkpoint."
        )
    if not prediction:
        raise ValueError(
            f"model: {config_name} with prediction type {kind} is not supported; only eps and v-prediction "
            f"(DDPM) SD1.5/SDXL checkpoints can be trained"
        )
    return family


def _materialize_inference_tensors(module: torch.nn.Module) -> int:
    """Replace parameters/buffers created under ``torch.inference_mode`` by normal copies.

    ComfyUI loads checkpoints inside inference mode; autograd refuses to save such tensors for
    backward even when they are frozen. Values, dtype and device are unchanged.
    """
    count = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and torch.is_inference(p):
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                count += 1
        for name, b in list(sub._buffers.items()):
            if b is not None and torch.is_inference(b):
                sub._buffers[name] = b.clone()
                count += 1
    return count


class _OutOfPlaceClipLayers:
    """While active, ComfyUI's CLIP layers add their residuals out of place.

    ``CLIPLayer.forward`` does ``x += attn(norm(x))``; autograd rejects that in-place update when
    the text encoder is trained. The same pre-norm residual computation without mutation is set as
    an instance attribute and removed on exit.
    """

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.layers = [
            m
            for root in modules
            for m in root.modules()
            if all(hasattr(m, a) for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp"))
        ]

    def __enter__(self):
        for layer in self.layers:

            def forward(x, mask=None, optimized_attention=None, _m=layer):
                h = x + _m.self_attn(_m.layer_norm1(x), mask, optimized_attention)
                return h + _m.mlp(_m.layer_norm2(h))

            layer.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


def _send_loss(
    node_id: str | None, step: int, total: int, loss: float | None, validation_loss: float | None = None
) -> None:
    """Live chart event for web/js/lora_train.js (``loss`` None: a validation point only);
    silently skipped without a running server."""
    event = {"node": node_id, "step": step, "total": total, "loss": loss}
    if validation_loss is not None:
        event["validation_loss"] = validation_loss
    comfy_bridge.send_event(LOSS_EVENT, event)


class TrainLoRA(io.ComfyNode):
    """Train an SD1.5 / SDXL LoRA on a folder of captioned images, from the loaded checkpoint."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_TrainLoRA",
            display_name="Train LoRA (SD1.5/SDXL)",
            category="SpeedKit/training",
            description=(
                "Trains a LoRA for the loaded SD1.5 or SDXL checkpoint on a folder of images with same-name "
                ".txt captions, saves it to models/loras in the kohya format every SD tool reads, and returns "
                "the MODEL and CLIP with the LoRA applied plus a loss curve. The input MODEL/CLIP are not "
                "changed. Cancel saves the current LoRA and a resume state."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SDXL MODEL from Load Checkpoint (left unchanged)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP; captions are encoded with it."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE; encodes the training images once."),
                io.String.Input(
                    "dataset_folder",
                    default="",
                    tooltip="Folder of training images (png/jpg/webp/bmp) with same-name .txt captions.",
                ),
                io.String.Input(
                    "output_name",
                    default="my_lora",
                    tooltip="File name (no folder) of the LoRA written to models/loras/<output_name>.safetensors; "
                    "a trailing .safetensors is dropped.",
                ),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps to train."),
                io.Float.Input(
                    "learning_rate",
                    default=1e-4,
                    min=1e-7,
                    max=1.0,
                    step=1e-5,
                    tooltip="UNet LoRA learning rate (1e-4 is a good start).",
                ),
                io.Int.Input(
                    "rank", default=16, min=1, max=1024, tooltip="LoRA dimension (network_dim); 8-32 typical."
                ),
                io.Float.Input(
                    "alpha",
                    default=16.0,
                    min=0.01,
                    max=1024.0,
                    step=0.5,
                    tooltip="LoRA alpha; the LoRA is scaled by alpha/rank (alpha = rank: scale 1).",
                ),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=4096,
                    step=8,
                    tooltip="Training side length in px; 0 = the model's native (512 SD1.5, 1024 SDXL). "
                    "Multiple of 64 for SDXL, of 8 for SD1.5.",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per micro-batch (same bucket)."),
                io.Combo.Input(
                    "target",
                    options=list(layers.TARGET_PRESETS),
                    default="attention",
                    tooltip="attention: to_q/to_k/to_v/to_out of every attention. attention+mlp: kohya's default, "
                    "all Linear layers of the transformer blocks incl. feed-forward and proj_in/out.",
                ),
                io.Boolean.Input(
                    "train_text_encoder",
                    default=False,
                    tooltip="Also train a LoRA on the text encoder(s); slower, disables text-encoder caching.",
                ),
                io.Float.Input(
                    "text_encoder_lr",
                    default=5e-5,
                    min=0.0,
                    max=1.0,
                    step=1e-5,
                    tooltip="Learning rate of the text-encoder LoRA (only when train_text_encoder is on).",
                    advanced=True,
                ),
                io.Combo.Input(
                    "optimizer",
                    options=list(optim.OPTIMIZERS),
                    default="AdamW",
                    tooltip="AdamW, or AdamW8bit (needs the bitsandbytes package; less optimizer memory).",
                    advanced=True,
                ),
                io.Combo.Input(
                    "lr_scheduler",
                    options=list(optim.SCHEDULERS),
                    default="constant",
                    tooltip="Learning-rate schedule after warmup: constant, cosine or linear decay to 0.",
                    advanced=True,
                ),
                io.Int.Input(
                    "warmup_steps",
                    default=0,
                    min=0,
                    max=100_000,
                    tooltip="Steps of linear LR warmup from 0 (0 = none).",
                    advanced=True,
                ),
                io.Int.Input(
                    "grad_accumulation",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Micro-batches per optimizer step (effective batch = batch_size x this).",
                    advanced=True,
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="bf16",
                    tooltip="Mixed precision of the forward/backward: bf16 (recommended), fp16 (with loss "
                    "scaling) or fp32 (no autocast). LoRA weights are always kept in fp32.",
                    advanced=True,
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute the transformer blocks' and ResBlocks' activations in the backward pass: needed for SDXL "
                    "at 1024 px on <= 16 GB; SD1.5 at 512 px trains ~2.4x faster with it off.",
                    advanced=True,
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of LoRA init, noise, timesteps, batches."
                ),
                io.Float.Input(
                    "min_snr_gamma",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    tooltip="Min-SNR loss weighting gamma; 0 = off, 5 typical.",
                    advanced=True,
                ),
                io.Float.Input(
                    "noise_offset",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Noise offset (per-channel constant added to the noise); 0 = off, 0.05 typical.",
                    advanced=True,
                ),
                io.Float.Input(
                    "caption_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability (0-1) of training a step with an empty caption; 0 = off.",
                    advanced=True,
                ),
                io.Boolean.Input(
                    "shuffle_captions",
                    default=False,
                    tooltip="Shuffle comma-separated caption tags each step (after the first keep_tokens).",
                    advanced=True,
                ),
                io.Int.Input(
                    "keep_tokens",
                    default=0,
                    min=0,
                    max=255,
                    tooltip="Leading caption tags never shuffled (e.g. 1 keeps the trigger word first).",
                    advanced=True,
                ),
                io.String.Input(
                    "default_caption",
                    default="",
                    tooltip="Caption for images without a .txt file; empty = such images are an error.",
                    advanced=True,
                ),
                io.Int.Input(
                    "min_bucket",
                    default=256,
                    min=64,
                    max=4096,
                    step=8,
                    tooltip="Smallest aspect-ratio bucket side in px; at most resolution.",
                    advanced=True,
                ),
                io.Int.Input(
                    "max_bucket",
                    default=2048,
                    min=64,
                    max=8192,
                    step=8,
                    tooltip="Largest aspect-ratio bucket side in px; at least resolution. "
                    "Set min=max=resolution for square crops.",
                    advanced=True,
                ),
                io.Int.Input(
                    "bucket_step",
                    default=64,
                    min=8,
                    max=512,
                    step=8,
                    tooltip="Bucket sides are multiples of this many px (a multiple of 8, at most resolution).",
                    advanced=True,
                ),
                io.Boolean.Input(
                    "bucket_no_upscale",
                    default=False,
                    tooltip="Never enlarge an image: small images get a bucket of their own (smaller) size.",
                    advanced=True,
                ),
                io.Int.Input(
                    "save_every",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Also save <name>-stepNNNNNN.safetensors and a resume state every N steps; 0 = only at the end.",
                    advanced=True,
                ),
                io.Int.Input(
                    "keep_last",
                    default=0,
                    min=0,
                    max=1000,
                    tooltip="Keep only the newest N step files (0 = keep all).",
                    advanced=True,
                ),
                io.Combo.Input(
                    "save_precision",
                    options=list(checkpoint.SAVE_DTYPES),
                    default="fp16",
                    tooltip="dtype of the saved LoRA tensors (fp16 is what most tools expect).",
                    advanced=True,
                ),
                io.String.Input(
                    "resume_from",
                    default="",
                    tooltip="Resume a run: the <name>-state.json path, or the output_name of a run whose state is "
                    "in output/speedkit_lora_state. Empty = start fresh.",
                    advanced=True,
                ),
                io.Boolean.Input(
                    "cache_latents_to_disk",
                    default=False,
                    tooltip="Also keep the VAE latents in <dataset>/_latent_cache, and (text encoder frozen, "
                    "captions not shuffled) the text-encoder outputs in <dataset>/_latent_cache/text_encoder, "
                    "so the next run loads them instead of encoding. Entries are checked against the image, "
                    "caption text and model fingerprint; stale or corrupt ones are re-encoded.",
                    advanced=True,
                ),
                io.Int.Input(
                    "sample_every",
                    default=0,
                    min=0,
                    max=1_000_000,
                    optional=True,
                    tooltip="Render the sample prompts every N steps (and after the last step); 0 = only after "
                    "the last step, when there are prompts. Pictures are shown on the node and saved beside "
                    "the LoRA in <output_name>_samples.",
                ),
                io.String.Input(
                    "sample_prompts",
                    default="",
                    multiline=True,
                    optional=True,
                    tooltip="One prompt per line (empty = no samples). kohya-style options per line: --n negative "
                    "--w width --h height --d seed --s steps --l cfg.",
                ),
                io.Int.Input(
                    "sample_size",
                    default=0,
                    min=0,
                    max=SIZE_MAX,
                    step=8,
                    optional=True,
                    tooltip="Width and height of the sample images when a line sets none; 0 = the training resolution.",
                ),
                io.Int.Input(
                    "sample_seed",
                    default=0,
                    min=0,
                    max=SEED_MAX,
                    optional=True,
                    tooltip="Seed of the first prompt (line k gets seed + k unless it sets --d); the same at every "
                    "sampling point, so the pictures are comparable.",
                ),
                io.Float.Input(
                    "validation_split",
                    default=0.0,
                    min=0.0,
                    max=validation.SPLIT_MAX,
                    step=0.01,
                    optional=True,
                    tooltip="Fraction of the images held out of training to compute a validation loss on "
                    "(at least one image); 0 = off. A rising validation loss means over-fitting.",
                ),
                io.Int.Input(
                    "validate_every",
                    default=50,
                    min=1,
                    max=1_000_000,
                    optional=True,
                    tooltip="Steps between validation-loss measurements (also measured after the last step).",
                ),
            ],
            outputs=[
                io.String.Output(display_name="lora_path", tooltip="Absolute path of the saved .safetensors LoRA."),
                io.Model.Output(
                    display_name="MODEL", tooltip="The input MODEL with the trained LoRA applied (strength 1)."
                ),
                io.Clip.Output(
                    display_name="CLIP",
                    tooltip="The input CLIP with the text-encoder LoRA applied (unchanged when it was not trained).",
                ),
                io.Image.Output(display_name="loss", tooltip="Loss curve: raw loss per step and moving average."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        dataset_folder: str,
        output_name: str,
        steps: int,
        learning_rate: float,
        rank: int,
        alpha: float,
        resolution: int,
        batch_size: int,
        target: str,
        train_text_encoder: bool,
        text_encoder_lr: float = 5e-5,
        optimizer: str = "AdamW",
        lr_scheduler: str = "constant",
        warmup_steps: int = 0,
        grad_accumulation: int = 1,
        precision: str = "bf16",
        gradient_checkpointing: bool = True,
        seed: int = 0,
        min_snr_gamma: float = 0.0,
        noise_offset: float = 0.0,
        caption_dropout: float = 0.0,
        shuffle_captions: bool = False,
        keep_tokens: int = 0,
        default_caption: str = "",
        min_bucket: int = 256,
        max_bucket: int = 2048,
        bucket_step: int = 64,
        bucket_no_upscale: bool = False,
        save_every: int = 0,
        keep_last: int = 0,
        save_precision: str = "fp16",
        resume_from: str = "",
        cache_latents_to_disk: bool = False,
        sample_every: int = 0,
        sample_prompts: str = "",
        sample_size: int = 0,
        sample_seed: int = 0,
        validation_split: float = 0.0,
        validate_every: int = 50,
    ) -> io.NodeOutput:
        import folder_paths

        # every check that needs no model work comes first: a bad input fails in milliseconds
        inputs.check_numbers(
            {
                "learning_rate": learning_rate,
                "text_encoder_lr": text_encoder_lr,
                "alpha": alpha,
                "min_snr_gamma": min_snr_gamma,
                "noise_offset": noise_offset,
                "caption_dropout": caption_dropout,
            }
        )
        inputs.check_text_encoder_lr(text_encoder_lr, train_text_encoder)
        name = checkpoint.validate_output_name(output_name)
        family = detect_family(model)
        native = resolution == 0
        resolution = resolution or family.default_resolution
        data.validate_resolution(resolution, family.resolution_multiple)
        data.check_buckets(resolution, min_bucket, max_bucket, bucket_step, native=native)
        items = data.scan_folder(dataset_folder, default_caption)
        dataset = data.user_path(dataset_folder)
        config = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accumulation,
            unet_lr=learning_rate,
            te_lr=text_encoder_lr,
            rank=rank,
            alpha=alpha,
            target=target,
            train_te=train_text_encoder,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            warmup_steps=warmup_steps,
            precision=precision,
            grad_checkpointing=gradient_checkpointing,
            seed=seed,
            prediction=family.prediction,
            min_snr_gamma=min_snr_gamma,
            noise_offset=noise_offset,
            caption_dropout=caption_dropout,
            shuffle_captions=shuffle_captions,
            keep_tokens=keep_tokens,
            save_every=save_every,
            keep_last=keep_last,
            save_dtype=save_precision,
        )
        config.validate()
        extras = _extras(
            sample_every,
            sample_prompts,
            sample_size or resolution,
            sample_seed,
            validation_split,
            validate_every,
            items,
        )
        lora_dir = Path(folder_paths.get_folder_paths("loras")[0])
        state_dir = Path(folder_paths.get_output_directory()) / STATE_SUBDIR
        resume_path = _resolve_resume(resume_from, state_dir)
        if resume_path is not None:
            # the JSON and the tensor file's header: a damaged or mismatched state fails before any encoding
            _, state_json, state_info = checkpoint.read_state_info(resume_path)
            check_resume(state_info, config, state_json)
        run = _Run(cls.hidden.unique_id, family, model, clip, vae, config, extras)
        result_path, losses = run.train(
            items,
            name=name,
            resolution=resolution,
            buckets=(min_bucket, max_bucket, bucket_step, bucket_no_upscale),
            lora_dir=lora_dir,
            state_dir=state_dir,
            resume_from=resume_path,
            cache_dir=dataset / "_latent_cache" if cache_latents_to_disk else None,
            dataset_dir=str(dataset),
        )
        model_out, clip_out = apply_lora_file(model, clip, result_path)
        chart = loss_chart(losses, title=f"{name}: loss over {len(losses)} steps", validation=run.validation_points)
        pictures = lora_samples.last_round_batch(run.sample_images)
        shown = None
        if pictures is not None:
            from comfy_api.latest import ui

            shown = ui.PreviewImage(pictures, cls=cls)
        return io.NodeOutput(str(result_path), model_out, clip_out, to_intermediate(chart), ui=shown)


def _resolve_resume(value: str, state_dir: Path) -> Path | None:
    """``resume_from`` as a path: a state file path, or an ``output_name`` whose state is in ``state_dir``."""
    if not value.strip():
        return None
    path = data.user_path(value)
    if path.is_absolute() or path.exists() or Path(f"{path}-state.json").exists():
        return path
    return state_dir / path


def apply_lora_file(model, clip, path: Path):
    """MODEL/CLIP clones with the LoRA file applied at strength 1 by ComfyUI's own loader."""
    import comfy.sd
    import comfy.utils

    lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)


@dataclass(frozen=True)
class _Extras:
    """What the run does between steps besides training: sample images, validation loss."""

    prompts: tuple[SamplePrompt, ...] = ()
    sample_every: int = 0
    validation_split: float = 0.0
    validate_every: int = 50


def _extras(sample_every, prompts_text, size, seed, validation_split, validate_every, items) -> _Extras:
    """Check the sampling and validation inputs (before any model work) and bundle them."""
    for label, value in (("sample_every", sample_every), ("validate_every", validate_every), ("sample_seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label}: {value!r} must be a whole number >= 0")
    if not 64 <= size <= SIZE_MAX or size % 8:
        raise ValueError(
            f"sample_size: {size} must be a multiple of 8 between 64 and {SIZE_MAX} (0 = training resolution)"
        )
    prompts = tuple(parse_prompts(prompts_text or "", width=size, height=size, seed=seed))
    if sample_every and not prompts:
        raise ValueError(
            "sample_prompts: sample_every is set but there is no prompt; write one prompt per line or set sample_every to 0"
        )
    validation.split_holdout(len(items), validation_split, 0)  # refuses a split that leaves nothing to train on
    return _Extras(prompts, sample_every, validation_split, max(1, validate_every))


class _Run:
    """One training call: holds the cloned patchers and undoes every injection at the end."""

    def __init__(
        self, node_id, family: Family, model, clip, vae, config: TrainConfig, extras: _Extras = _Extras()
    ) -> None:
        self.node_id = node_id
        self.extras = extras
        self.validation_points: list[tuple[int, float]] = []
        self.sample_images: list[torch.Tensor] = []
        self._held: list = []
        self._held_conds: list | None = None
        self._renderer: lora_samples.SampleRenderer | None = None
        self.family = family
        self.patcher = model.clone()
        self.clip = clip.clone()
        self.vae = vae
        self.config = config

    def _encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """The raw text-encoder outputs for one caption (what the on-disk text cache stores)."""
        clip = self.clip
        out = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True, return_dict=True)
        result = {"cond": out["cond"]}
        if self.family.name == "sdxl":
            result["pooled"] = out["pooled_output"]
        return result

    def _text_cache(self, cache_dir: Path | None) -> text_cache.TextEncoderCache | None:
        """The on-disk text-encoder cache, when it applies: a disk cache was asked for, the text
        encoder is frozen and captions are not shuffled (shuffling makes a new text almost every
        step: one file per step would cost more disk and I/O than it saves)."""
        config = self.config
        if cache_dir is None or config.train_te:
            return None
        if config.shuffle_captions:
            logger.info("Train LoRA: shuffled captions vary per step; text-encoder outputs are not cached on disk")
            return None
        with torch.no_grad():
            probe = self._encode_text(TEXT_CACHE_PROBE)
        stage = self.clip.cond_stage_model
        extra = f"{self.family.name}|{type(stage).__name__}|{type(self.clip.tokenizer).__name__}|{self.clip.layer_idx}"
        fingerprint = text_cache.encoder_fingerprint(stage.state_dict().items(), probe, extra)
        return text_cache.TextEncoderCache(
            cache_dir / TEXT_CACHE_SUBDIR, self._encode_text, fingerprint, TEXT_LAYOUTS[self.family.name]
        )

    def _encoder(self, device: torch.device, cache: text_cache.TextEncoderCache | None = None):
        base_model = self.patcher.model
        sdxl = self.family.name == "sdxl"
        encode_text = cache.get if cache is not None else self._encode_text

        def encode(captions, samples):
            parts = []
            for caption, sample in zip(captions, samples, strict=True):
                out = encode_text(caption)
                cond = {"context": out["cond"].to(device, torch.float32)}
                if sdxl:
                    oh, ow, top, left, th, tw = sample.time_ids
                    y = base_model.encode_adm(
                        pooled_output=out["pooled"],
                        height=oh,
                        width=ow,
                        crop_h=top,
                        crop_w=left,
                        target_height=th,
                        target_width=tw,
                        device=device,
                    )
                    cond["y"] = y.to(device, torch.float32)
                parts.append(cond)
            return stack_conditioning(parts)

        return encode

    def _encode_latents(self, items, resolution, buckets, cache_dir):
        import comfy.model_management as mm

        latent_format = self.patcher.model.latent_format
        vae = self.vae
        pbar = progress_bar(len(items), self.node_id)

        def encode_image(pixels: torch.Tensor) -> torch.Tensor:
            mm.throw_exception_if_processing_interrupted()
            with torch.inference_mode():
                latent = vae.encode(pixels.unsqueeze(0))
                latent = latent_format.process_in(latent.float())
            return latent[0].clone()

        min_bucket, max_bucket, step, no_upscale = buckets  # checked by data.check_buckets in execute()
        return build_samples(
            items,
            resolution=resolution,
            min_bucket=min_bucket,
            max_bucket=max_bucket,
            bucket_step=step,
            no_upscale=no_upscale,
            encode_image=encode_image,
            cache_dir=cache_dir,
            encoder_id=f"{type(vae.first_stage_model).__name__}|{type(latent_format).__name__}",
            progress=lambda done, total: pbar.update_absolute(done, total),
        )

    def train(self, items, *, name, resolution, buckets, lora_dir, state_dir, resume_from, cache_dir, dataset_dir):
        import comfy.model_management as mm

        with torch.inference_mode(False):
            samples = self._encode_latents(items, resolution, buckets, cache_dir)
            device = self.patcher.load_device
            config = self.config
            train_idx, held_idx = validation.split_holdout(len(samples), self.extras.validation_split, config.seed)
            held = [samples[i] for i in held_idx]
            samples = [samples[i] for i in train_idx]
            if held:
                logger.info("Train LoRA: %d image(s) held out for the validation loss", len(held))
            models = [self.patcher]
            cond_cache = None
            disk_text = self._text_cache(cache_dir)
            encode = self._encoder(device, disk_text)
            if not config.train_te and config.caption_dropout == 0 and not config.shuffle_captions:
                # every caption is fixed: encode them all now, then the text encoders may leave the GPU
                cond_cache = precompute_conditioning(encode, samples)
            else:
                models.append(self.clip.patcher)
            self._held = held
            self._held_conds = None
            if held and not config.train_te:
                with torch.no_grad():
                    self._held_conds = [{k: v.detach() for k, v in encode([s.caption], [s]).items()} for s in held]
            self._renderer = None
            if self.extras.prompts:
                self._renderer = lora_samples.SampleRenderer(
                    list(self.extras.prompts), self.clip, self.vae, lora_dir / f"{name}_samples", name, config.train_te
                )
            if disk_text is not None:
                logger.info(
                    "Train LoRA: text-encoder disk cache %s: %d loaded, %d encoded",
                    disk_text.folder,
                    disk_text.hits,
                    disk_text.misses,
                )
            working = 3 * self.patcher.model_size()  # activations, gradients, optimizer state
            with residency.full_residency(self.patcher, "Train LoRA", working_bytes=working) as patcher:
                models[0] = patcher
                mm.load_models_gpu(models, force_full_load=True)
                return self._train_on(
                    patcher,
                    samples,
                    encode,
                    cond_cache,
                    resume_from,
                    name,
                    resolution,
                    lora_dir,
                    state_dir,
                    dataset_dir,
                )

    def _train_on(
        self, patcher, samples, encode, cond_cache, resume_from, name, resolution, lora_dir, state_dir, dataset_dir
    ):
        """Inject the LoRA into ``patcher``'s UNet (the fully loaded copy where one was made),
        train, and take the LoRA out again."""
        config = self.config
        device = patcher.load_device
        unet = patcher.model.diffusion_model
        _materialize_inference_tensors(unet)
        lora = layers.LoRASet()
        try:
            self._inject(lora, unet, device)
            dtype = patcher.model.get_dtype_inference()

            def denoise(x, t, cond):
                y = cond.get("y")
                return unet(
                    x.to(dtype),
                    t.float(),
                    context=cond["context"].to(dtype),
                    y=None if y is None else y.to(dtype),
                    transformer_options={},  # fresh per call: the UNet writes into it
                )

            blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINT_BLOCKS]
            trainer = Trainer(
                self.config,
                lora,
                samples,
                denoise,
                encode,
                device,
                checkpoint_blocks=blocks,
                text_modules=self._text_models() if config.train_te else (),
                cond_cache=cond_cache,
                # a model already in the compute dtype runs natively, as ComfyUI samples it
                autocast=dtype != PRECISION_DTYPES[config.precision],
                # weights streamed by ComfyUI's dynamic VRAM manager move between calls
                cuda_graphs=not getattr(patcher, "is_dynamic", lambda: False)(),
                graph_weights=lambda: list(unet.parameters()),
            )
            if resume_from is not None:
                trainer.load_state(resume_from)
            text_layers = _OutOfPlaceClipLayers(self._text_models() if config.train_te else [])
            with text_layers:
                return self._loop(trainer, patcher, name, resolution, lora_dir, state_dir, dataset_dir)
        finally:
            lora.detach()
            if config.train_te:
                for m in self._text_models():
                    m.train(False)

    def _text_models(self):
        stage = self.clip.cond_stage_model
        return [getattr(stage, attr).transformer for attr, _ in self.family.text_encoders if hasattr(stage, attr)]

    def _inject(self, lora: layers.LoRASet, unet, device) -> None:
        config = self.config
        rename = (lambda p: p) if self.family.name == "sdxl" else self._sd15_rename()
        paths = layers.find_unet_targets(unet, config.target)
        lora.add(unet, paths, rank=config.rank, alpha=config.alpha, prefix="lora_unet", rename=rename, device=device)
        if config.train_te:
            stage = self.clip.cond_stage_model
            for attr, prefix in self.family.text_encoders:
                text_model = getattr(stage, attr).transformer
                _materialize_inference_tensors(text_model)
                weight = next(text_model.parameters())
                lora.add(
                    text_model,
                    layers.find_te_targets(text_model),
                    rank=config.rank,
                    alpha=config.alpha,
                    prefix=prefix,
                    group="te",
                    device=weight.device,
                )

    def _sd15_rename(self):
        unet_config = self.patcher.model.model_config.unet_config
        nrb = unet_config["num_res_blocks"]
        if isinstance(nrb, int):
            nrb = [nrb] * len(unet_config["channel_mult"])
        return lambda path: ldm_to_diffusers_path(path, nrb)

    def _periodic(self, trainer: Trainer, patcher, pbar) -> list:
        """The between-steps work: sample images and validation loss, as ``(every, fn)`` pairs."""
        extras, total = self.extras, self.config.steps
        work = []
        if self._renderer is not None:
            preview_at = lora_samples.preview_sender(pbar, total)

            def render(step: int) -> None:
                self._renderer.render(patcher, step, preview_at(step))
                self.sample_images = self._renderer.last

            work.append((extras.sample_every or total, render))
        if self._held:

            def validate(step: int) -> None:
                loss = trainer.validation_loss(self._held, self._held_conds)
                self.validation_points.append((step, loss))
                logger.info("Train LoRA: validation loss %.5f at step %d", loss, step)
                _send_loss(self.node_id, step, total, None, validation_loss=loss)

            work.append((extras.validate_every, validate))
        return work

    def _loop(self, trainer: Trainer, patcher, name, resolution, lora_dir, state_dir, dataset_dir):
        import comfy.model_management as mm

        config = self.config
        pbar = progress_bar(config.steps, self.node_id)
        last_sent = [0.0]
        profiler = torch_utils.StepProfiler("train_lora")

        def on_step(step: int, loss: float) -> None:
            profiler.step()
            now = time.monotonic()
            if now - last_sent[0] > 0.1 or step == config.steps:
                last_sent[0] = now
                _send_loss(self.node_id, step, config.steps, loss)
            pbar.update_absolute(step, config.steps)

        info = RunInfo(
            output_name=name,
            base_model_version=self.family.base_model_version,
            architecture=self.family.architecture,
            implementation=self.family.implementation,
            resolution=resolution,
            dataset_dir=str(dataset_dir),
        )
        try:
            result = trainer.run(
                lora_dir,
                info,
                on_step=on_step,
                should_stop=mm.processing_interrupted,
                state_dir=state_dir,
                every=self._periodic(trainer, patcher, pbar),
            )
        finally:
            profiler.close()
        logger.info(
            "Train LoRA: %d steps in %.1f s (%.2f it/s), saved %s",
            result.steps_done,
            result.seconds,
            result.steps_done / max(result.seconds, 1e-9),
            result.lora_path,
        )
        if result.cancelled:
            logger.warning("Train LoRA cancelled at step %d; LoRA and resume state saved", result.steps_done)
            mm.throw_exception_if_processing_interrupted()
        return result.lora_path, result.losses


NODES: list[type[io.ComfyNode]] = [TrainLoRA]
