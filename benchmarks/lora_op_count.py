"""Benchmark (CPU is enough): how many ATen ops one eager Train LoRA step dispatches, and how many
of them the LoRA layers add.

Without CUDA graphs an SDXL step at batch 1 is bound by the host: each dispatched op costs
microseconds of Python and dispatcher time whatever its size, so the op count, not the FLOPs,
sets the eager step rate on a fast GPU. The count does not depend on the layers' width or the
latent size, so this builds ComfyUI's real UNet block structure (SDXL or SD1.5 config, every
block and transformer depth as in the checkpoints) at a small width on the CPU, trains one warm-up
step and counts the ops of the next one (forward, checkpoint recompute and backward; the
optimizer step apart, since on CUDA it is one fused call and on the CPU a loop per parameter).
It runs twice: LoRA on every attention projection (the node's default targets) and on ``to_q``
only, and reports the ops each LoRA layer adds.

Usage::

    COMFYUI_ROOT=/path/to/ComfyUI python benchmarks/lora_op_count.py --family sdxl
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys

import torch
from bench_env import register_pack, stub_pyav
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

REPO = register_pack()
if os.environ.get("COMFYUI_ROOT") and os.environ["COMFYUI_ROOT"] not in sys.path:
    sys.path.insert(0, os.environ["COMFYUI_ROOT"])  # benchmark script only; the pack never edits sys.path

from lora_bench import UNET_CONFIGS, random_model  # noqa: E402

from speedkit.lora_train.block_checkpoint import checkpointed  # noqa: E402
from speedkit.lora_train.layers import LoRASet, find_unet_targets  # noqa: E402
from speedkit.lora_train.trainer import Sample, TrainConfig, Trainer  # noqa: E402

log = logging.getLogger("lora_op_count")
CHECKPOINT_BLOCKS = ("BasicTransformerBlock", "ResBlock")  # the node's default (lora_train/run.py)


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen ops by name while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.active = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def build_unet(family: str) -> torch.nn.Module:
    """ComfyUI's UNet with the family's block structure at width 32, random bf16 weights, on the CPU."""
    from comfy.cli_args import args

    args.cpu = True  # this process only: ComfyUI's model management must not look for a GPU
    args.use_pytorch_cross_attention = True  # the attention ComfyUI picks on NVIDIA (CPU picks a chunked one)
    heads = {"num_head_channels": 8} if family == "sdxl" else {"num_heads": 4}
    unet = random_model(family, torch.device("cpu"), model_channels=32, heads=heads).diffusion_model
    return unet.to(torch.bfloat16)


def count_step(unet: torch.nn.Module, family: str, targets: list[str]) -> collections.Counter[str]:
    """Ops of one eager bf16 training step (after a warm-up step) with LoRA on ``targets``."""
    res = 128
    ctx_dim = UNET_CONFIGS[family]["context_dim"]
    lora = LoRASet()
    lora.add(unet, targets, rank=4, alpha=4, prefix="lora_unet", device=torch.device("cpu"))
    samples, cache = [], {}
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        samples.append(Sample(torch.randn(4, res // 8, res // 8, generator=gen), f"c{i}", (res, res, 0, 0, res, res), (res, res)))  # fmt: skip
        cond = {"context": torch.randn(1, 77, ctx_dim, generator=gen)}
        if family == "sdxl":
            cond["y"] = torch.randn(1, 2816, generator=gen)
        cache[(f"c{i}", i)] = cond

    def denoise(x, t, cond):
        y = cond.get("y")
        y = None if y is None else y.to(torch.bfloat16)
        context = cond["context"].to(torch.bfloat16)
        return unet(x.to(torch.bfloat16), t.float(), context=context, y=y, transformer_options={})

    def no_encode(captions, batch):
        raise AssertionError("conditioning is cached")

    config = TrainConfig(steps=4, rank=4, alpha=4, unet_lr=1e-4, precision="bf16", grad_checkpointing=True)
    trainer = Trainer(config, lora, samples, denoise, no_encode, torch.device("cpu"), cond_cache=cache, cuda_graphs=False)  # fmt: skip
    blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINT_BLOCKS]
    counter = OpCounter()

    def pause(*_args) -> None:
        counter.active = False

    def resume(*_args) -> None:
        counter.active = True

    pre = register_optimizer_step_pre_hook(pause)
    post = register_optimizer_step_post_hook(resume)
    try:
        with checkpointed(blocks, checkpoint=True, compile=False):
            trainer.train_step()
            with counter:
                trainer.train_step()
    finally:
        pre.remove()
        post.remove()
        lora.detach()
    return counter.counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(UNET_CONFIGS), default="sdxl")
    parser.add_argument("--top", type=int, default=12, help="ops listed by name")
    parser.add_argument("--out", help="write the counts as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.environ.get("COMFYUI_ROOT"):
        log.error("set COMFYUI_ROOT to a ComfyUI checkout")
        return 2
    stub_pyav()
    torch.manual_seed(0)
    unet = build_unet(args.family)
    every = find_unet_targets(unet, "attention")
    only_q = [t for t in every if t.endswith("to_q")]
    full = count_step(unet, args.family, every)
    few = count_step(unet, args.family, only_q)
    total, total_few = sum(full.values()), sum(few.values())
    per_layer = (total - total_few) / (len(every) - len(only_q))
    log.info(
        "%s, eager bf16 step with checkpointing (optimizer step not counted): %d ATen ops with LoRA on %d "
        "attention projections, %d with LoRA on the %d to_q only: %.1f ops per LoRA layer, so the LoRA "
        "layers dispatch about %d of the %d (%.0f %%)",
        args.family, total, len(every), total_few, len(only_q), per_layer, per_layer * len(every), total,
        100 * per_layer * len(every) / total,
    )  # fmt: skip
    for name, n in full.most_common(args.top):
        added = (n - few.get(name, 0)) / (len(every) - len(only_q))
        log.info("  %-24s %7d  (%.1f per LoRA layer)", name, n, added)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"family": args.family, "layers": len(every), "full": full, "to_q_only": few}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
