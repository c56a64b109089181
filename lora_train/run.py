"""One LoRA training run: from a checked request to the saved file, for any host of the model.

The host (the ComfyUI adapter, a script, the unit tests with toy models) hands over two small
objects:

- a :class:`ModelSide`: everything that needs the host's model objects: encoding images and
  captions, SDXL size conditioning, loading the UNet for training, rendering sample images;
- :class:`RunHooks`: progress, cancel and live loss events (no-ops by default).

This module decides the rest in plain PyTorch: the held-out validation split, which caption
encodings are computed once or cached on disk, injecting the LoRA and taking it out again,
the :class:`~.trainer.Trainer`, the work between steps (sample images, validation loss) and
the closing report. The step loop itself is :mod:`.trainer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from .. import torch_utils
from ..torch_utils import error_line
from . import data, layers, text_cache, validation, worker
from .inputs import Extras
from .prepare import build_samples
from .sample_prompts import SamplePrompt
from .trainer import (
    PRECISION_DTYPES,
    RunInfo,
    Sample,
    TrainConfig,
    Trainer,
    precompute_conditioning,
    stack_conditioning,
)

logger = logging.getLogger(__name__)

CHECKPOINT_BLOCKS = ("BasicTransformerBlock", "ResBlock")
"""Blocks recomputed in the backward pass under gradient checkpointing. With the fused LoRA
branch, recomputing the ResBlocks too was measured both faster and smaller than the transformer
blocks alone (README, "Speed (measured)")."""
TEXT_CACHE_SUBDIR = "text_encoder"  # inside <dataset>/_latent_cache
TEXT_LAYOUTS = {
    "sd15": text_cache.Layout("sd15", context_dim=768),
    "sdxl": text_cache.Layout("sdxl", context_dim=2048, pooled_dim=1280),
}
TEXT_CACHE_PROBE = "speedkit text cache probe, a photo of a red cube on a table"
"""Encoded once per run to fingerprint the text encoder as it will really encode (patches,
clip skip, dtype), not only its weights."""
COMPILE_ENV = "SPEEDKIT_TRAIN_COMPILE"
"""Maintainers' switch (``1``): run the UNet's transformer blocks through ``torch.compile`` (the
CUDA-graph steps are then off), to measure in a server whether compiled blocks cut the host
time of the eager steps that ComfyUI's default allocator leaves. Never set by the pack."""
COMPILED_BLOCKS = ("BasicTransformerBlock",)
"""Blocks compiled under :data:`COMPILE_ENV`. ComfyUI's ResBlocks are left eager: SDXL's dozen
ResBlock layouts would all go through one compiled function, past dynamo's cache limit of 8
graphs per function (the rest would silently run eagerly)."""
LOSS_EVENT_SECONDS = 0.1
"""Least time between two live loss events (the last step is always sent)."""


@dataclass(frozen=True)
class Family:
    """What the run needs to know about the loaded checkpoint."""

    name: str  # "sd15" | "sdxl"
    prediction: str  # "eps" | "v"
    resolution_multiple: int
    default_resolution: int
    base_model_version: str
    architecture: str
    implementation: str
    text_encoders: tuple[tuple[str, str], ...]  # (host's name of the encoder, kohya prefix)


class Buckets(NamedTuple):
    """Aspect-ratio bucket settings (checked by :func:`.data.check_buckets` beforehand)."""

    min_side: int
    max_side: int
    step: int
    no_upscale: bool


@dataclass(frozen=True)
class Job:
    """A checked training request: what to train on, with which settings, where the files go."""

    items: list[data.Item]
    name: str  # validated output name
    resolution: int
    buckets: Buckets
    config: TrainConfig
    lora_dir: Path
    state_dir: Path
    dataset_dir: Path
    extras: Extras = Extras()
    resume_from: Path | None = None
    cache_dir: Path | None = None  # <dataset>/_latent_cache when latents are kept on disk
    cuda_graphs: bool = True  # the user's switch; the host may still rule graphs out


