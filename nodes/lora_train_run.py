"""ComfyUI side of a Train LoRA run: the MODEL, CLIP and VAE and the UI, as ``lora_train.run`` asks.

:class:`ComfyModelSide` answers the run's model questions with ComfyUI's own objects: text
through the CLIP (SDXL size conditioning through the model's ``encode_adm``), latents through
the VAE, loading through ComfyUI's model management, sample images through its sampler.
:class:`ComfyHooks` turns progress, previews, loss points and Cancel into ComfyUI's progress
bar, custom events and interrupt. Every ComfyUI import is inside a function.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..lora_train.chart import loss_chart
from ..lora_train.naming import ldm_to_diffusers_path
from ..lora_train.run import Family, Job, LoadedUNet, Outcome, RunHooks, TrainingRun
from ..lora_train.sample_prompts import SamplePrompt
from ..lora_train.worker import WorkerSetup, ldm_unet_denoise
from . import comfy_bridge, lora_samples, residency

logger = logging.getLogger(__name__)

LOSS_EVENT = "speedkit.lora_train.loss"
WORKING_MEMORY_FACTOR = 3
"""Training needs about this many times the UNet's size besides its weights (activations,
gradients, optimizer state): a model that would leave less stays on dynamic loading."""


def detect_family(model) -> Family:
    """SD1.5 or SDXL, eps or v, from a ComfyUI MODEL; ``ValueError`` for anything else."""
    import comfy.model_base
    import comfy.supported_models

    base = model.model
    config = getattr(base, "model_config", None)
    config_name = type(config).__name__ if config is not None else type(base).__name__
    model_type = getattr(base, "model_type", None)
    kind = getattr(model_type, "name", str(model_type))
    prediction = {"EPS": "eps", "V_PREDICTION": "v"}.get(kind, "")
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


class OutOfPlaceClipLayers:
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


class ComfyModelSide:
    """``lora_train.run.ModelSide`` over ComfyUI's MODEL, CLIP and VAE (clones: the inputs stay as they are)."""

    def __init__(self, family: Family, model, clip, vae) -> None:
        self.family = family
        self.patcher = model.clone()
        self.clip = clip.clone()
        self.vae = vae
        self.device = self.patcher.load_device
        self._latent_format = self.patcher.model.latent_format
        self.latent_encoder_id = f"{type(vae.first_stage_model).__name__}|{type(self._latent_format).__name__}"

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            latent = self.vae.encode(pixels.unsqueeze(0))
            latent = self._latent_format.process_in(latent.float())
        return latent[0].clone()

    def encode_text(self, caption: str) -> dict[str, torch.Tensor]:
        clip = self.clip
        out = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True, return_dict=True)
        result = {"cond": out["cond"]}
        if self.family.name == "sdxl":
            result["pooled"] = out["pooled_output"]
        return result

    def size_conditioning(self, pooled: torch.Tensor, time_ids: tuple[int, ...], device: torch.device):
        oh, ow, top, left, th, tw = time_ids
        return self.patcher.model.encode_adm(
            pooled_output=pooled,
            height=oh,
            width=ow,
            crop_h=top,
            crop_w=left,
            target_height=th,
            target_width=tw,
            device=device,
        )

    def text_encoder_identity(self) -> tuple[Iterable[tuple[str, torch.Tensor]], str]:
        clip = self.clip
        stage = clip.cond_stage_model
        description = f"{self.family.name}|{type(stage).__name__}|{type(clip.tokenizer).__name__}|{clip.layer_idx}"
        return stage.state_dict().items(), description

    def text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        stage = self.clip.cond_stage_model
        return [
            (prefix, getattr(stage, attr).transformer)
            for attr, prefix in self.family.text_encoders
            if hasattr(stage, attr)
        ]

    def unet_key_rename(self) -> Callable[[str], str] | None:
        if self.family.name == "sdxl":
            return None  # kohya's SDXL keys follow ComfyUI's LDM module paths
        unet_config = self.patcher.model.model_config.unet_config
        nrb = unet_config["num_res_blocks"]
        if isinstance(nrb, int):
            nrb = [nrb] * len(unet_config["channel_mult"])
        # a partial of a module-level function, not a closure: a worker process unpickles it
        return functools.partial(ldm_to_diffusers_path, num_res_blocks=nrb)

    def text_training(self, modules: list[torch.nn.Module]) -> OutOfPlaceClipLayers:
        return OutOfPlaceClipLayers(modules)

    def sample_renderer(
        self, prompts: list[SamplePrompt], folder: Path, name: str, reencode: bool
    ) -> lora_samples.SampleRenderer:
        return lora_samples.SampleRenderer(prompts, self.clip, self.vae, folder, name, reencode)

    @contextmanager
    def load(self, keep_text_encoder: bool) -> Iterator[LoadedUNet]:
        """The UNet fully on the GPU where it fits (``residency``), loaded by ComfyUI with the
        text encoders when they are still needed."""
        import comfy.model_management as mm

        working = WORKING_MEMORY_FACTOR * self.patcher.model_size()
        with residency.full_residency(self.patcher, "Train LoRA", working_bytes=working) as patcher:
            models = [patcher, self.clip.patcher] if keep_text_encoder else [patcher]
            mm.load_models_gpu(models, force_full_load=True)
            unet = patcher.model.diffusion_model
            dtype = patcher.model.get_dtype_inference()
            yield LoadedUNet(
                unet,
                ldm_unet_denoise(unet, dtype),
                patcher.load_device,
                dtype,
                # weights streamed by ComfyUI's dynamic VRAM manager move between calls
                cuda_graphs=not getattr(patcher, "is_dynamic", lambda: False)(),
                handle=patcher,
                denoise_factory=ldm_unet_denoise,
            )

    def worker_setup(self) -> WorkerSetup:
        """ComfyUI's root on the worker's path (its ``comfy`` modules unpickle the UNet) and this
        server's parsed command line (the model code reads it at import: device, attention)."""
        import comfy.cli_args
        import comfy.model_management  # ``comfy`` itself is a namespace package (no __file__)

        root = str(Path(comfy.model_management.__file__).resolve().parent.parent)
        return WorkerSetup(
            [root],
            [("comfy.cli_args", "args", comfy.cli_args.args)],
            preload=[type(self.patcher.model.diffusion_model).__module__],
            model_bytes=self.patcher.model_size(),
        )

    def lora_handle(self, lora_file: Path):
        """The MODEL with the LoRA file applied by ComfyUI's own loader (sample images of a worker run)."""
        return apply_lora_file(self.patcher, None, lora_file)[0]

    def make_room(self) -> None:
        """Before the worker trains: this process's allocator hands its cached blocks back to
        the driver (under cudaMallocAsync freed memory stays in the process's pool, where the
        worker cannot use it), then ComfyUI unloads what it must, least recently used first
        (``free_memory``), so the worker finds room for its UNet copy and working memory. On a
        large GPU nothing is unloaded."""
        import comfy.model_management as mm

        device = self.patcher.load_device
        if getattr(device, "type", "cpu") != "cuda":
            return
        need = int(self.patcher.model_size() * (1 + WORKING_MEMORY_FACTOR))
        mm.soft_empty_cache()
        mm.free_memory(need, device)
        mm.soft_empty_cache()


