"""Typed training settings, each turning itself into musubi command-line flags.

One dataclass per ComfyUI config node; :mod:`speedkit.musubi.commands` assembles them
into full command lines. Values are validated here so a bad setting is an error before
a 20-minute model load, not after.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

ATTENTION_FLAGS = {"sdpa": "--sdpa", "flash": "--flash_attn", "sage": "--sage_attn", "xformers": "--xformers"}
TIMESTEP_SAMPLINGS = (
    "shift",
    "sigma",
    "uniform",
    "sigmoid",
    "flux_shift",
    "logsnr",
    "qinglong_flux",
    "qinglong_qwen",
    # added after the first release (appended: saved workflows keep their choice)
    "flux2_shift",
    "qwen_shift",
    "krea2_shift",
    "ideogram4_shift",
)
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
OPTIMIZERS = ("AdamW8bit", "AdamW", "Adafactor", "custom")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "cosine",
    "cosine_with_restarts",
    "linear",
    "polynomial",
    "adafactor",
    "rex",
)
SAVE_PRECISIONS = ("default", "fp32", "fp16", "bf16")


def check_finite(values: Mapping[str, float], examples: Mapping[str, object] | None = None) -> None:
    """ValueError for the first NaN/Inf among ``{input name: value}``.

    ComfyUI refuses a value below ``min`` or above ``max`` by comparing, and every comparison
    with NaN is false, so NaN (and Inf where max is large) reaches the node; musubi would get
    the text "nan" as a flag value and fail minutes later, or train a NaN LoRA.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            example = (examples or {}).get(name)
            such_as = f" such as {example}" if example is not None else ""
            raise ValueError(f"{name}: {value!r} is not a finite number; set it to a number{such_as}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value} must be {bound}")


def split_args(text: str, name: str) -> list[str]:
    """Whitespace-separated ``key=value`` items (quotes allowed) -> list."""
    try:
        items = shlex.split(text.strip())
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}; write space-separated key=value items, quoting values with spaces") from exc
    for item in items:
        if "=" not in item:
            raise ValueError(f"{name}: {item!r} is not key=value (e.g. weight_decay=0.01 betas=0.9,0.999)")
    return items