@dataclass
class LoadedUNet:
    """The UNet as :meth:`ModelSide.load` made it ready to train."""

    unet: nn.Module  # the LoRA layers are injected into this module
    denoise: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    device: torch.device
    dtype: torch.dtype  # the dtype the UNet computes in (autocast is skipped when it is the run's)
    cuda_graphs: bool = True  # False when the host may move the weights between calls
    handle: object = None  # the host's model object, handed back to the sample renderer
    # how ``denoise`` is made from a UNet module, by reference (module-level, picklable): lets the
    # run train in a worker process (:mod:`.worker`); None when only the host can call its UNet
    denoise_factory: worker.DenoiseFactory | None = None


class SampleRenderer(Protocol):
    """Renders the sample prompts with the model as trained so far."""

    last: list[torch.Tensor]  # the pictures of the last round, [H, W, 3] float

    def render(self, handle: object, step: int, preview: Callable[[torch.Tensor], None] | None = None) -> list[Path]:
        """Render and save every prompt at ``step``; ``preview(image)`` sees each picture."""
        ...


class ModelSide(Protocol):
    """What a run needs from the host's model objects."""

    family: Family
    device: torch.device  # where the training runs (conditioning is moved there)
    latent_encoder_id: str  # names the VAE and latent scaling in the latent cache key

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[H, W, 3]`` pixels in 0..1 -> the latent ``[C, H/8, W/8]`` as the UNet takes it."""
        ...

    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        """Raw text-encoder outputs: ``cond`` ``[1, T, D]`` and, for SDXL, ``pooled`` ``[1, P]``."""
        ...

    def size_conditioning(self, pooled: torch.Tensor, time_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """SDXL's vector conditioning ``y`` from the pooled text and a sample's size/crop ids."""
        ...

    def text_encoder_identity(self) -> tuple[Iterable[tuple[str, torch.Tensor]], str]:
        """The text encoders' weights and a description of how they encode (disk cache key)."""
        ...

    def text_encoders(self) -> list[tuple[str, nn.Module]]:
        """``(kohya prefix, module)`` of each text encoder a text-encoder LoRA trains."""
        ...

    def unet_key_rename(self) -> Callable[[str], str] | None:
        """Module path -> path written in the file (SD1.5: LDM -> diffusers); None = as is."""
        ...

    def text_training(self, modules: list[nn.Module]) -> AbstractContextManager:
        """Makes the text encoders' forward differentiable while their LoRA trains."""
        ...

    def sample_renderer(self, prompts: list[SamplePrompt], folder: Path, name: str, reencode: bool) -> SampleRenderer:
        """A renderer for the sample prompts (made before the UNet is loaded for training)."""
        ...

    def load(self, keep_text_encoder: bool) -> AbstractContextManager[LoadedUNet]:
        """Load the UNet (and the text encoders when still needed) for training; give the
        memory back on exit."""
        ...

    def worker_setup(self) -> worker.WorkerSetup | None:
        """What a worker process needs to load the host's UNet module (import paths, settings);
        None when this host cannot train in a worker process."""
        ...

    def lora_handle(self, lora_file: Path) -> object:
        """The host's model with the LoRA in ``lora_file`` applied, for the sample renderer
        (sample images of a run trained in a worker process)."""
        ...

    def make_room(self) -> None:
        """Before a worker process trains: free the device memory it needs (its own UNet copy
        and working memory), unloading the host's models where it must."""
        ...


class RunHooks:
    """How a run reports to its host. Every method is a no-op here (scripts, tests)."""

    def progress(self, phase: str, done: int, total: int) -> None:
        """``phase``: ``"latents"`` (encoding the images) or ``"train"`` (optimizer steps)."""

    def preview(self, step: int, total: int, image: torch.Tensor) -> None:
        """A sample image just rendered at ``step``."""

    def loss(self, step: int, total: int, loss: float | None, validation_loss: float | None = None) -> None:
        """A live chart point (``loss`` None: a validation point only)."""

    def should_stop(self) -> bool:
        """Polled after every step: True saves the LoRA and a resume state, then stops."""
        return False

    def check_interrupt(self) -> None:
        """Raise the host's cancel exception when the user cancelled (else return)."""


