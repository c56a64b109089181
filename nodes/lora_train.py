"""ComfyUI adapter for lora_train/: ``SpeedKit_TrainLoRA`` (SD1.5 / SDXL LoRA from the loaded checkpoint).

This module declares the node and checks its inputs; ``nodes/lora_train_run.py`` gives the run
ComfyUI's MODEL/CLIP/VAE, progress bar, events and Cancel; the run itself is
``lora_train.run`` and its step loop ``lora_train.trainer``.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..lora_train import checkpoint, checkpoint_choice, data, inputs, layers, optim, validation
from ..lora_train.run import Buckets, Job
from ..lora_train.sample_prompts import SEED_MAX, SIZE_MAX
from ..lora_train.trainer import PRECISIONS, TrainConfig, check_resume
from .lora_train_run import detect_family, node_outputs, train

STATE_SUBDIR = "speedkit_lora_state"


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
                io.Combo.Input(
                    "gradient_checkpointing",
                    options=list(checkpoint_choice.MODES),
                    default="auto",
                    tooltip="Recompute block activations in the backward pass: much less VRAM, slower steps. auto: "
                    "off when a trial step without it fits in free VRAM, else on.",
                    advanced=True,
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=True,
                    tooltip="Seed of LoRA init, noise, timesteps, batches.",
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
                io.Boolean.Input(
                    "cuda_graphs",
                    default=True,
                    optional=True,
                    advanced=True,
                    tooltip="Replay each training step as a CUDA graph where it is safe (the same LoRA up to "
                    "rounding, much less CPU work per step); with ComfyUI's default allocator the steps "
                    "then run in a separate process. Off: every step runs eagerly in ComfyUI's process.",
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
    def validate_inputs(cls, gradient_checkpointing: object = "auto") -> bool | str:
        """Workflows saved while this input was a switch carry true/false: ComfyUI's list check
        would refuse them, so this check (which replaces it) takes them as on/off."""
        return checkpoint_choice.is_mode(gradient_checkpointing) or (
            f"gradient_checkpointing={gradient_checkpointing!r}: choose one of {', '.join(checkpoint_choice.MODES)}"
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
        gradient_checkpointing: str = "auto",
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
        cuda_graphs: bool = True,
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
            grad_checkpointing=checkpoint_choice.checkpointing_mode(gradient_checkpointing),
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
        extras = inputs.check_extras(
            sample_every,
            sample_prompts,
            sample_size or resolution,
            sample_seed,
            validation_split,
            validate_every,
            len(items),
        )
        state_dir = Path(folder_paths.get_output_directory()) / STATE_SUBDIR
        resume_path = inputs.resolve_resume(resume_from, state_dir)
        if resume_path is not None:
            # the JSON and the tensor file's header: a damaged or mismatched state fails before any encoding
            _, state_json, state_info = checkpoint.read_state_info(resume_path)
            check_resume(state_info, config, state_json)
        job = Job(
            items=items,
            name=name,
            resolution=resolution,
            buckets=Buckets(min_bucket, max_bucket, bucket_step, bucket_no_upscale),
            config=config,
            lora_dir=Path(folder_paths.get_folder_paths("loras")[0]),
            state_dir=state_dir,
            dataset_dir=dataset,
            extras=extras,
            resume_from=resume_path,
            cache_dir=dataset / "_latent_cache" if cache_latents_to_disk else None,
            cuda_graphs=cuda_graphs,
        )
        outcome = train(job, family, model, clip, vae, cls.hidden.unique_id)
        return node_outputs(cls, model, clip, name, outcome)


NODES: list[type[io.ComfyNode]] = [TrainLoRA]
