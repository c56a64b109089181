"""LoRA training speed: SpeedKit's trainer vs ComfyUI's native TrainLoraNode, same model and data.

Both train the real SDXL / SD1.5 UNet architecture (ComfyUI's own model configs, random bf16
weights, no download) on the same 4 random latents and the same conditioning, batch 1, rank 32,
bf16, gradient checkpointing on, AdamW. Printed: steady-state it/s and peak CUDA memory of each.

ComfyUI's node is timed twice (few and more steps) and the per-step rate taken from the
difference, so its one-off setup is not counted against it. It trains its default adapter set
(LoRA on every weight matrix plus bias/norm diffs, ``training_dtype=bf16``), as a user gets it.

Run (CUDA GPU; ComfyUI checkout in COMFYUI_ROOT)::

    COMFYUI_ROOT=/path/to/ComfyUI python benchmarks/lora_bench.py --family sdxl sd15
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import time

import torch
from bench_env import register_pack, stub_pyav

REPO = register_pack()
if os.environ.get("COMFYUI_ROOT") and os.environ["COMFYUI_ROOT"] not in sys.path:
    sys.path.insert(0, os.environ["COMFYUI_ROOT"])  # benchmark script only; the pack never edits sys.path

from speedkit.lora_train.block_checkpoint import checkpointed  # noqa: E402
from speedkit.lora_train.layers import LoRASet, find_unet_targets  # noqa: E402
from speedkit.lora_train.run import COMPILED_BLOCKS, transformer_block_call  # noqa: E402
from speedkit.lora_train.trainer import Sample, TrainConfig, Trainer  # noqa: E402

logger = logging.getLogger(__name__)

UNET_CONFIGS = {
    "sdxl": dict(
        adm_in_channels=2816,
        num_classes="sequential",
        num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10,
        use_linear_in_transformer=True,
        context_dim=2048,
        num_head_channels=64,
    ),
    "sd15": dict(
        adm_in_channels=None,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        transformer_depth_middle=1,
        use_linear_in_transformer=False,
        context_dim=768,
        num_heads=8,
    ),
}
RESOLUTION = {"sdxl": 1024, "sd15": 512}


def random_model(family: str, device: torch.device, model_channels: int = 320, heads: dict | None = None):
    """ComfyUI's model of ``family`` (its UNet block structure; width ``model_channels``, attention
    heads ``heads`` to override the family's) with random bf16 weights on ``device``, frozen."""
    import comfy.supported_models as sm

    cfg = dict(
        use_checkpoint=False,
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=model_channels,
        use_spatial_transformer=True,
        legacy=False,
        use_temporal_resblock=False,
        use_temporal_attention=False,
        **{**UNET_CONFIGS[family], **(heads or {})},
    )
    model_config = (sm.SDXL if family == "sdxl" else sm.SD15)(cfg)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in model.diffusion_model.state_dict(keep_vars=True).items():
            if t.ndim == 1:
                t.fill_(1.0 if name.endswith("weight") else 0.0)
            elif t.ndim > 1:
                t.copy_(torch.randn(t.shape, generator=gen, device=device) / math.sqrt(t[0].numel()))
    model.diffusion_model.requires_grad_(False)
    return model


