"""Which CUDA-graph capture patterns hold under PyTorch's cudaMallocAsync allocator.

ComfyUI starts PyTorch with ``backend:cudaMallocAsync`` on NVIDIA. The pack's CUDA-graph paths
(USDU's denoiser calls, the LoRA trainer's micro-steps) record with a shared memory pool, under
``torch.inference_mode`` (USDU), with autograd (the trainer), and while other threads of the
server may touch CUDA. A failed capture under this allocator has been seen to abort the whole
process, so each pattern runs here in its own subprocess: the table says, per pattern, whether
it recorded, whether replays match eager execution (max |diff|), and how the process ended
(a negative return code is a signal, i.e. an abort). This decides which patterns the pack may
record when ComfyUI runs with its default allocator.

Run on a CUDA machine: ``python benchmarks/cuda_graph_allocator_probe.py [--json out.json]``

Result on an H200 with torch 2.11.0+cu130 (``cuda_graph_allocator_results_h200.json``): every
capture that succeeds replays exactly as eager execution (forward, inference mode, SDPA, a bf16
autocast training step, shared pools), but every capture that fails aborts the process, and so
does another thread's CUDA work during a global-mode capture (thread-local mode survives it).
A checked run with host syncs refused (``sync_debug_preflight``) names a host sync in Python.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

from bench_env import run_isolated_cases

logger = logging.getLogger("cuda_graph_allocator_probe")

CASES = [
    "fwd_nopool",
    "fwd_pool",
    "two_graphs_pool",
    "inference_mode",
    "train_step",
    "train_step_pool",
    "sdpa",
    "free_during_capture",
    "failed_capture_then_eager",
    "failed_capture_pool_then_eager",
    "thread_cuda_during_capture",
    "thread_local_mode_thread",
    "graph_del_then_more",
    "autocast_bf16_train",
    "failed_capture_keep_alive",
    "failed_capture_relaxed",
    "sync_debug_preflight",
    "failed_capture_in_inference_mode",
]


def run_case(name: str) -> dict:  # noqa: C901 - one branch per probed pattern
    import torch
    import torch.nn.functional as F

    dev = "cuda"
    torch.manual_seed(0)
    assert torch.cuda.get_allocator_backend() == "cudaMallocAsync", torch.cuda.get_allocator_backend()
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)).to(dev)
    x = torch.randn(64, 512, device=dev)

    def warm(fn, *a):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(*a)
        torch.cuda.current_stream().wait_stream(s)

    def fwd(inp):
        return net(inp) * 2

    def cap(fn, static, pool=None, **kw):
        warm(fn, static)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool, **kw):
            out = fn(static)
        return g, out

    if name in ("fwd_nopool", "fwd_pool"):
        with torch.no_grad():
            st = x.clone()
            g, out = cap(fwd, st, torch.cuda.graph_pool_handle() if name == "fwd_pool" else None)
            errs = []
            for _i in range(5):
                xi = torch.randn_like(x)
                st.copy_(xi)
                g.replay()
                errs.append((out - fwd(xi)).abs().max().item())
        return {"max_err": max(errs)}
    if name == "two_graphs_pool":
        with torch.no_grad():
            pool = torch.cuda.graph_pool_handle()
            st1 = x.clone()
            st2 = torch.randn(32, 512, device=dev)
            g1, o1 = cap(fwd, st1, pool)
            g2, o2 = cap(fwd, st2, pool)
            errs = []
            for _i in range(5):
                a = torch.randn_like(st1)
                b = torch.randn_like(st2)
                st1.copy_(a)
                g1.replay()
                r1 = o1.clone()
                st2.copy_(b)
                g2.replay()
                errs += [(r1 - fwd(a)).abs().max().item(), (o2 - fwd(b)).abs().max().item()]
        return {"max_err": max(errs)}
    if name == "inference_mode":
        with torch.inference_mode():
            st = x.clone()
            g, out = cap(fwd, st, torch.cuda.graph_pool_handle())
            errs = []
            for _i in range(5):
                xi = torch.randn_like(x)
                st.copy_(xi)
                g.replay()
                errs.append((out - fwd(xi)).abs().max().item())
        return {"max_err": max(errs)}
    if name in ("train_step", "train_step_pool", "autocast_bf16_train"):
        params = list(net.parameters())

        def step(inp):
            if name == "autocast_bf16_train":
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    loss = net(inp).float().pow(2).mean()
            else:
                loss = net(inp).pow(2).mean()
            grads = torch.autograd.grad(loss, params)
            return loss.detach(), grads

        st = x.clone()
        g, (loss0, gr) = cap(step, st, torch.cuda.graph_pool_handle() if name != "train_step" else None)
        errs = []
        for _i in range(5):
            xi = torch.randn_like(x)
            st.copy_(xi)
            g.replay()
            l2, gr2 = step(xi)
            errs.append(max((a - b).abs().max().item() for a, b in zip(gr, gr2, strict=False)))
            errs.append((loss0 - l2).abs().item())
            with torch.no_grad():
                for p, gg in zip(params, gr, strict=False):
                    p -= 1e-3 * gg  # in-place update: graph reads the new weights
        return {"max_err": max(errs)}
    if name == "sdpa":
        q = torch.randn(2, 8, 1024, 64, device=dev, dtype=torch.bfloat16)

        def f(t):
            return F.scaled_dot_product_attention(t, t, t)

        with torch.no_grad():
            st = q.clone()
            g, out = cap(f, st, torch.cuda.graph_pool_handle())
            qi = torch.randn_like(q)
            st.copy_(qi)
            g.replay()
            return {"max_err": (out - f(qi)).abs().max().item()}
    if name == "free_during_capture":
        with torch.no_grad():
            holder = {"t": torch.randn(1024, 1024, device=dev)}

            def f(inp):
                y = net(inp)
                holder.pop("t", None)  # frees an allocation made before capture
                return y

            st = x.clone()
            warm(lambda s: net(s), st)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle()):
                out = f(st)
            g.replay()
            torch.cuda.synchronize()
            return {"max_err": (out - net(x)).abs().max().item()}
    if name in ("failed_capture_then_eager", "failed_capture_pool_then_eager"):
        with torch.no_grad():
            st = x.clone()
            warm(fwd, st)
            g = torch.cuda.CUDAGraph()
            msg = ""
            try:
                with torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle() if "pool" in name else None):
                    y = fwd(st)
                    y.sum().item()  # host sync: capture fails
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e)[:150]}"
            try:
                torch.cuda.synchronize()
            except Exception as e:
                msg += f" | sync: {type(e).__name__}: {str(e)[:100]}"
            del g
            import gc

            gc.collect()
            for _ in range(20):
                y = fwd(torch.randn_like(x))
                z = torch.randn(4096, 4096, device=dev)
                del z
            torch.cuda.synchronize()
            return {"capture_error": msg, "eager_after": "ok"}
    if name in ("failed_capture_keep_alive", "failed_capture_relaxed", "failed_capture_in_inference_mode"):
        keep = []
        ctx = torch.inference_mode() if "inference" in name else torch.no_grad()
        with ctx:
            st = x.clone()
            warm(fwd, st)
            g = torch.cuda.CUDAGraph()
            kw = {"capture_error_mode": "relaxed"} if "relaxed" in name else {}
            msg = ""
            try:
                with torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle(), **kw):
                    y = fwd(st)
                    keep.append(y)
                    y.sum().item()
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e)[:150]}"
            keep.append(g)
            try:
                torch.cuda.synchronize()
            except Exception as e:
                msg += f" | sync: {type(e).__name__}: {str(e)[:100]}"
            for _ in range(20):
                y = fwd(torch.randn_like(x))
                z = torch.randn(4096, 4096, device=dev)
                del z
            torch.cuda.synchronize()
            return {"capture_error": msg, "eager_after": "ok", "kept": len(keep)}
    if name == "sync_debug_preflight":
        # A warm-up under sync debug mode "error" names a host sync before any capture starts.
        st = x.clone()
        torch.cuda.set_sync_debug_mode("error")
        msg = ""
        try:
            with torch.no_grad():
                fwd(st).sum().item()
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e)[:150]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        return {"preflight_error": msg}
    if name in ("thread_cuda_during_capture", "thread_local_mode_thread"):
        stop = threading.Event()
        errs = []

        def other():
            while not stop.is_set():
                try:
                    torch.cuda.mem_get_info()
                    torch.empty(1000, device=dev)
                    time.sleep(0.0005)
                except Exception as e:
                    errs.append(f"{type(e).__name__}: {str(e)[:100]}")
                    break

        th = threading.Thread(target=other)
        th.start()
        try:
            with torch.no_grad():
                st = x.clone()
                kw = {"capture_error_mode": "thread_local"} if name == "thread_local_mode_thread" else {}
                res = {}
                for _k in range(20):
                    g, out = cap(fwd, st, torch.cuda.graph_pool_handle(), **kw)
                    g.replay()
                res["max_err"] = (out - fwd(x)).abs().max().item()
        finally:
            stop.set()
            th.join()
        res["thread_errors"] = errs[:1]
        return res
    if name == "graph_del_then_more":
        with torch.no_grad():
            for k in range(10):
                st = torch.randn(64 + k, 512, device=dev)
                g, out = cap(fwd, st, torch.cuda.graph_pool_handle())
                g.replay()
                out.clone()
                del g, out
            torch.cuda.synchronize()
        return {"ok": True}
    raise SystemExit("unknown case")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--cases", help="comma-separated subset of the cases (default: all)")
    parser.add_argument("case", nargs="?", help=argparse.SUPPRESS)  # internal: run one case
    args = parser.parse_args()
    if args.case:
        res = run_case(args.case)
        import torch

        torch.cuda.synchronize()
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    logger.info("torch %s, CUDA %s", torch.__version__, torch.version.cuda)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    results = run_isolated_cases(__file__, args.cases.split(",") if args.cases else CASES, env, timeout=180)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
