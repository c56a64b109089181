"""Settings nodes for the LoRA trainers: network and schedule, optimizer, sample prompts,
and the memory savers (with a suggestion from the free VRAM)."""

from __future__ import annotations

import os

from comfy_api.latest import io

from ...musubi import arch as archs
from ...musubi import configs, env, lora_file
from .widgets import MemoryT, OptimizerT, SamplingT, TrainingT, boolean, check_finite, choice, integer, number, string


class TrainingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = configs.TrainingConfig()
        return io.Schema(
            node_id="MusubiTuner_TrainingConfig",
            display_name="Musubi Training Config",
            category="MusubiTuner/train",
            description="Network, schedule and precision settings for the LoRA trainers. Unplugged, the trainers use "
            "these defaults (dim 32, alpha 16, lr 2e-4, 16 epochs, bf16, sdpa, shift 3.0).",
            inputs=[
                integer("network_dim", "LoRA rank.", d.network_dim, 1, 1024),
                number("network_alpha", "LoRA alpha; scale = alpha / dim.", d.network_alpha, 0.0001, 1024.0),
                choice(
                    "network_type",
                    "lora, or LyCORIS loha / lokr (networks.loha / networks.lokr).",
                    ("lora", "loha", "lokr"),
                ),
                number("learning_rate", "Learning rate.", d.learning_rate, 1e-8, 1.0, 1e-6),
                integer("max_train_epochs", "Epochs; 0 = use max_train_steps.", d.max_train_epochs, 0, 100000),
                integer("max_train_steps", "Steps, used when max_train_epochs is 0.", 1600, 0, 10_000_000),
                integer(
                    "save_every_n_epochs",
                    "Save a checkpoint every n epochs; 0 = off.",
                    d.save_every_n_epochs,
                    0,
                    100000,
                ),
                integer("save_every_n_steps", "Save a checkpoint every n steps; 0 = off.", 0, 0, 10_000_000),
                integer(
                    "seed",
                    "Random seed of the training run (LoRA init, noise, data order).",
                    d.seed,
                    0,
                    2**31 - 1,
                    control_after_generate=True,
                ),
                choice("mixed_precision", "Compute precision (also passed to accelerate).", ("bf16", "fp16", "no")),
                boolean(
                    "gradient_checkpointing",
                    "Recompute activations in the backward pass: much less VRAM, slower steps.",
                    True,
                ),
                boolean("fp8_base", "Keep the base DiT in fp8 (less VRAM).", False),
                integer(
                    "blocks_to_swap",
                    "DiT blocks offloaded to CPU; 0 = off (max 36 HV/FramePack, 39 Wan 14B).",
                    0,
                    0,
                    60,
                ),
                choice(
                    "attention",
                    "Attention kernel (must be installed in musubi's venv except sdpa).",
                    tuple(configs.ATTENTION_FLAGS),
                ),
                choice("timestep_sampling", "Timestep sampling.", configs.TIMESTEP_SAMPLINGS),
                number(
                    "discrete_flow_shift",
                    "Flow shift for 'shift' sampling (HV 7.0, Wan/FramePack 3.0 in the docs).",
                    3.0,
                    0.0,
                    100.0,
                ),
                choice("weighting_scheme", "Loss weighting.", configs.WEIGHTING_SCHEMES, advanced=True),
                string(
                    "network_args",
                    "Extra network args, space separated key=value (e.g. loraplus_lr_ratio=4).",
                    advanced=True,
                ),
                number("network_dropout", "Dropout on LoRA outputs; 0 = off.", 0.0, 0.0, 0.99, advanced=True),
                integer("gradient_accumulation_steps", "Steps per optimizer update.", 1, 1, 1024, advanced=True),
                integer(
                    "save_last_n_epochs",
                    "Keep only the last n epoch checkpoints; 0 = keep all.",
                    0,
                    0,
                    100000,
                    advanced=True,
                ),
                choice(
                    "save_precision",
                    "LoRA file precision (default: musubi's, fp32).",
                    configs.SAVE_PRECISIONS,
                    advanced=True,
                ),
                integer("max_data_loader_n_workers", "Data loader workers.", 2, 0, 64, advanced=True),
                boolean("save_state", "Also save optimizer state (to resume).", False, advanced=True),
                string("network_weights", "Continue from this LoRA file.", advanced=True),
                boolean(
                    "log_tensorboard",
                    "Write TensorBoard logs to <output_dir>/logs (needs tensorboard in musubi's venv).",
                    False,
                    advanced=True,
                ),
            ],
            outputs=[TrainingT.Output(display_name="training_config", tooltip="For a TrainLoRA node.")],
        )

    @classmethod
    def execute(cls, **kw):
        check_finite(cls, **kw)
        if kw.get("max_train_epochs", 0) > 0:
            kw["max_train_steps"] = 0
        kw["network_weights"] = env.native_path(kw.get("network_weights", ""))
        if kw["network_weights"] and not os.path.isfile(kw["network_weights"]):
            raise ValueError(
                f"network_weights {kw['network_weights']!r} does not exist: give a LoRA file or leave it empty"
            )
        if kw["network_weights"]:
            # an empty or cut-short LoRA would fail only after the DiT is loaded
            keys, _ = lora_file.read_safetensors_keys(kw["network_weights"], "network_weights")
            lora_file.inspect_lora(keys, "network_weights")
        cfg = configs.TrainingConfig(**kw)
        cfg.validate()
        return io.NodeOutput(cfg)


class OptimizerConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_OptimizerConfig",
            display_name="Musubi Optimizer Config",
            category="MusubiTuner/train",
            description="Optimizer, its arguments, learning-rate schedule with warmup, and gradient clipping.",
            inputs=[
                choice(
                    "optimizer_type",
                    "AdamW8bit needs bitsandbytes in musubi's venv; custom: a class path below.",
                    configs.OPTIMIZERS,
                ),
                string("custom_optimizer", "optimizer_type custom: full class path, e.g. prodigyopt.Prodigy."),
                string("optimizer_args", "Space separated key=value, e.g. weight_decay=0.01 betas=0.9,0.999."),
                choice("lr_scheduler", "Learning-rate schedule.", configs.LR_SCHEDULERS),
                number(
                    "lr_warmup_steps", "Warmup: >= 1 = steps, < 1 = fraction of all steps, 0 = none.", 0.0, 0.0, 1e6
                ),
                integer(
                    "lr_scheduler_num_cycles", "cosine_with_restarts: number of restarts.", 1, 1, 1000, advanced=True
                ),
                number("lr_scheduler_power", "polynomial: power.", 1.0, 0.0, 100.0, advanced=True),
                number(
                    "lr_scheduler_min_lr_ratio",
                    "Lowest LR as a fraction of the start LR; 0 = scheduler default.",
                    0.0,
                    0.0,
                    1.0,
                    advanced=True,
                ),
                number("max_grad_norm", "Gradient clipping norm; 0 = off.", 1.0, 0.0, 1000.0),
            ],
            outputs=[OptimizerT.Output(display_name="optimizer_config", tooltip="For a TrainLoRA node.")],
        )

    @classmethod
    def execute(cls, **kw):
        check_finite(cls, **kw)
        cfg = configs.OptimizerConfig(**kw)
        cfg.args()
        return io.NodeOutput(cfg)


class SamplingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_SamplingConfig",
            display_name="Musubi Sampling Config",
            category="MusubiTuner/train",
            description="Sample videos rendered during training (to <output_dir>/sample). One prompt per line; per-line "
            "options such as --w 832 --h 480 --f 25 --s 20 --d 42 win over the defaults below.",
            inputs=[
                string("prompts", "Prompts, one per line; # starts a comment.", multiline=True),
                integer("sample_every_n_epochs", "Render every n epochs; 0 = off.", 1, 0, 100000),
                integer("sample_every_n_steps", "Render every n steps; 0 = off.", 0, 0, 10_000_000),
                boolean("sample_at_first", "Render once before training starts."),
                integer("width", "Default width (--w); 0 = musubi's default.", 0, 0, 4096),
                integer("height", "Default height (--h); 0 = musubi's default.", 0, 0, 4096),
                integer("frames", "Default frame count (--f); 0 = musubi's default.", 0, 0, 1024),
                integer("steps", "Default sampling steps (--s); 0 = musubi's default.", 0, 0, 1000),
                integer("seed", "Default seed (--d); -1 = random.", -1, -1, 2**31 - 1),
            ],
            outputs=[SamplingT.Output(display_name="sampling_config", tooltip="For a TrainLoRA node.")],
        )

    @classmethod
    def execute(cls, **kw):
        cfg = configs.SamplingConfig(**kw)
        cfg.validate()
        return io.NodeOutput(cfg)


class MemoryOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_MemoryOptimizer",
            display_name="Musubi Memory Optimizer",
            category="MusubiTuner/train",
            description="VRAM savers (block swap, fp8, VAE tiling/chunking, split attention) that override the "
            "training config; each is passed only to training scripts that have it. mode 'suggest' picks values from "
            "the free VRAM (a heuristic starting point, for HunyuanVideo, Wan and FramePack).",
            inputs=[
                choice("mode", "suggest: from free VRAM; manual: the values below.", ("suggest", "manual")),
                choice("architecture", "For the suggestion.", archs.TRAINABLE),
                choice("model_size", "Wan: 14B or 1.3B (for the suggestion).", ("14B", "1.3B")),
                number("vram_gb", "Free VRAM in GiB for the suggestion; 0 = measure GPU 0 now.", 0.0, 0.0, 1024.0),
                integer("blocks_to_swap", "manual: blocks offloaded to CPU; 0 = off.", 0, 0, 60),
                boolean("use_pinned_memory_for_block_swap", "manual: pinned RAM for faster swaps.", False),
                boolean("fp8_base", "manual: base DiT in fp8."),
                boolean("fp8_scaled", "manual: scaled fp8 (Wan / FramePack; better quality than plain fp8)."),
                boolean("fp8_text_encoder", "manual: text encoder in fp8 (for sampling)."),
                boolean("gradient_checkpointing", "manual: recompute activations.", True),
                boolean("split_attn", "manual: attention in chunks (less peak VRAM)."),
                boolean("vae_tiling", "manual: VAE tiling (HunyuanVideo / FramePack sampling)."),
                integer("vae_chunk_size", "manual: VAE chunk size; 0 = off.", 0, 0, 1024),
                integer(
                    "vae_spatial_tile_sample_min_size", "manual: VAE tile size; 0 = default.", 0, 0, 4096, advanced=True
                ),
                boolean("vae_cache_cpu", "manual: Wan VAE cache on CPU.", advanced=True),
                boolean(
                    "block_swap_h2d_only",
                    "manual, with block swap: copy blocks to the GPU only (no copy back; less traffic).",
                    optional=True,
                    advanced=True,
                ),
                boolean(
                    "gradient_checkpointing_cpu_offload",
                    "manual: keep checkpointed activations on the CPU (less VRAM, slower).",
                    optional=True,
                    advanced=True,
                ),
            ],
            outputs=[
                MemoryT.Output(display_name="memory_config", tooltip="For a TrainLoRA node."),
                io.String.Output(display_name="explanation", tooltip="What was chosen and why."),
            ],
        )

    @classmethod
    def execute(cls, mode, architecture, model_size, vram_gb, **manual):
        check_finite(cls, vram_gb=vram_gb)
        if mode == "manual":
            cfg = configs.MemoryConfig(**manual, note="manual settings")
            return io.NodeOutput(cfg, cfg.note)
        if vram_gb <= 0:
            import torch

            if not torch.cuda.is_available():
                raise ValueError("vram_gb is 0 and no CUDA GPU is visible to ComfyUI: type the free VRAM in GiB")
            vram_gb = torch.cuda.mem_get_info(0)[0] / 2**30
        cfg = configs.suggest_memory(architecture, vram_gb, model_size)
        return io.NodeOutput(cfg, cfg.note)