class WorkerModelSide:
    """What a worker process knows of the host's model: enough for :meth:`TrainingRun._train_on`
    with frozen text encoders (captions were encoded by the host)."""

    def __init__(self, family: Family, device: torch.device, rename: Callable[[str], str] | None) -> None:
        self.family, self.device, self._rename = family, device, rename

    def unet_key_rename(self) -> Callable[[str], str] | None:
        return self._rename

    def text_encoders(self) -> list[tuple[str, nn.Module]]:
        return []

    def text_training(self, modules: list[nn.Module]) -> AbstractContextManager:
        return contextlib.nullcontext()


@dataclass
class Outcome:
    """What a finished run hands back."""

    lora_path: Path
    losses: list[float]
    validation_points: list[tuple[int, float]] = field(default_factory=list)
    sample_images: list[torch.Tensor] = field(default_factory=list)


def materialize_inference_tensors(module: nn.Module) -> int:
    """Replace parameters/buffers created under ``torch.inference_mode`` by normal copies.

    Hosts may load checkpoints inside inference mode (ComfyUI does); autograd refuses to save
    such tensors for backward even when they are frozen. Values, dtype and device are unchanged.
    """
    count = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and torch.is_inference(p):
                sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                count += 1
        for name, b in list(sub._buffers.items()):
            if b is not None and torch.is_inference(b):
                sub._buffers[name] = b.clone()
                count += 1
    return count


def transformer_block_call(block: nn.Module) -> Callable:
    """What is compiled of a ComfyUI ``BasicTransformerBlock``: its forward with an empty
    ``transformer_options``.

    The trainer calls the UNet with an empty ``transformer_options`` (no patches of other nodes
    reach it); the UNet only writes each block's position into it (``block``, ``block_index``,
    ...), which the block reads for patch lookups that find nothing. Compiled with those values,
    the code would be specialised (and recompiled) for every block; without them one compiled
    graph serves every block of a shape, with the same result.
    """
    forward = block.forward

    def call(x: torch.Tensor, context: torch.Tensor | None = None, transformer_options: dict | None = None):
        return forward(x, context=context, transformer_options={})

    return call


@dataclass
class _Between:
    """The work between steps and what it needs: held-out images, their conditioning, the renderer."""

    held: list[Sample]
    held_conds: list[dict[str, torch.Tensor]] | None
    renderer: SampleRenderer | None
    # GPU memory another process needs while this one trains (the server rendering the sample
    # images of a worker run): gradient_checkpointing auto leaves it free
    reserve_bytes: int = 0