class ComfyHooks(RunHooks):
    """Progress bar (with sample previews), live loss chart events and Cancel for one node."""

    def __init__(self, node_id: str | None) -> None:
        self.node_id = node_id
        self._bars: dict[str, object] = {}

    def _bar(self, phase: str, total: int):
        bar = self._bars.get(phase)
        if bar is None:
            bar = self._bars[phase] = comfy_bridge.progress_bar(total, self.node_id)
        return bar

    def progress(self, phase: str, done: int, total: int) -> None:
        self._bar(phase, total).update_absolute(done, total)

    def preview(self, step: int, total: int, image: torch.Tensor) -> None:
        self._bar("train", total).update_absolute(step, total, lora_samples.preview_payload(image))

    def loss(self, step: int, total: int, loss: float | None, validation_loss: float | None = None) -> None:
        """Live chart event for web/js/lora_train.js; skipped without a running server."""
        event = {"node": self.node_id, "step": step, "total": total, "loss": loss}
        if validation_loss is not None:
            event["validation_loss"] = validation_loss
        comfy_bridge.send_event(LOSS_EVENT, event)

    def should_stop(self) -> bool:
        import comfy.model_management as mm

        return mm.processing_interrupted()

    def check_interrupt(self) -> None:
        comfy_bridge.throw_if_interrupted()


def train(job: Job, family: Family, model, clip, vae, node_id: str | None) -> Outcome:
    """Run ``job`` on ComfyUI's MODEL/CLIP/VAE (left unchanged), reporting to node ``node_id``."""
    return TrainingRun(job, ComfyModelSide(family, model, clip, vae), ComfyHooks(node_id)).run()


def apply_lora_file(model, clip, path: Path):
    """MODEL/CLIP clones with the LoRA file applied at strength 1 by ComfyUI's own loader."""
    import comfy.sd
    import comfy.utils

    lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)


def node_outputs(node_cls, model, clip, name: str, outcome: Outcome):
    """The node's outputs: the LoRA applied to the input MODEL/CLIP, the loss chart, and the
    last sample pictures shown on the node."""
    from comfy_api.latest import io, ui

    model_out, clip_out = apply_lora_file(model, clip, outcome.lora_path)
    losses = outcome.losses
    chart = loss_chart(losses, title=f"{name}: loss over {len(losses)} steps", validation=outcome.validation_points)
    pictures = lora_samples.last_round_batch(outcome.sample_images)
    shown = None if pictures is None else ui.PreviewImage(pictures, cls=node_cls)
    return io.NodeOutput(str(outcome.lora_path), model_out, clip_out, comfy_bridge.to_intermediate(chart), ui=shown)
