"""Benchmark: ways to run ESRGAN's residual dense block (RDB) on a GPU, one run, same input.

RealESRGAN_x4plus spends ~92 % of its FLOPs in 69 RDBs whose first four convs have only 32
output channels: tensor-core GEMMs with N=32 run far below peak. This script times one RDB
(and the whole RRDBNet) at 1080p in fp16 channels_last, as spandrel builds it and as
``speedkit.upscale_cuda.fused_rrdb`` rewrites it, eager and compiled, and prints the
achieved TFLOP/s so the choice in the engine rests on a measurement.

Usage (CUDA machine)::

    python benchmarks/rrdb_block_variants.py [--height 1080 --width 1920] [--autotune]
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
from bench_env import register_pack

register_pack()

from speedkit.upscale_cuda.cache import split_conv_bias  # noqa: E402
from speedkit.upscale_cuda.fused_rrdb import fuse_dense_blocks  # noqa: E402

log = logging.getLogger("rrdb_variants")


def rdb_macs_per_pixel(nf: int = 64, gc: int = 32) -> int:
    ins = [nf + i * gc for i in range(5)]
    outs = [gc] * 4 + [nf]
    return sum(9 * i * o for i, o in zip(ins, outs, strict=True))


def timed(fn, x: torch.Tensor, iters: int) -> float:
    """Median milliseconds of ``fn(x)`` over ``iters`` calls after two warm-up calls."""
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def first_call_and_steady(fn, x: torch.Tensor, flops: float, iters: int, ref: torch.Tensor | None):
    """(first-call seconds, steady ms, TFLOP/s, max |diff| to ``ref``, reference) of ``fn(x)``;
    the first variant measured becomes the reference of the rest."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = fn(x)
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ref = y.float() if ref is None else ref
    diff = (y.float() - ref).abs().max().item()
    ms = timed(fn, x, iters)
    return first, ms, flops / ms / 1e9, diff, ref


def log_table(title: str, rows: list[tuple], ms_digits: int) -> None:
    log.info("\n%s", title)
    log.info("%-28s %9s %9s %9s %10s", "variant", "ms", "TFLOP/s", "first s", "max|diff|")
    for name, first, ms, tf, diff in rows:
        log.info("%-28s %9.*f %9.1f %9.1f %10.2e", name, ms_digits, ms, tf, first, diff)


def triton_conv_compiled(module: torch.nn.Module):
    """``module`` compiled with inductor's Triton conv templates as the only conv backend.

    The inductor config is patched only while the first call compiles (compilation is lazy)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module, mode="max-autotune-no-cudagraphs", dynamic=False)
    state = {"done": False}

    def call(x):
        if not state["done"]:
            with inductor_config.patch(
                max_autotune_conv_backends="TRITON", max_autotune_gemm_backends="TRITON", epilogue_fusion=True
            ):
                y = compiled(x)
            state["done"] = True
            return y
        return compiled(x)

    return call


def profile_top_kernels(model, inp: torch.Tensor, top: int = 15) -> None:
    """Log the GPU kernels that take the most time in one call of ``model`` (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(inp)
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events if e.device_time_total > 0)
    log.info("\ntop GPU kernels of one call (total %.1f ms):", total / 1e3)
    for e in sorted(events, key=lambda e: e.device_time_total, reverse=True)[:top]:
        log.info(
            "%8.2f ms %5.1f %%  x%-4d %s",
            e.device_time_total / 1e3,
            100 * e.device_time_total / total,
            e.count,
            e.key[:90],
        )


def build_model():
    from spandrel.architectures.ESRGAN import ESRGANArch  # noqa: F401  (checks spandrel present)
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

    torch.manual_seed(0)
    net = RRDBNet(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--autotune", action="store_true", help="also try max-autotune-no-cudagraphs on one RDB")
    parser.add_argument(
        "--triton-conv",
        action="store_true",
        help="also try inductor's Triton conv templates only (max-autotune, conv epilogues fused) on one RDB",
    )
    parser.add_argument("--skip-model", action="store_true", help="only the single-block timings")
    parser.add_argument(
        "--profile-model", action="store_true", help="print the whole model's top GPU kernels (torch.profiler)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    h, w = args.height, args.width
    log.info(
        "GPU %s, torch %s, cuDNN %s, %s, %dx%d",
        torch.cuda.get_device_name(),
        torch.__version__,
        torch.backends.cudnn.version(),
        args.dtype,
        w,
        h,
    )

    net = build_model()
    rdb = net.model[1].sub[0].RDB1
    variants: dict[str, torch.nn.Module] = {}
    variants["spandrel"] = copy.deepcopy(rdb)
    variants["spandrel+bias-split"] = copy.deepcopy(rdb)
    split_conv_bias(variants["spandrel+bias-split"])
    fused = copy.deepcopy(rdb)
    fused_holder = torch.nn.Sequential(fused)
    fuse_dense_blocks(fused_holder)
    variants["fused"] = fused_holder
    for name, m in list(variants.items()):
        variants[name] = m.to(dev, dtype).to(memory_format=torch.channels_last)

    x = torch.randn(1, 64, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * rdb_macs_per_pixel() * h * w
    ref = None
    rows = []
    fns = {name: m for name, m in variants.items()}
    for name in list(variants):
        fns[name + " compiled"] = torch.compile(variants[name], dynamic=False)
    if args.autotune:
        fns["spandrel max-autotune"] = torch.compile(
            variants["spandrel"], mode="max-autotune-no-cudagraphs", dynamic=False
        )
        fns["fused max-autotune"] = torch.compile(variants["fused"], mode="max-autotune-no-cudagraphs", dynamic=False)
    if args.triton_conv:
        for name in ("spandrel", "fused"):
            fns[name + " triton-conv"] = triton_conv_compiled(variants[name])
    for name, fn in fns.items():
        *row, ref = first_call_and_steady(fn, x, flops, args.iters, ref)
        rows.append((name, *row))
    log_table(f"one RDB at {w}x{h} ({flops / 1e9:.1f} GFLOP):", rows, 3)

    if args.skip_model:
        return
    from speedkit.upscale_cuda.cache import repeated_blocks

    total = (
        2 * (69 * rdb_macs_per_pixel() + 9 * 64 * (3 + 64)) * h * w
        + 2 * 9 * 64 * 64 * h * w * (4 + 16 + 16)
        + 2 * 9 * 64 * 3 * 16 * h * w
    )
    inp = torch.rand(1, 3, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    models = {}
    base = copy.deepcopy(net)
    split_conv_bias(base)
    models["spandrel+bias-split regional"] = base
    fz = copy.deepcopy(net)
    n = fuse_dense_blocks(fz)
    split_conv_bias(fz)
    log.info("fused %d dense blocks", n)
    models["fused regional"] = fz
    models["fused whole-model compile"] = copy.deepcopy(fz)
    rows = []
    ref = None
    for name, m in models.items():
        m = m.to(dev, dtype).to(memory_format=torch.channels_last)
        if "whole-model" in name:
            m = torch.compile(m, dynamic=False)
        else:
            for block in repeated_blocks(m):
                block.compile(dynamic=False)
        *row, ref = first_call_and_steady(m, inp, total, max(3, args.iters // 3), ref)
        rows.append((name, *row))
        if args.profile_model and name == "fused regional":
            profile_top_kernels(m, inp)
        del m
        torch.cuda.empty_cache()
    log_table(f"whole RRDBNet x4 at {w}x{h} ({total / 1e12:.1f} TFLOP), GPU compute only:", rows, 1)


if __name__ == "__main__":
    main()
