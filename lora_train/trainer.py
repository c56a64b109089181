"""The training loop: noise, predict, fp32 MSE, optimizer step; saving, cancel and resume.

It knows nothing of ComfyUI. The caller supplies the model pieces as callables:

- ``denoise(noisy_latents, timesteps, cond) -> prediction`` (the UNet with the LoRA injected),
- ``encode(captions, samples) -> cond`` (text encoders + SDXL size conditioning, a dict of
  batched tensors; run with grad only when the text-encoder LoRA trains),

plus the :class:`~.layers.LoRASet` and the encoded :class:`Sample` list.

Determinism: every random draw of step ``s`` (batch choice, captions, noise, timesteps) comes
from generators seeded with ``(seed, s)``, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..torch_utils import free_memory_bytes
from . import checkpoint, checkpoint_choice, optim, schedule, validation
from .block_checkpoint import checkpointed
from .data import process_caption
from .graphed import GraphedMicroStep
from .layers import LoRASet

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The dtype each ``precision`` computes in."""

logger = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")
CACHE_LIMIT = 4096


@dataclass
class Sample:
    """One encoded training image: latent [C, h, w] (already scaled for the UNet), caption, sizes."""

    latent: torch.Tensor
    caption: str
    time_ids: tuple[int, int, int, int, int, int]
    bucket: tuple[int, int]


