"""Which part of ComfyUI's SDXL UNet fails to record as a CUDA graph under cudaMallocAsync.

In a ComfyUI server with its default allocator (cudaMallocAsync), recording the SDXL UNet's
forward fails with "CUDA error: invalid argument" although a checked run with host syncs
refused passes, and the failed capture then aborts the process
(``cuda_graph_allocator_results_h200.json``). This probe records pieces of the real UNet
(ComfyUI v0.19.3's ``UNetModel`` with SDXL's configuration, random fp16 weights, under
``torch.inference_mode`` as ComfyUI samples) each in its own subprocess, so the piece that
fails can be named without losing the probe. Per piece: the return code (negative = killed
by a signal, i.e. the abort), whether it recorded, and replay vs eager max |diff|. The whole
UNet is also recorded in variants (:data:`VARIANTS`): on the stream of the checked run, twice in
a row, without a shared pool; a variant that records where the pack's way aborts names the fix.

Result on an H200 (``cuda_graph_comfy_unet_results_h200.json``): the whole UNet records in every
variant and replays exactly (max |diff| 0), and so does attention. The UNet alone does not fail
under cudaMallocAsync; what broke the recording in a server is outside it.

Run on a CUDA machine from the pack folder::

    COMFYUI_ROOT=/path/to/ComfyUI python benchmarks/cuda_graph_comfy_unet_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from bench_env import run_isolated_cases

logger = logging.getLogger("cuda_graph_comfy_unet_probe")

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip
PIECES = ["unet_full", "time_embed", "input_block_0", "input_block_1", "input_block_4", "middle", "attention", "out"]
VARIANTS = {
    "": "recorded as the pack records (its own capture stream, shared pool, thread-local mode)",
    "side": "recorded on the stream the checked run used (its cuBLAS/cuDNN workspaces exist before capture)",
    "twice": "two recordings one after the other, sharing the pool",
    "side_twice": "two recordings on the checked run's stream",
    "nopool": "recorded without a shared pool",
}
CASES = [*PIECES, *(f"unet_full:{v}" for v in VARIANTS if v)]


def run_case(case: str) -> dict:
    """Build the UNet in this process (cwd = ComfyUI) and record one piece of it (``piece:variant``)."""
    import torch

    name, _, variant = case.partition(":")

    sys.argv = sys.argv[:1]  # ComfyUI's argument parser reads sys.argv on import
    import comfy.ops
    from comfy.ldm.modules.attention import optimized_attention
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, forward_timestep_embed, timestep_embedding

    assert torch.cuda.get_allocator_backend() == "cudaMallocAsync"
    dev = "cuda"
    torch.manual_seed(0)
    unet = UNetModel(**SDXL_UNET, dtype=torch.float16, device=dev, operations=comfy.ops.manual_cast)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(2, 4, 64, 64, device=dev, dtype=torch.float16)
    t = torch.full((2,), 500.0, device=dev)
    ctx = torch.randn(2, 77, 2048, device=dev, dtype=torch.float16)
    y = torch.randn(2, 2816, device=dev, dtype=torch.float16)
    opts: dict = {}

    def emb_of(t):
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels).to(x.dtype))
        return emb + unet.label_emb(y)

    with torch.inference_mode():
        emb = emb_of(t)
        h1 = forward_timestep_embed(unet.input_blocks[0], x, emb, ctx, opts)
        h4_in = torch.randn(2, 320, 32, 32, device=dev, dtype=torch.float16)
        mid_in = torch.randn(2, 1280, 16, 16, device=dev, dtype=torch.float16)
        q = torch.randn(2, 4096, 640, device=dev, dtype=torch.float16)
        fns = {
            "unet_full": lambda: unet(x, t, context=ctx, y=y, transformer_options={}),
            "time_embed": lambda: emb_of(t),
            "input_block_0": lambda: forward_timestep_embed(unet.input_blocks[0], x, emb, ctx, {}),
            "input_block_1": lambda: forward_timestep_embed(unet.input_blocks[1], h1, emb, ctx, {}),
            "input_block_4": lambda: forward_timestep_embed(unet.input_blocks[4], h4_in, emb, ctx, {}),
            "middle": lambda: forward_timestep_embed(unet.middle_block, mid_in, emb, ctx, {}),
            "attention": lambda: optimized_attention(q, q, q, 10),
            "out": lambda: unet.out(h1),
        }
        fn = fns[name]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()  # the checked run the pack does before recording
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(side)
        eager = fn().clone()
        pool = None if variant == "nopool" else torch.cuda.graph_pool_handle()
        stream = side if variant.startswith("side") else None
        graphs = []
        for _ in range(2 if variant.endswith("twice") else 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream, capture_error_mode="thread_local"):
                out = fn()
            graphs.append(g)
        for g in graphs:
            g.replay()
        torch.cuda.synchronize()
        return {"recorded": True, "max_err": float((out.float() - eager.float()).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--cases", help="comma-separated subset (default: all)")
    parser.add_argument("case", nargs="?", help=argparse.SUPPRESS)  # internal: run one case
    args = parser.parse_args()
    if args.case:
        res = run_case(args.case)
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        raise SystemExit("set COMFYUI_ROOT to a ComfyUI v0.19.3 checkout")
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    # faulthandler prints the Python stack of an abort: the line whose recording failed
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync", PYTHONPATH=path, PYTHONFAULTHANDLER="1")
    results = run_isolated_cases(__file__, args.cases.split(",") if args.cases else CASES, env, cwd=root)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