@dataclass(frozen=True)
class TrainingConfig:
    """Network, schedule and precision settings (``MusubiTuner_TrainingConfig``)."""

    network_dim: int = 32
    network_alpha: float = 16.0
    network_type: str = "lora"
    network_args: str = ""
    network_dropout: float = 0.0
    learning_rate: float = 2e-4
    max_train_epochs: int = 16
    max_train_steps: int = 0
    save_every_n_epochs: int = 1
    save_every_n_steps: int = 0
    save_last_n_epochs: int = 0
    seed: int = 42
    mixed_precision: str = "bf16"
    save_precision: str = "default"
    gradient_checkpointing: bool = True
    gradient_accumulation_steps: int = 1
    fp8_base: bool = False
    fp8_scaled: bool = False
    blocks_to_swap: int = 0
    attention: str = "sdpa"
    split_attn: bool = False
    timestep_sampling: str = "shift"
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "none"
    max_data_loader_n_workers: int = 2
    persistent_data_loader_workers: bool = True
    save_state: bool = False
    network_weights: str = ""
    log_tensorboard: bool = False

    def validate(self) -> None:
        check_finite(
            {"network_alpha": self.network_alpha, "learning_rate": self.learning_rate,
             "network_dropout": self.network_dropout, "discrete_flow_shift": self.discrete_flow_shift},
            {"network_alpha": 16.0, "learning_rate": 2e-4, "network_dropout": 0.0, "discrete_flow_shift": 3.0},
        )  # fmt: skip
        if self.discrete_flow_shift < 0:
            raise ValueError(f"discrete_flow_shift: {self.discrete_flow_shift} must be >= 0, e.g. 3.0")
        if self.network_dim < 1:
            raise ValueError(f"network_dim={self.network_dim} must be >= 1 (the LoRA rank, e.g. 16 or 32)")
        _positive("network_alpha", self.network_alpha)
        _positive("learning_rate", self.learning_rate)
        if self.max_train_epochs <= 0 and self.max_train_steps <= 0:
            raise ValueError("set max_train_epochs or max_train_steps (both are 0): e.g. max_train_epochs=16")
        if self.attention not in ATTENTION_FLAGS:
            raise ValueError(f"attention={self.attention!r} must be one of {', '.join(ATTENTION_FLAGS)}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={self.timestep_sampling!r} must be one of {TIMESTEP_SAMPLINGS}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme={self.weighting_scheme!r} must be one of {WEIGHTING_SCHEMES}")
        if self.save_precision not in SAVE_PRECISIONS:
            raise ValueError(f"save_precision={self.save_precision!r} must be one of {SAVE_PRECISIONS}")
        if self.network_type not in ("lora", "loha", "lokr"):
            raise ValueError(f"network_type={self.network_type!r} must be lora, loha or lokr")
        if not 0 <= self.network_dropout < 1:
            raise ValueError(f"network_dropout={self.network_dropout} must be in [0, 1)")
        if self.blocks_to_swap < 0:
            raise ValueError(f"blocks_to_swap={self.blocks_to_swap} must be >= 0 (0 = off)")
        split_args(self.network_args, "network_args")

    def args(self, network_module: str) -> list[str]:
        """Flags for ``*_train_network.py`` (``network_module`` is the architecture's LoRA module)."""
        self.validate()
        a = [ATTENTION_FLAGS[self.attention]]
        if self.split_attn:
            a.append("--split_attn")
        a += ["--mixed_precision", self.mixed_precision]
        if self.save_precision != "default":
            a += ["--save_precision", self.save_precision]
        if self.fp8_base:
            a.append("--fp8_base")
        if self.gradient_checkpointing:
            a.append("--gradient_checkpointing")
        if self.gradient_accumulation_steps > 1:
            a += ["--gradient_accumulation_steps", str(self.gradient_accumulation_steps)]
        if self.blocks_to_swap > 0:
            a += ["--blocks_to_swap", str(self.blocks_to_swap)]
        a += ["--max_data_loader_n_workers", str(self.max_data_loader_n_workers)]
        if self.persistent_data_loader_workers and self.max_data_loader_n_workers > 0:
            a.append("--persistent_data_loader_workers")
        module = {"loha": "networks.loha", "lokr": "networks.lokr"}.get(self.network_type, network_module)
        a += ["--network_module", module, "--network_dim", str(self.network_dim)]
        a += ["--network_alpha", _num(self.network_alpha)]
        if self.network_dropout > 0:
            a += ["--network_dropout", _num(self.network_dropout)]
        if self.network_args.strip():
            a += ["--network_args", *split_args(self.network_args, "network_args")]
        if self.network_weights.strip():
            a += ["--network_weights", self.network_weights.strip()]
        a += ["--learning_rate", _num(self.learning_rate)]
        a += ["--timestep_sampling", self.timestep_sampling, "--discrete_flow_shift", _num(self.discrete_flow_shift)]
        if self.weighting_scheme != "none":
            a += ["--weighting_scheme", self.weighting_scheme]
        if self.max_train_epochs > 0:
            a += ["--max_train_epochs", str(self.max_train_epochs)]
        else:
            a += ["--max_train_steps", str(self.max_train_steps)]
        if self.save_every_n_epochs > 0:
            a += ["--save_every_n_epochs", str(self.save_every_n_epochs)]
        if self.save_every_n_steps > 0:
            a += ["--save_every_n_steps", str(self.save_every_n_steps)]
        if self.save_last_n_epochs > 0:
            a += ["--save_last_n_epochs", str(self.save_last_n_epochs)]
        if self.save_state:
            a.append("--save_state")
        a += ["--seed", str(self.seed)]
        return a