@dataclass
class TrainConfig:
    """Every knob of a run (also written into the LoRA metadata and the resume state)."""

    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    unet_lr: float = 1e-4
    te_lr: float = 5e-5
    rank: int = 16
    alpha: float = 16.0
    target: str = "attention"
    train_te: bool = False
    optimizer: str = "AdamW"
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    grad_checkpointing: bool | str = "auto"  # auto / on / off (True / False: on / off)
    seed: int = 0
    prediction: str = "eps"
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    shuffle_captions: bool = False
    keep_tokens: int = 0
    save_every: int = 0
    keep_last: int = 0
    save_dtype: str = "fp16"

    def validate(self) -> None:
        """``ValueError`` naming the first bad field."""
        checks = [
            ("steps", self.steps >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("grad_accum", self.grad_accum >= 1, "at least 1"),
            ("unet_lr", _finite(self.unet_lr) and self.unet_lr > 0, "a finite number > 0"),
            ("te_lr", _finite(self.te_lr) and self.te_lr >= 0, "a finite number >= 0"),
            ("rank", self.rank >= 1, "at least 1 (the LoRA dimension)"),
            ("alpha", _finite(self.alpha) and self.alpha > 0, "a finite number > 0 (use alpha = rank for scale 1)"),
            ("max_grad_norm", _finite(self.max_grad_norm) and self.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("prediction", self.prediction in schedule.PREDICTIONS, f"one of {schedule.PREDICTIONS}"),
            ("min_snr_gamma", _finite(self.min_snr_gamma) and self.min_snr_gamma >= 0, ">= 0 (0 = off, 5 typical)"),
            ("noise_offset", _finite(self.noise_offset) and self.noise_offset >= 0, ">= 0 (0 = off, 0.05 typical)"),
            ("caption_dropout", 0 <= self.caption_dropout <= 1, "between 0 and 1"),
            ("keep_tokens", self.keep_tokens >= 0, ">= 0"),
            ("save_every", self.save_every >= 0, ">= 0 (0 = only at the end)"),
            ("keep_last", self.keep_last >= 0, ">= 0 (0 = keep all)"),
            ("save_dtype", self.save_dtype in checkpoint.SAVE_DTYPES, f"one of {tuple(checkpoint.SAVE_DTYPES)}"),
            ("optimizer", self.optimizer in optim.OPTIMIZERS, f"one of {optim.OPTIMIZERS}"),
            ("lr_scheduler", self.lr_scheduler in optim.SCHEDULERS, f"one of {optim.SCHEDULERS}"),
            (
                "grad_checkpointing",
                checkpoint_choice.is_mode(self.grad_checkpointing),
                f"one of {checkpoint_choice.MODES}",
            ),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be {rule}")
        optim.lr_lambda(self.lr_scheduler, self.steps, self.warmup_steps)


def _finite(value: float) -> bool:
    """NaN fails every comparison and Inf passes the lower bounds: both are refused explicitly."""
    return isinstance(value, (int, float)) and math.isfinite(value)


# TrainConfig fields that must match to resume a state, with the node input that sets each
RESUME_MUST_MATCH = {"rank": "rank", "target": "target", "train_te": "train_text_encoder", "optimizer": "optimizer"}


def check_resume(info: dict[str, Any], config: TrainConfig, source: str | Path = "") -> None:
    """``ValueError`` when a saved state (its JSON ``info``) cannot continue with ``config``.

    Run on the state's JSON alone, so the adapter can refuse before any model or image work.
    """
    where = f" {source}" if source else ""
    saved = info.get("config", {})
    for key, input_name in RESUME_MUST_MATCH.items():
        if key in saved and saved[key] != getattr(config, key):
            raise ValueError(
                f"resume_from:{where} was trained with {key}={saved[key]!r} but this run has "
                f"{key}={getattr(config, key)!r}; set {input_name} to {saved[key]!r} to resume it, "
                f"or clear resume_from to start a new run"
            )
    step = int(info["step"])
    if step > config.steps:
        raise ValueError(
            f"resume_from:{where} is at step {step}, beyond steps={config.steps}; raise steps above {step} "
            f"to continue it"
        )


@dataclass
class RunInfo:
    """What the caller wants written into the file's metadata besides the config."""

    output_name: str
    base_model_version: str  # ss_base_model_version: "sd_v1", "sd_v1_v", "sdxl_base_v1-0", ...
    architecture: str  # modelspec.architecture, e.g. "stable-diffusion-xl-v1-base/lora"
    implementation: str
    resolution: int = 512
    model_name: str = ""
    dataset_dir: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    lora_path: Path | None
    losses: list[float]
    steps_done: int
    cancelled: bool
    seconds: float
    peak_vram_bytes: int | None = None  # PyTorch's peak allocation during the loop (CUDA only)


class Trainer:
    """Runs :class:`TrainConfig` over ``samples`` with the given model callables."""

    def __init__(
        self,
        config: TrainConfig,
        lora: LoRASet,
        samples: list[Sample],
        denoise: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
        encode: Callable[[list[str], list[Sample]], dict[str, torch.Tensor]],
        device: torch.device,
        *,
        checkpoint_blocks: Iterable[nn.Module] = (),
        text_modules: Iterable[nn.Module] = (),
        cond_cache: dict[tuple[str, int], dict[str, torch.Tensor]] | None = None,
        autocast: bool | None = None,
        compile_blocks: bool = False,
        compiled_blocks: Iterable[nn.Module] | None = None,
        compiled_call: Callable[[nn.Module], Callable] | None = None,
        cuda_graphs: bool = True,
        graph_weights: Callable[[], list[torch.Tensor]] | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        config.validate()
        if not samples:
            raise ValueError("no training samples: the dataset is empty")
        if len(lora) == 0:
            raise ValueError("no LoRA layer was injected: the model has no module the target preset matches")
        self.config = config
        self.lora = lora
        self.samples = samples
        self.denoise = denoise
        self.encode = encode
        self.device = torch.device(device)
        self.checkpoint_blocks = list(checkpoint_blocks)
        self.text_modules = list(text_modules)
        # autocast only helps when the weights are not already in the compute dtype: for a bf16
        # model training in bf16 it would just add casts around every norm (CPU-bound on fast GPUs)
        self.use_autocast = config.precision != "fp32" if autocast is None else autocast
        self.compile_blocks = compile_blocks
        # which blocks torch.compile takes (default: the checkpointed ones) and what it compiles
        # of each (default: its forward); see block_checkpoint.checkpointed
        self.compiled_blocks = None if compiled_blocks is None else list(compiled_blocks)
        self.compiled_call = compiled_call
        if config.precision != "fp32":
            # the LoRA layers compute in the run's dtype (natively or under autocast) with working
            # copies in that dtype instead of casting their fp32 masters on every call
            lora.use_working_copies(PRECISION_DTYPES[config.precision], self.device)
        self._graphed = self._make_graphed(cuda_graphs, graph_weights)
        self.acp = schedule.alphas_cumprod().to(self.device)
        self.losses: list[float] = []
        self.step = 0
        self._cond_cache: dict[tuple[str, int], dict[str, torch.Tensor]] = dict(cond_cache or {})
        self._by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(samples):
            self._by_bucket.setdefault(s.bucket, []).append(i)
        self._bucket_keys = sorted(self._by_bucket)
        groups = [{"params": lora.parameters("unet"), "lr": config.unet_lr}]
        if config.train_te:
            groups.append({"params": lora.parameters("te"), "lr": config.te_lr})
        self.optimizer = optim.make_optimizer(config.optimizer, groups)
        self.scheduler = optim.make_scheduler(self.optimizer, config.lr_scheduler, config.steps, config.warmup_steps)
        lora.reset(config.seed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.started_at = time.time()
        # whether the run checkpoints its blocks; ``auto`` is settled by a trial step in run()
        mode = checkpoint_choice.checkpointing_mode(config.grad_checkpointing)
        self.checkpointing: bool | None = None if mode == "auto" else mode == "on"
        self.reserve_bytes = int(reserve_bytes)  # memory ``auto`` leaves to others (see checkpoint_choice)

    def _make_graphed(self, wanted: bool, weights) -> GraphedMicroStep | None:
        """The CUDA-graph micro-step when this run can use it (see :mod:`.graphed`), else None."""
        cfg = self.config
        reason = None
        if not wanted:
            return None
        if self.device.type != "cuda":
            reason = "not a CUDA device"
        elif cfg.precision == "fp16":
            reason = "fp16 needs a GradScaler, whose overflow checks read values on the host"
        elif cfg.train_te:
            reason = "the text encoders train (their inputs are tokenized on the host every step)"
        elif self.compile_blocks:
            reason = "torch.compile was requested instead"
        if reason is not None:
            logger.info("LoRA training: CUDA graphs not used: %s", reason)
            return None
        # grads of the layers' working copies and of the masters of any layer without one
        targets = [*self.lora.working_parameters("unet"), *self.lora.parameters("unet")]
        self.lora.attach_working_grads()  # the graphed step adds into existing grads
        return GraphedMicroStep(self._loss, targets, weights)

    @property
    def _grads_to_none(self) -> bool:
        """Graphed steps and working copies add into existing ``.grad`` tensors (views of one
        buffer with working copies): zero those instead of freeing them."""
        return self._graphed is None and not self.lora.has_working_copies

    @property
    def graph_stats(self) -> dict[str, Any]:
        g = self._graphed
        if g is None:
            return {"cuda_graphs": False}
        return {"cuda_graphs": g.disabled is None, "captures": g.captures, "replays": g.replays, "off": g.disabled}

    # ----- resume -------------------------------------------------------------------------
    def load_state(self, base: str | Path) -> None:
        """Continue from a state saved by :meth:`save_state` (LoRA weights, optimizer, step)."""
        lora_tensors, opt_state, info = checkpoint.load_state(base)
        tensor_path, json_path = checkpoint.state_paths(base)
        check_resume(info, self.config, json_path)
        cfg = self.config
        try:
            self.lora.load_state_dict(lora_tensors)
            self.optimizer.load_state_dict(opt_state)
            scheduler = optim.make_scheduler(
                self.optimizer, cfg.lr_scheduler, cfg.steps, cfg.warmup_steps, info["step"]
            )
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ValueError(
                f"resume_from: {tensor_path} does not fit this run's LoRA ({exc}); resume with the same "
                f"checkpoint, target and rank it was trained with, or clear resume_from to start a new run"
            ) from exc
        self.scheduler = scheduler
        self.step = int(info["step"])
        self.losses = [float(x) for x in info.get("losses", [])]
        if info.get("grad_scale") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict({"scale": float(info["grad_scale"]), "_growth_tracker": 0})

    def save_state(self, base: str | Path) -> tuple[Path, Path]:
        info = {
            "step": self.step,
            "losses": self.losses,
            "config": asdict(self.config),
            "grad_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None,
            "format": checkpoint.STATE_FORMAT,
        }
        return checkpoint.save_state(base, self.lora.state_dict(torch.float32), self.optimizer, info)

    # ----- one step -----------------------------------------------------------------------
    def _generators(self, step: int, micro: int) -> tuple[torch.Generator, random.Random]:
        key = (self.config.seed * 1_000_003 + step) * 64 + micro
        return torch.Generator().manual_seed(key), random.Random(key)

    def _pick(self, gen: torch.Generator) -> list[int]:
        counts = torch.tensor([len(self._by_bucket[b]) for b in self._bucket_keys], dtype=torch.float64)
        bucket = self._bucket_keys[int(torch.multinomial(counts, 1, generator=gen))]
        members = self._by_bucket[bucket]
        if len(members) >= self.config.batch_size:
            order = torch.randperm(len(members), generator=gen)[: self.config.batch_size]
        else:
            order = torch.randint(len(members), (self.config.batch_size,), generator=gen)
        return [members[int(i)] for i in order]

    def _conditioning(self, indices: list[int], captions: list[str]) -> dict[str, torch.Tensor]:
        samples = [self.samples[i] for i in indices]
        if self.config.train_te:
            return self.encode(captions, samples)
        parts = []
        for i, caption, sample in zip(indices, captions, samples, strict=True):
            key = (caption, i)
            cached = self._cond_cache.get(key)
            if cached is None:
                with torch.no_grad():
                    cached = {k: v.detach() for k, v in self.encode([caption], [sample]).items()}
                if len(self._cond_cache) >= CACHE_LIMIT:
                    self._cond_cache.pop(next(iter(self._cond_cache)))
                self._cond_cache[key] = cached
            parts.append(cached)
        return stack_conditioning(parts)

    def _autocast(self):
        if self.config.precision == "fp32" or not self.use_autocast:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        # no cast cache: a CUDA graph must not keep casts from its recording
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=self._graphed is None)

    def _loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]):
        """The weighted fp32 training loss of one micro-batch (graph-capturable: no host reads)."""
        cfg = self.config
        noisy = schedule.add_noise(x0, noise, t, self.acp)
        with self._autocast():
            pred = self.denoise(noisy, t, cond)
        per_sample = schedule.mse_per_sample(pred, schedule.target(x0, noise, t, self.acp, cfg.prediction))
        return (per_sample * schedule.min_snr_weights(t, self.acp, cfg.min_snr_gamma, cfg.prediction)).mean()

    def _batch(self, indices: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents, noise and timesteps of a micro-batch on the device, drawn from ``gen``."""
        x0 = torch.stack([self.samples[i].latent for i in indices]).to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=gen)
        if self.config.noise_offset > 0:
            noise = noise + self.config.noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=gen)
        noise = noise.to(self.device)
        t = torch.randint(0, schedule.NUM_TIMESTEPS, (x0.shape[0],), generator=gen).to(self.device)
        return x0, noise, t

    def _micro_step(self, step: int, micro: int) -> float:
        cfg = self.config
        gen, rng = self._generators(step, micro)
        indices = self._pick(gen)
        captions = [
            process_caption(self.samples[i].caption, rng, cfg.caption_dropout, cfg.shuffle_captions, cfg.keep_tokens)
            for i in indices
        ]
        x0, noise, t = self._batch(indices, gen)
        with self._autocast():
            cond = self._conditioning(indices, captions)
        if self._graphed is not None:
            loss = self._graphed(x0, noise, t, cond, scale=1.0 / cfg.grad_accum)
        else:
            loss = self._loss(x0, noise, t, cond)
            self.scaler.scale(loss / cfg.grad_accum).backward()
        self.lora.flush_grads()
        return float(loss.detach())

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss."""
        cfg = self.config
        loss = sum(self._micro_step(self.step, m) for m in range(cfg.grad_accum)) / cfg.grad_accum
        if not math.isfinite(loss):
            # refuse before the optimizer step: the weights stay those of the last good step, which
            # is what run() then saves (a NaN step would poison the LoRA and the resume state)
            self.optimizer.zero_grad(set_to_none=self._grads_to_none)
            raise FloatingPointError(
                f"loss became {loss} at step {self.step + 1}: lower the learning rate or use precision=bf16/fp32; "
                f"the LoRA of step {self.step} is kept"
            )
        params = self.lora.parameters()
        if cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lora.sync()
        if not self.lora.zero_grads():
            self.optimizer.zero_grad(set_to_none=self._grads_to_none)
        self.scheduler.step()
        self.step += 1
        self.losses.append(loss)
        return loss

    def validation_loss(self, samples: list[Sample], conds: list[dict[str, torch.Tensor]] | None = None) -> float:
        """Mean unweighted loss of ``samples`` (held-out images, their captions as written) at
        :data:`validation.TIMESTEPS` with fixed noise; no gradient, no effect on training.
        ``conds``: their encoded captions when computed up front (frozen text encoders)."""
        if not samples:
            raise ValueError("validation_loss: no held-out samples")
        total, count = 0.0, 0
        with torch.no_grad():
            for i, sample in enumerate(samples):
                x0 = sample.latent[None].to(self.device, torch.float32)
                if conds is not None:
                    cond = {k: v.to(self.device) for k, v in conds[i].items()}
                else:
                    with self._autocast():
                        cond = self.encode([sample.caption], [sample])
                for timestep in validation.TIMESTEPS:
                    noise = validation.fixed_noise(tuple(x0.shape), i, timestep).to(self.device)
                    t = torch.full((1,), timestep, device=self.device, dtype=torch.long)
                    noisy = schedule.add_noise(x0, noise, t, self.acp)
                    with self._autocast():
                        pred = self.denoise(noisy, t, cond)
                    wanted = schedule.target(x0, noise, t, self.acp, self.config.prediction)
                    total += float(schedule.mse_per_sample(pred, wanted).mean())
                    count += 1
        return total / count

    def _trial_step(self) -> None:
        """One forward/backward of the largest batch as the run would compute it (whatever the
        block wrappers in place do). Gradients are returned, not stored, and the noise comes from
        its own generator: the run's weights, grads and randomness are untouched."""
        cfg = self.config
        bucket = max(self._bucket_keys, key=lambda b: b[0] * b[1])
        members = self._by_bucket[bucket]
        indices = [members[i % len(members)] for i in range(cfg.batch_size)]
        x0, noise, t = self._batch(indices, torch.Generator().manual_seed(cfg.seed))
        targets = [*self.lora.working_parameters(), *self.lora.parameters()]
        with self._autocast():
            cond = self._conditioning(indices, [self.samples[i].caption for i in indices])
        torch.autograd.grad(self._loss(x0, noise, t, cond), targets, allow_unused=True)

    def _trial_step_bytes(self) -> int | None:
        """Extra CUDA bytes at the peak of :meth:`_trial_step` without checkpointing (the blocks
        are not wrapped yet); None when it runs out of memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        try:
            self._trial_step()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        except torch.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()  # the trial's blocks go back for the run (and its graph pool)

    def _choose_checkpointing(self) -> bool:
        """``auto``: checkpointing off only when a step without it fits (see :mod:`.checkpoint_choice`)."""
        if self.device.type != "cuda":
            logger.info("LoRA training: gradient_checkpointing auto: on (memory is measured on CUDA devices only)")
            return True
        total = torch.cuda.mem_get_info(self.device)[1]
        free = free_memory_bytes(self.device)  # the caching allocator's unused blocks count as free
        on, why = checkpoint_choice.decide(self._trial_step_bytes(), free, total, self.reserve_bytes)
        logger.info("LoRA training: gradient_checkpointing auto: %s (%s)", "on" if on else "off", why)
        return on

    # ----- the run ------------------------------------------------------------------------
    def run(
        self,
        output_dir: str | Path,
        info: RunInfo,
        *,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        state_dir: str | Path | None = None,
        every: Iterable[tuple[int, Callable[[int], None]]] = (),
    ) -> Result:
        """Train to ``config.steps``, saving every ``save_every`` steps and at the end.

        LoRA files go to ``output_dir``; the resume state (``<name>-state.*``) to ``state_dir``
        (default ``output_dir``).

        ``every``: ``(n, fn)`` pairs; ``fn(step)`` runs after every ``n``-th step and after the
        last one (sample images, validation loss), between steps, on the current weights.

        ``should_stop()`` is polled after every step: when true, the current LoRA and state are
        saved and the run returns ``cancelled=True``. Any exception also saves the state first
        when at least one step was done, so nothing trained is lost.
        """
        cfg = self.config
        out = Path(output_dir)
        name = checkpoint.validate_output_name(info.output_name)
        info = replace(info, output_name=name)
        final = out / f"{name}.safetensors"
        state_base = Path(state_dir or out) / name
        start = time.time()
        cancelled = False
        start_step = saved_step = self.step
        if self.checkpointing is None:
            self.checkpointing = self._choose_checkpointing()
        blocks = checkpointed(
            self.checkpoint_blocks,
            checkpoint=self.checkpointing,
            compile=self.compile_blocks,
            compiled=self.compiled_blocks,
            call=self.compiled_call,
        )
        periodic = [(int(n), fn) for n, fn in every if n and n > 0]
        for m in self.text_modules:
            m.train(cfg.train_te)
        on_cuda = self.device.type == "cuda"
        if on_cuda:  # the loop's own peak, for the log and the benchmarks
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with blocks:
                while self.step < cfg.steps:
                    loss = self.train_step()
                    if on_step is not None:
                        on_step(self.step, loss)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self._save(checkpoint.step_path(out, name, self.step), info)
                        checkpoint.prune_step_files(out, name, cfg.keep_last)
                        self.save_state(state_base)
                        saved_step = self.step
                    for period, fn in periodic:
                        if self.step % period == 0 or self.step == cfg.steps:
                            fn(self.step)
                    if should_stop is not None and should_stop():
                        cancelled = True
                        break
        except BaseException as exc:
            # a cancel can also arrive inside a step (ComfyUI checks it in every layer): keep the
            # last completed step as <name>.safetensors and its resume state; when nothing new was
            # trained, the files already on disk are left alone
            if self.step > start_step:
                try:
                    self._save(final, info)
                    if self.step > saved_step:
                        self.save_state(state_base)
                    logger.warning(
                        "training stopped at step %d (%s); LoRA saved to %s", self.step, type(exc).__name__, final
                    )
                except Exception:  # keep the original error; the save failure is logged
                    logger.exception("could not save the LoRA after the training stopped")
            raise
        if self._graphed is not None:
            logger.info("LoRA training: %s", self.graph_stats)
        path = self._save(final, info)
        if cancelled or cfg.save_every:
            self.save_state(state_base)
        peak = torch.cuda.max_memory_allocated(self.device) if on_cuda else None
        return Result(path, list(self.losses), self.step, cancelled, time.time() - start, peak)

    def _save(self, path: Path, info: RunInfo) -> Path:
        """Save the LoRA, refusing NaN/Inf weights so a diverged run never replaces a good file."""
        dtype = checkpoint.SAVE_DTYPES[self.config.save_dtype]
        tensors = self.lora.state_dict(dtype)
        bad = next((k for k, v in tensors.items() if not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise FloatingPointError(
                f"not saving {path.name}: {bad} holds NaN/Inf values (training diverged); the previous file is kept. "
                f"Lower the learning rate or use precision=bf16/fp32"
            )
        return checkpoint.save_lora(path, tensors, self.metadata(info))

    def metadata(self, info: RunInfo) -> dict[str, str]:
        """``ss_*`` (sd-scripts) and ``modelspec.*`` metadata strings."""
        cfg = self.config
        buckets: dict[str, int] = {}
        for s in self.samples:
            key = f"{s.bucket[0]}x{s.bucket[1]}"
            buckets[key] = buckets.get(key, 0) + 1
        now = _dt.datetime.now(_dt.timezone.utc)
        meta = {
            "ss_session_id": uuid.uuid4().hex[:16],
            "ss_training_started_at": str(self.started_at),
            "ss_training_finished_at": str(time.time()),
            "ss_output_name": info.output_name,
            "ss_base_model_version": info.base_model_version,
            "ss_sd_model_name": info.model_name,
            "ss_v2": "False",
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(cfg.alpha),
            "ss_network_args": str({"target": cfg.target}),
            "ss_learning_rate": str(cfg.unet_lr),
            "ss_unet_lr": str(cfg.unet_lr),
            "ss_text_encoder_lr": str(cfg.te_lr if cfg.train_te else 0.0),
            "ss_network_train_unet_only": str(not cfg.train_te),
            "ss_steps": str(self.step),
            "ss_max_train_steps": str(cfg.steps),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_total_batch_size": str(cfg.batch_size * cfg.grad_accum),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum),
            "ss_gradient_checkpointing": "auto" if self.checkpointing is None else str(self.checkpointing),
            "ss_mixed_precision": cfg.precision if cfg.precision != "fp32" else "no",
            "ss_save_precision": cfg.save_dtype,
            "ss_optimizer": cfg.optimizer,
            "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_lr_warmup_steps": str(cfg.warmup_steps),
            "ss_max_grad_norm": str(cfg.max_grad_norm),
            "ss_seed": str(cfg.seed),
            "ss_min_snr_gamma": str(cfg.min_snr_gamma),
            "ss_noise_offset": str(cfg.noise_offset),
            "ss_v_parameterization": str(cfg.prediction == "v"),
            "ss_caption_dropout_rate": str(cfg.caption_dropout),
            "ss_shuffle_caption": str(cfg.shuffle_captions),
            "ss_keep_tokens": str(cfg.keep_tokens),
            "ss_resolution": f"({info.resolution}, {info.resolution})",
            "ss_enable_bucket": str(len(buckets) > 1),
            "ss_bucket_info": str({"buckets": buckets}),
            "ss_num_train_images": str(len(self.samples)),
            "ss_dataset_dirs": str({Path(info.dataset_dir).name: {"n_repeats": 1, "img_count": len(self.samples)}}),
            "ss_cache_latents": "True",
            "ss_training_comment": "trained with ComfyUI-SpeedKit Train LoRA",
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": info.architecture,
            "modelspec.implementation": info.implementation,
            "modelspec.title": info.output_name,
            "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.resolution": f"{info.resolution}x{info.resolution}",
            "modelspec.prediction_type": "v" if cfg.prediction == "v" else "epsilon",
            "modelspec.timestep_range": f"0,{schedule.NUM_TIMESTEPS}",
        }
        meta.update(info.extra)
        return meta


def precompute_conditioning(
    encode: Callable[[list[str], list[Sample]], dict[str, torch.Tensor]], samples: list[Sample]
) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """Encode every sample's caption once (frozen text encoder, no caption dropout/shuffle).

    The result is the ``cond_cache`` argument of :class:`Trainer`; computing it before the UNet
    is loaded lets the text encoder be unloaded while training.
    """
    cache = {}
    with torch.no_grad():
        for index, sample in enumerate(samples):
            cache[(sample.caption, index)] = {k: v.detach() for k, v in encode([sample.caption], [sample]).items()}
    return cache


def stack_conditioning(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-sample conditioning along the batch; token sequences of different length
    (long prompts are chunked in 77s) are repeated to their least common multiple, as ComfyUI does."""
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if values[0].ndim == 3 and len({v.shape[1] for v in values}) > 1:
            target = math.lcm(*[v.shape[1] for v in values])
            values = [v.repeat(1, target // v.shape[1], 1) for v in values]
        out[key] = torch.cat(values, dim=0)
    return out