class TrainingRun:
    """One run of :class:`Job` on a host's model; :meth:`run` trains and takes the LoRA out again."""

    def __init__(self, job: Job, model: ModelSide, hooks: RunHooks | None = None) -> None:
        self.job = job
        self.model = model
        self.hooks = hooks or RunHooks()
        self.config = job.config
        self.validation_points: list[tuple[int, float]] = []
        self.sample_images: list[torch.Tensor] = []
        self.lora: layers.LoRASet | None = None  # the LoRA being trained, while it trains

    def run(self) -> Outcome:
        """Encode the dataset, train, save; raises the host's cancel exception after a cancel
        (the LoRA and a resume state are saved first)."""
        job, config, model = self.job, self.config, self.model
        with torch.inference_mode(False):
            samples = self._encode_latents()
            train_idx, held_idx = validation.split_holdout(len(samples), job.extras.validation_split, config.seed)
            held = [samples[i] for i in held_idx]
            samples = [samples[i] for i in train_idx]
            if held:
                logger.info("Train LoRA: %d image(s) held out for the validation loss", len(held))
            disk_text = self._text_cache()
            encode = self._encoder(disk_text)
            cond_cache = None
            if not config.train_te and config.caption_dropout == 0 and not config.shuffle_captions:
                # every caption is fixed: encode them all now, then the text encoders may leave the GPU
                cond_cache = precompute_conditioning(encode, samples)
            held_conds = None
            if held and not config.train_te:
                with torch.no_grad():
                    held_conds = [{k: v.detach() for k, v in encode([s.caption], [s]).items()} for s in held]
            renderer = None
            if job.extras.prompts:
                folder = job.lora_dir / f"{job.name}_samples"
                renderer = model.sample_renderer(list(job.extras.prompts), folder, job.name, config.train_te)
            if disk_text is not None:
                logger.info(
                    "Train LoRA: text-encoder disk cache %s: %d loaded, %d encoded",
                    disk_text.folder,
                    disk_text.hits,
                    disk_text.misses,
                )
            between = _Between(held, held_conds, renderer)
            trained = None
            setup = self._worker_setup(cond_cache)
            if setup is not None:
                trained = self._train_in_worker(setup, samples, cond_cache, between)
            if trained is None:
                with model.load(keep_text_encoder=cond_cache is None) as loaded:
                    trained = self._train_on(loaded, samples, encode, cond_cache, between)
        lora_path, losses = trained
        return Outcome(lora_path, losses, self.validation_points, self.sample_images)

    # ----- in a worker process --------------------------------------------------------------
    def _worker_setup(self, cond_cache) -> worker.WorkerSetup | None:
        """How to start a worker process when this run trains in one (:mod:`.worker`), else None."""
        mode = os.environ.get(worker.WORKER_ENV, "auto")
        config = self.config
        if mode == "0" or not self.job.cuda_graphs or os.environ.get(COMPILE_ENV) == "1":
            return None
        if config.precision == "fp16" or config.train_te or cond_cache is None:
            return None  # no CUDA graphs for this run anyway (trainer.Trainer._make_graphed)
        if mode != "1" and not worker.allocator_rules_out_graphs(self.model.device):
            return None
        setup = self.model.worker_setup()
        blocker = None if setup is None else worker.pack_import_blocker(setup.import_paths)
        if blocker is not None:
            logger.info("Train LoRA: training in this process (no worker process: %s; rename the folder)", blocker)
            return None
        if setup is not None:
            why = f"{worker.WORKER_ENV}=1" if mode == "1" else "this process allocates with cudaMallocAsync"
            logger.info("Train LoRA: training in a separate process, where the steps can run as CUDA graphs (%s)", why)
        return setup

    def _train_in_worker(self, setup: worker.WorkerSetup, samples, cond_cache, between: _Between):
        """Train in a worker process; None when it cannot start (the run then trains here)."""
        job, model = self.job, self.model
        folder = worker.job_folder(setup.model_bytes)
        process = worker.WorkerProcess(folder, setup, model.device)  # starts up while the UNet is written
        try:
            with model.load(keep_text_encoder=False) as loaded:
                if loaded.denoise_factory is None or not loaded.cuda_graphs:
                    raise ValueError("the model is not fully loaded on one device")
                worker.write_job(
                    folder,
                    loaded.unet,
                    worker.WorkerJob(
                        job=replace(job, items=[]),
                        family=model.family,
                        rename=model.unet_key_rename(),
                        samples=samples,
                        cond_cache=cond_cache,
                        held=between.held,
                        held_conds=between.held_conds,
                        device=str(loaded.device),
                        dtype=loaded.dtype,
                        denoise_factory=loaded.denoise_factory,
                        render_samples=between.renderer is not None,
                    ),
                )
        except Exception as exc:  # noqa: BLE001 - e.g. a module that does not pickle: train here
            process.abandon()
            logger.warning("Train LoRA: training in this process: %s", error_line(exc, 300))
            return None
        model.make_room()
        process.go()
        renderer, hooks, total = between.renderer, self.hooks, self.config.steps

        def render(step: int, lora_file: Path) -> None:
            # Sampled the way the host samples anywhere else (ComfyUI: KSampler, inference mode):
            # the host's model was never touched by training here, and its weights may be
            # inference tensors, which ops outside inference mode refuse on CUDA ("Inference
            # tensors do not track version counter").
            with torch.inference_mode():
                renderer.render(model.lora_handle(lora_file), step, lambda image: hooks.preview(step, total, image))
            self.sample_images = renderer.last

        try:
            result = process.follow(hooks, render if renderer is not None else None)
        except worker.WorkerUnavailable as exc:
            logger.warning("Train LoRA: the training process did not start (%s); training in this process", exc)
            return None
        self.validation_points = result.validation_points
        if result.cancelled:  # the worker logged where it stopped and what it saved
            hooks.check_interrupt()
        return result.lora_path, result.losses

    # ----- before training ----------------------------------------------------------------
    def _encode_latents(self) -> list[Sample]:
        job, model, hooks = self.job, self.model, self.hooks

        def encode_image(pixels: torch.Tensor) -> torch.Tensor:
            hooks.check_interrupt()
            return model.encode_image(pixels)

        return build_samples(
            job.items,
            resolution=job.resolution,
            min_bucket=job.buckets.min_side,
            max_bucket=job.buckets.max_side,
            bucket_step=job.buckets.step,
            no_upscale=job.buckets.no_upscale,
            encode_image=encode_image,
            cache_dir=job.cache_dir,
            encoder_id=model.latent_encoder_id,
            progress=lambda done, total: hooks.progress("latents", done, total),
        )

    def _text_cache(self) -> text_cache.TextEncoderCache | None:
        """The on-disk text-encoder cache, when it applies: a disk cache was asked for, the text
        encoder is frozen and captions are not shuffled (shuffling makes a new text almost every
        step: one file per step would cost more disk and I/O than it saves)."""
        config, model, cache_dir = self.config, self.model, self.job.cache_dir
        if cache_dir is None or config.train_te:
            return None
        if config.shuffle_captions:
            logger.info("Train LoRA: shuffled captions vary per step; text-encoder outputs are not cached on disk")
            return None
        with torch.no_grad():
            probe = model.encode_text(TEXT_CACHE_PROBE)
        weights, description = model.text_encoder_identity()
        fingerprint = text_cache.encoder_fingerprint(weights, probe, description)
        return text_cache.TextEncoderCache(
            cache_dir / TEXT_CACHE_SUBDIR, model.encode_text, fingerprint, TEXT_LAYOUTS[model.family.name]
        )

    def _encoder(self, cache: text_cache.TextEncoderCache | None):
        """``encode(captions, samples) -> cond``: the batched conditioning the Trainer wants."""
        model = self.model
        device = model.device
        sdxl = model.family.name == "sdxl"
        encode_text = cache.get if cache is not None else model.encode_text

        def encode(captions: list[str], samples: list[Sample]) -> dict[str, torch.Tensor]:
            parts = []
            for caption, sample in zip(captions, samples, strict=True):
                out = encode_text(caption)
                cond = {"context": out["cond"].to(device, torch.float32)}
                if sdxl:
                    y = model.size_conditioning(out["pooled"], sample.time_ids, device)
                    cond["y"] = y.to(device, torch.float32)
                parts.append(cond)
            return stack_conditioning(parts)

        return encode

    # ----- training -----------------------------------------------------------------------
    def _train_on(self, loaded: LoadedUNet, samples, encode, cond_cache, between: _Between):
        """Inject the LoRA into the loaded UNet, train, and take the LoRA out again."""
        config, job = self.config, self.job
        unet = loaded.unet
        materialize_inference_tensors(unet)
        text_models = [module for _, module in self.model.text_encoders()] if config.train_te else []
        lora = self.lora = layers.LoRASet()
        try:
            self._inject(lora, unet, loaded.device)
            blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINT_BLOCKS]
            compile_blocks = os.environ.get(COMPILE_ENV) == "1"
            trainer = Trainer(
                config,
                lora,
                samples,
                loaded.denoise,
                encode,
                loaded.device,
                checkpoint_blocks=blocks,
                text_modules=text_models,
                cond_cache=cond_cache,
                # a model already in the compute dtype runs natively, as the host samples it
                autocast=loaded.dtype != PRECISION_DTYPES[config.precision],
                cuda_graphs=loaded.cuda_graphs and job.cuda_graphs,
                compile_blocks=compile_blocks,
                compiled_blocks=[m for m in unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
                if compile_blocks
                else None,
                compiled_call=transformer_block_call,
                graph_weights=lambda: list(unet.parameters()),
                reserve_bytes=between.reserve_bytes,
            )
            if job.resume_from is not None:
                trainer.load_state(job.resume_from)
            with self.model.text_training(text_models):
                return self._loop(trainer, loaded, between)
        finally:
            lora.detach()
            for m in text_models:
                m.train(False)

    def _inject(self, lora: layers.LoRASet, unet: nn.Module, device: torch.device) -> None:
        config = self.config
        rename = self.model.unet_key_rename() or (lambda p: p)
        paths = layers.find_unet_targets(unet, config.target)
        lora.add(unet, paths, rank=config.rank, alpha=config.alpha, prefix="lora_unet", rename=rename, device=device)
        if not config.train_te:
            return
        for prefix, text_model in self.model.text_encoders():
            materialize_inference_tensors(text_model)
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

    def _periodic(self, trainer: Trainer, loaded: LoadedUNet, between: _Between) -> list:
        """The between-steps work: sample images and validation loss, as ``(every, fn)`` pairs."""
        extras, total, hooks = self.job.extras, self.config.steps, self.hooks
        work = []
        renderer = between.renderer
        if renderer is not None:

            def render(step: int) -> None:
                renderer.render(loaded.handle, step, lambda image: hooks.preview(step, total, image))
                self.sample_images = renderer.last

            work.append((extras.sample_every or total, render))
        if between.held:

            def validate(step: int) -> None:
                loss = trainer.validation_loss(between.held, between.held_conds)
                self.validation_points.append((step, loss))
                logger.info("Train LoRA: validation loss %.5f at step %d", loss, step)
                hooks.loss(step, total, None, validation_loss=loss)

            work.append((extras.validate_every, validate))
        return work

    def _loop(self, trainer: Trainer, loaded: LoadedUNet, between: _Between) -> tuple[Path, list[float]]:
        config, job, hooks, family = self.config, self.job, self.hooks, self.model.family
        hooks.progress("train", 0, config.steps)
        last_sent = [0.0]
        profiler = torch_utils.StepProfiler("train_lora")

        def on_step(step: int, loss: float) -> None:
            profiler.step()
            now = time.monotonic()
            if now - last_sent[0] > LOSS_EVENT_SECONDS or step == config.steps:
                last_sent[0] = now
                hooks.loss(step, config.steps, loss)
            hooks.progress("train", step, config.steps)

        info = RunInfo(
            output_name=job.name,
            base_model_version=family.base_model_version,
            architecture=family.architecture,
            implementation=family.implementation,
            resolution=job.resolution,
            dataset_dir=str(job.dataset_dir),
        )
        try:
            result = trainer.run(
                job.lora_dir,
                info,
                on_step=on_step,
                should_stop=hooks.should_stop,
                state_dir=job.state_dir,
                every=self._periodic(trainer, loaded, between),
            )
        finally:
            profiler.close()
        peak = "" if result.peak_vram_bytes is None else f", peak VRAM {result.peak_vram_bytes / 2**30:.2f} GiB"
        logger.info(
            "Train LoRA: %d steps in %.1f s (%.2f it/s%s), saved %s",
            result.steps_done,
            result.seconds,
            result.steps_done / max(result.seconds, 1e-9),
            peak,
            result.lora_path,
        )
        if result.cancelled:
            logger.warning("Train LoRA cancelled at step %d; LoRA and resume state saved", result.steps_done)
            hooks.check_interrupt()
        return result.lora_path, result.losses