@dataclass(frozen=True)
class OptimizerConfig:
    """``MusubiTuner_OptimizerConfig``: optimizer, its arguments, LR schedule, clipping."""

    optimizer_type: str = "AdamW8bit"
    custom_optimizer: str = ""
    optimizer_args: str = ""
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0.0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0

    def args(self) -> list[str]:
        opt = self.optimizer_type
        if opt == "custom":
            opt = self.custom_optimizer.strip()
            if not opt or "." not in opt:
                raise ValueError(
                    f"custom_optimizer={self.custom_optimizer!r} must be a full class path such as "
                    "bitsandbytes.optim.AdEMAMix8bit or prodigyopt.Prodigy (installed in musubi's venv)"
                )
        elif opt not in OPTIMIZERS:
            raise ValueError(f"optimizer_type={opt!r} must be one of {OPTIMIZERS}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler={self.lr_scheduler!r} must be one of {LR_SCHEDULERS}")
        check_finite(
            {"lr_warmup_steps": self.lr_warmup_steps, "lr_scheduler_power": self.lr_scheduler_power,
             "lr_scheduler_min_lr_ratio": self.lr_scheduler_min_lr_ratio, "max_grad_norm": self.max_grad_norm},
            {"lr_warmup_steps": 0.0, "lr_scheduler_power": 1.0, "lr_scheduler_min_lr_ratio": 0.0, "max_grad_norm": 1.0},
        )  # fmt: skip
        _positive("lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        _positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        a = ["--optimizer_type", opt]
        if self.optimizer_args.strip():
            a += ["--optimizer_args", *split_args(self.optimizer_args, "optimizer_args")]
        a += ["--lr_scheduler", self.lr_scheduler]
        if self.lr_warmup_steps > 0:
            # musubi reads an int as steps and a float < 1 as a fraction of the total
            warm = self.lr_warmup_steps
            a += ["--lr_warmup_steps", str(int(warm)) if warm >= 1 else _num(warm)]
        if self.lr_scheduler == "cosine_with_restarts":
            a += ["--lr_scheduler_num_cycles", str(self.lr_scheduler_num_cycles)]
        if self.lr_scheduler == "polynomial":
            a += ["--lr_scheduler_power", _num(self.lr_scheduler_power)]
        if self.lr_scheduler_min_lr_ratio > 0:
            a += ["--lr_scheduler_min_lr_ratio", _num(self.lr_scheduler_min_lr_ratio)]
        a += ["--max_grad_norm", _num(self.max_grad_norm)]
        return a


@dataclass(frozen=True)
class SamplingConfig:
    """``MusubiTuner_SamplingConfig``: prompts rendered during training."""

    prompts: str = ""
    sample_every_n_epochs: int = 0
    sample_every_n_steps: int = 0
    sample_at_first: bool = False
    width: int = 0
    height: int = 0
    frames: int = 0
    steps: int = 0
    seed: int = -1

    def prompt_lines(self) -> list[str]:
        """One musubi prompt line per non-empty prompt, with the default options appended.

        Per-line options (``--w --h --f --s --d``) written by the user win over the defaults.
        """
        lines = []
        for raw in self.prompts.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            for flag, value in (("w", self.width), ("h", self.height), ("f", self.frames), ("s", self.steps)):
                if value > 0 and f"--{flag} " not in line + " ":
                    line += f" --{flag} {value}"
            if self.seed >= 0 and "--d " not in line + " ":
                line += f" --d {self.seed}"
            lines.append(line)
        return lines

    def validate(self) -> None:
        """A sampling config without a prompt would silently render nothing during training."""
        if not self.prompt_lines():
            raise ValueError(
                f"prompts: {self.prompts!r} holds no prompt (only empty lines or # comments): write one prompt per "
                "line, or unplug sampling_config to train without samples"
            )

    def write_prompt_file(self, path: Path) -> Path | None:
        lines = self.prompt_lines()
        if not lines:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def args(self, prompt_file: Path | None) -> list[str]:
        if prompt_file is None:
            return []
        if self.sample_every_n_epochs <= 0 and self.sample_every_n_steps <= 0 and not self.sample_at_first:
            raise ValueError(
                "sampling prompts are set but never used: set sample_every_n_epochs, sample_every_n_steps "
                "or sample_at_first"
            )
        a = ["--sample_prompts", str(prompt_file)]
        if self.sample_every_n_epochs > 0:
            a += ["--sample_every_n_epochs", str(self.sample_every_n_epochs)]
        if self.sample_every_n_steps > 0:
            a += ["--sample_every_n_steps", str(self.sample_every_n_steps)]
        if self.sample_at_first:
            a.append("--sample_at_first")
        return a


@dataclass(frozen=True)
class MemoryConfig:
    """``MusubiTuner_MemoryOptimizer``: VRAM savers that override the training config."""

    blocks_to_swap: int = 0
    use_pinned_memory_for_block_swap: bool = False
    fp8_base: bool = False
    fp8_scaled: bool = False
    fp8_text_encoder: bool = False
    gradient_checkpointing: bool = True
    split_attn: bool = False
    vae_tiling: bool = False
    vae_chunk_size: int = 0
    vae_spatial_tile_sample_min_size: int = 0
    vae_cache_cpu: bool = False
    note: str = ""
    block_swap_h2d_only: bool = False
    gradient_checkpointing_cpu_offload: bool = False

    def extra_args(self, blocks_to_swap: int) -> list[str]:
        """Flags every training script of musubi's shared parser takes beyond the training config's."""
        a = []
        if self.use_pinned_memory_for_block_swap and blocks_to_swap > 0:
            a.append("--use_pinned_memory_for_block_swap")
        if self.block_swap_h2d_only and blocks_to_swap > 0:
            a.append("--block_swap_h2d_only")
        if self.gradient_checkpointing_cpu_offload:
            a.append("--gradient_checkpointing_cpu_offload")
        return a

    def apply(self, cfg: TrainingConfig) -> TrainingConfig:
        """The training config with these memory settings in place."""
        return replace(
            cfg,
            blocks_to_swap=self.blocks_to_swap,
            fp8_base=self.fp8_base or self.fp8_scaled,
            fp8_scaled=self.fp8_scaled,
            gradient_checkpointing=self.gradient_checkpointing,
            split_attn=self.split_attn,
        )


# Approximate DiT weight sizes in GiB (bf16) used for the suggestion heuristics.
_DIT_GB = {"hunyuan_video": 25.6, "wan_14b": 28.6, "wan_1.3b": 2.8, "framepack": 25.7}


def suggest_memory(arch: str, free_vram_gb: float, model_size: str = "14B", task: str = "train") -> MemoryConfig:
    """A starting point for the memory settings from the free VRAM (a heuristic, not a promise).

    Rule: keep the DiT (bf16, or fp8 = half) plus ~6 GiB of activations on the GPU; swap
    out the share of blocks that does not fit, capped at musubi's per-model maximum.
    """
    if not math.isfinite(free_vram_gb) or free_vram_gb <= 0:
        raise ValueError(f"free VRAM {free_vram_gb} GiB must be > 0 (no GPU found? set vram_gb by hand)")
    key = arch if arch != "wan" else ("wan_1.3b" if model_size.lower().startswith("1.3") else "wan_14b")
    dit = _DIT_GB.get(key, 25.0)
    max_swap = {"hunyuan_video": 36, "wan_14b": 39, "wan_1.3b": 29, "framepack": 36}.get(key, 30)
    n_blocks = {"hunyuan_video": 60, "wan_14b": 40, "wan_1.3b": 30, "framepack": 60}.get(key, 40)
    headroom = 6.0 if task == "train" else 4.0
    fp8 = free_vram_gb < dit + headroom
    weights = dit / 2 if fp8 else dit
    budget = free_vram_gb - headroom
    swap = 0
    if weights > budget:
        swap = min(max_swap, math.ceil(n_blocks * (weights - max(budget, 0.0)) / weights))
    small = free_vram_gb < 16
    notes = [f"{free_vram_gb:.1f} GiB free, DiT ~{dit:.0f} GiB in bf16"]
    if fp8:
        notes.append("fp8 weights")
    if swap:
        notes.append(f"{swap} blocks swapped to CPU (needs ~{weights * swap / n_blocks:.0f} GiB RAM)")
    if swap >= max_swap and weights * (n_blocks - swap) / n_blocks > budget:
        notes.append("may still not fit: lower the resolution/frames or use a smaller model")
    return MemoryConfig(
        blocks_to_swap=swap,
        use_pinned_memory_for_block_swap=swap > 0,
        fp8_base=fp8,
        fp8_scaled=fp8 and arch in ("wan", "framepack"),
        fp8_text_encoder=free_vram_gb < 24,
        gradient_checkpointing=True,
        split_attn=small,
        vae_tiling=small,
        vae_chunk_size=16 if small else 32,
        vae_spatial_tile_sample_min_size=128 if small else 0,
        vae_cache_cpu=small,
        note="; ".join(notes),
    )


def _num(value: float) -> str:
    """A float as text for argparse: integers without ``.0``, others exactly (``repr``)."""
    v = float(value)
    return str(int(v)) if v.is_integer() else repr(v)