def build_model(family: str):
    """ComfyUI ModelPatcher of the full-size UNet with random bf16 weights on the GPU."""
    import comfy.model_management as mm
    import comfy.model_patcher

    device = mm.get_torch_device()
    model = random_model(family, device)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def conditioning(patcher, family: str, count: int):
    """Per-image (latent, context, pooled, y) with fixed seeds: the same data for both trainers."""
    res = RESOLUTION[family]
    gen = torch.Generator().manual_seed(1)
    ctx_dim = UNET_CONFIGS[family]["context_dim"]
    items = []
    for _ in range(count):
        latent = torch.randn(4, res // 8, res // 8, generator=gen)
        context = torch.randn(1, 77, ctx_dim, generator=gen)
        pooled = torch.randn(1, 1280, generator=gen) if family == "sdxl" else None
        y = None
        if family == "sdxl":
            y = patcher.model.encode_adm(
                pooled_output=pooled, height=res, width=res, crop_h=0, crop_w=0, target_height=res, target_width=res
            )
        items.append((latent, context, pooled, y))
    return items


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_ours(
    patcher, family, data, rank, steps, warmup, blocks_kind, autocast=False, compile=False, graphs=True
) -> dict:
    device = patcher.load_device
    unet = patcher.model.diffusion_model
    dtype = patcher.model.get_dtype_inference()
    res = RESOLUTION[family]
    lora = LoRASet()
    lora.add(unet, find_unet_targets(unet, "attention"), rank=rank, alpha=rank, prefix="lora_unet", device=device)
    samples, cache = [], {}
    for i, (latent, context, _pooled, y) in enumerate(data):
        samples.append(Sample(latent, f"caption {i}", (res, res, 0, 0, res, res), (res, res)))
        cond = {"context": context.to(device)}
        if y is not None:
            cond["y"] = y.to(device)
        cache[(f"caption {i}", i)] = cond

    def denoise(x, t, cond):
        y = cond.get("y")
        y = None if y is None else y.to(dtype)
        return unet(x.to(dtype), t.float(), context=cond["context"].to(dtype), y=y, transformer_options={})

    def no_encode(captions, batch):
        raise AssertionError("conditioning is cached")

    names = {
        "resblock+transformer": ("BasicTransformerBlock", "ResBlock"),
        "transformer": ("BasicTransformerBlock",),
        "none": (),
    }
    blocks = [m for m in unet.modules() if type(m).__name__ in names.get(blocks_kind, ())]
    # compiled as the node does under SPEEDKIT_TRAIN_COMPILE: the transformer blocks only, with the
    # per-block transformer_options left out (lora_train/run.py, transformer_block_call)
    compiled = [m for m in unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
    config = TrainConfig(
        steps=steps + warmup, rank=rank, alpha=rank, unet_lr=1e-4, precision="bf16", grad_checkpointing=bool(blocks)
    )
    trainer = Trainer(
        config,
        lora,
        samples,
        denoise,
        no_encode,
        device,
        cond_cache=cache,
        autocast=autocast,
        compile_blocks=compile,
        cuda_graphs=graphs,
    )
    try:
        with checkpointed(
            blocks, checkpoint=bool(blocks), compile=compile, compiled=compiled, call=transformer_block_call
        ):
            start = time.perf_counter()
            for _ in range(warmup):
                trainer.train_step()
            sync()
            warmup_s = time.perf_counter() - start
            reset_peak()
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            sync()
            seconds = time.perf_counter() - start
    finally:
        lora.detach()
    return {
        "it_s": steps / seconds,
        "peak_gib": peak_gib(),
        "lora_layers": len(lora),
        "loss_last": trainer.losses[-1],
        "checkpointing": blocks_kind,
        "autocast": autocast,
        "compile": compile,
        "warmup_s": warmup_s,
        **trainer.graph_stats,
    }


def bench_comfy(patcher, data, rank, steps_small, steps_large) -> dict:
    from comfy_extras.nodes_train import TrainLoraNode

    latents = torch.stack([d[0] for d in data])
    positive = [[d[1], {"pooled_output": d[2]} if d[2] is not None else {}] for d in data]
    node = TrainLoraNode.PREPARE_CLASS_CLONE({"hidden_inputs": {}})

    def run(steps: int) -> float:
        kwargs = dict(
            model=[patcher],
            latents=[{"samples": latents.clone()}],
            positive=[positive],
            batch_size=[1],
            grad_accumulation_steps=[1],
            steps=[steps],
            learning_rate=[1e-4],
            rank=[rank],
            optimizer=["AdamW"],
            loss_function=["MSE"],
            seed=[0],
            training_dtype=["bf16"],
            lora_dtype=["bf16"],
            quantized_backward=[False],
            algorithm=["LoRA"],
            gradient_checkpointing=[True],
            checkpoint_depth=[1],
            offloading=[False],
            existing_lora=["[None]"],
            bucket_mode=[False],
            bypass_mode=[False],
        )
        sync()
        start = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            node.execute(**kwargs)
        sync()
        return time.perf_counter() - start

    run(1)  # warm-up (kernels, allocator)
    reset_peak()
    t_small = run(steps_small)
    t_large = run(steps_large)
    per_step = (t_large - t_small) / (steps_large - steps_small)
    return {"it_s": 1.0 / per_step, "peak_gib": peak_gib(), "setup_s": t_small - steps_small * per_step}


# (checkpointed blocks, autocast, torch.compile, CUDA graphs). The node's default is the first
# row ("resblock+transformer", no autocast for a bf16 model, CUDA graphs); with
# gradient_checkpointing off it is the "none" row. The ComfyUI baseline runs before the last row
# (compile, which is skipped past the deadline).
PLANS = {
    "sdxl": [
        ("resblock+transformer", False, False, True),
        ("transformer", False, False, True),
        ("resblock+transformer", False, False, False),
        ("transformer", False, False, False),
        ("transformer", False, True, False),
    ],
    "sd15": [
        ("resblock+transformer", False, False, True),
        ("none", False, False, True),
        ("resblock+transformer", False, False, False),
        ("none", False, False, False),
        ("none", False, True, False),
    ],
}


def run_comfy(patcher, family, data, args, results) -> None:
    try:
        row = bench_comfy(patcher, data, args.rank, *args.comfy_steps)
    except Exception as exc:
        row = {"it_s": float("nan"), "peak_gib": float("nan"), "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    row.update(family=family, trainer="comfyui TrainLoraNode", resolution=RESOLUTION[family])
    results.append(row)
    emit(json.dumps(row))
    reset_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["sdxl", "sd15"], choices=sorted(UNET_CONFIGS))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--comfy-steps", type=int, nargs=2, default=(3, 9), help="ComfyUI node: few, more steps")
    parser.add_argument("--no-comfy", action="store_true", help="skip ComfyUI's TrainLoraNode")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--budget", type=float, default=300, help="seconds after which compile variants are skipped")
    parser.add_argument(
        "--checkpointing", nargs="+", default=None, help="only these (resblock+transformer, transformer, none)"
    )
    parser.add_argument("--resolution", type=int, default=0, help="override (0 = 1024 SDXL, 512 SD1.5)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True  # before comfy.model_management is imported
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = []
    deadline = time.monotonic() + args.budget
    stub_pyav()
    if args.resolution:
        RESOLUTION.update(dict.fromkeys(RESOLUTION, args.resolution))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run: figures meaningless)"
    emit(f"device: {name}  torch {torch.__version__}")
    for family in args.family:
        patcher = build_model(family)
        data = conditioning(patcher, family, 4)
        plan = PLANS[family] if not args.checkpointing else [(k, False, False, True) for k in args.checkpointing]
        for index, (kind, autocast, compile, graphs) in enumerate(plan):
            if index == len(plan) - 1 and not args.no_comfy:
                run_comfy(patcher, family, data, args, results)
            if compile and (args.no_compile or time.monotonic() > deadline):
                continue
            try:
                row = bench_ours(
                    patcher, family, data, args.rank, args.steps, args.warmup, kind, autocast, compile, graphs
                )
            except Exception as exc:  # report and go on: one failed variant must not hide the others
                row = {"it_s": float("nan"), "peak_gib": float("nan"), "checkpointing": kind, "compile": compile}
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row.update(family=family, trainer="speedkit", resolution=RESOLUTION[family])
            results.append(row)
            emit(json.dumps(row))
            reset_peak()
        del patcher
        reset_peak()
    emit("\nfamily  res   trainer                                  it/s   peak GiB")
    for r in results:
        label = r["trainer"]
        if "checkpointing" in r:
            label += f" (ckpt {r['checkpointing']}{', autocast' if r.get('autocast') else ''}"
            label += f"{', compile' if r.get('compile') else ''}{', CUDA graphs' if r.get('cuda_graphs') else ''})"
        emit(f"{r['family']:6}  {r['resolution']:4}  {label:58} {r['it_s']:6.2f}  {r['peak_gib']:8.2f}")
    for family in args.family:
        ours = [r for r in results if r["family"] == family and r["trainer"] == "speedkit"]
        comfy = [r for r in results if r["family"] == family and r["trainer"] != "speedkit"]
        if ours and comfy:
            default = ours[0]  # the node's default settings
            best = max((r for r in ours if r["it_s"] == r["it_s"]), key=lambda r: r["it_s"], default=default)
            base = comfy[0]["it_s"]
            emit(
                f"{family}: speedkit default / ComfyUI TrainLoraNode = {default['it_s'] / base:.2f}x, "
                f"best variant = {best['it_s'] / base:.2f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
