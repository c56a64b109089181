"""Cost profile of First Block Cache on full-size architectures with random weights (GPU).

Ours vs the unpatched model, same inputs, same run, through ComfyUI's real sampler
(``comfy.sample.sample``, euler):

- SDXL UNet at 1024x1024 (latent 128x128), CFG (cond+uncond batched: batch 2 per call), 20 steps;
- a Flux-size DiT (19 double + 38 single blocks, hidden 3072) at 1024x1024, no CFG, 10 steps.

Forced hit patterns (the threshold is bypassed: random weights have no meaningful dynamics):
all computed (overhead), 50 % (every other call), all hits after the first (hit-step cost).
Peak GPU memory is compared with the unpatched run. Optionally ``torch.compile`` through
ComfyUI's own TorchCompileModel helper.

Run (ComfyUI importable): ``PYTHONPATH=$COMFYUI_ROOT:. python benchmarks/fbcache_cost.py --out results.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("fbcache_cost")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile(
    family: str,
    steps: int,
    cfg: float,
    repeats: int,
    fbc,
    adapter,
    compile_too: bool,
    per_block: bool,
    tiny: bool = False,
    compile_only: bool = False,
    profile_hits: Path | None = None,
    diagnose_sync: bool = False,
) -> dict:
    import comfy.sample
    import fbcache_models as fm
    from comfy.patcher_extension import WrappersMP

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    mp = fm.build_patcher(family, tiny=tiny, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    params = sum(p.numel() for p in mp.model.diffusion_model.parameters())
    ch = 16 if family == "flux" else 4
    size = 16 if tiny else 128
    noise = torch.randn(1, ch, size, size, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros_like(noise)
    pos, neg = fm.conditioning(family, tiny, 1, dev, size * 8, size * 8)
    res = {
        "family": family,
        "params_M": round(params / 1e6, 1),
        "steps": steps,
        "cfg": cfg,
        "build_s": round(time.perf_counter() - t0, 1),
    }

    def sampler(model, n=steps):
        return lambda: comfy.sample.sample(
            model, noise, n, cfg, "euler", "normal", pos, neg, latent, seed=0, disable_pbar=True
        )

    def measure(cases: dict) -> dict:
        """Warm every case once, then time them round-robin so clock/thermal drift hits all alike."""
        cuda = torch.cuda.is_available()
        outs, times, peaks = {}, {n: [] for n in cases}, {}
        cases = {n: (m if isinstance(m, tuple) else (m, steps)) for n, m in cases.items()}
        for name, (model, n) in cases.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated() if cuda else 0
            outs[name] = sampler(model, n)()
            _sync()
            peaks[name] = (torch.cuda.max_memory_allocated() - base_mem) if cuda else 0
        for _ in range(repeats):
            for name, (model, n) in cases.items():
                _sync()
                t0 = time.perf_counter()
                sampler(model, n)()
                _sync()
                times[name].append(time.perf_counter() - t0)
        for name in cases:
            med = statistics.median(times[name])
            res[name] = {
                "median_s": round(med, 4),
                "min_s": round(min(times[name]), 4),
                "times": [round(t, 4) for t in times[name]],
                "peak_extra_MiB": round(peaks[name] / 2**20, 1),
            }
            logger.info("%s %s: %.3f s (peak +%.0f MiB)", family, name, med, peaks[name] / 2**20)
        # Paired per round (the cases of one round run back to back): host noise that lasts longer
        # than a round slows all of its cases alike, so the per-round ratio is steadier than a
        # ratio of medians on a shared machine.
        base = next((n for n in cases if n.endswith("unpatched") and cases[n][1] == steps), None)
        if base is not None:
            for name, (_, n) in cases.items():
                if name != base and n == steps:
                    ratios = [b / t for b, t in zip(times[base], times[name], strict=True)]
                    res[name]["paired_speedup_median"] = round(statistics.median(ratios), 4)
                    res[name]["paired_speedups"] = [round(r, 4) for r in ratios]
        return outs

    def patched(pattern, mode="tail", base=mp, hit_residual="reuse"):
        holder = fbc.FBCacheHolder(0.5, 0.0, 1.0, -1, mode, force_pattern=pattern, hit_residual=hit_residual)
        return adapter.apply_first_block_cache(base, holder)

    if compile_only:
        return _compile_case(res, mp, patched, measure, sampler)
    if diagnose_sync:
        # Same hooks, every call computed, but the decision never waits for the GPU: the difference
        # to "fbcache_all_computed" is what the one host sync per call costs on this host.
        nosync = adapter.apply_first_block_cache(mp, _no_sync_holder(fbc)(0.5))
        cases = {"unpatched": mp, "fbcache_all_computed": patched([False]), "fbcache_all_computed_nosync": nosync}
        # ComfyUI's EasyCache with threshold 0 never skips but reads its change rates with .item() every step
        cases["easycache_all_computed"] = fm.easycache_patcher(mp, ch, 0.0)
        measure(cases)
        res["summary"] = {
            f"{stat}_{name}_pct": round(100 * (res[name][f"{stat}_s"] / res["unpatched"][f"{stat}_s"] - 1), 2)
            for stat in ("median", "min")
            for name in list(cases)[1:]
        }
        return res
    cases = {
        "unpatched": mp,
        "fbcache_all_computed": patched([False]),
        "fbcache_50pct_tail": patched([False, True]),
        "fbcache_50pct_tail_extrapolate": patched([False, True], hit_residual="extrapolate"),
        "fbcache_all_hits_tail": patched([False] + [True] * (steps - 1)),
        # Twice the steps: differences cancel the run's fixed cost (conditioning setup etc.).
        "unpatched_2x_steps": (mp, 2 * steps),
        "fbcache_all_hits_tail_2x_steps": (patched([False] + [True] * (2 * steps - 1)), 2 * steps),
    }
    # The same default setting with the conditioning left where ComfyUI keeps it (the CPU): what
    # fbcache/conditioning.py's one copy per run saves on hit steps.
    host_conds = patched([False, True], hit_residual="extrapolate")
    host_conds.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, adapter.WRAPPER_KEY)
    cases["fbcache_50pct_tail_extrapolate_host_conds"] = host_conds
    if per_block and family != "sdxl":
        cases["fbcache_50pct_per_block"] = patched([False, True], "per_block")
    outs = measure(cases)
    res["all_computed_bit_identical"] = bool(torch.equal(outs["unpatched"], outs["fbcache_all_computed"]))

    full_step = res["fbcache_all_computed"]["median_s"] / steps
    base_step = res["unpatched"]["median_s"] / steps
    hit_step = (res["fbcache_all_hits_tail"]["median_s"] - full_step) / (steps - 1)
    step_full = (res["unpatched_2x_steps"]["median_s"] - res["unpatched"]["median_s"]) / steps
    step_hit = (res["fbcache_all_hits_tail_2x_steps"]["median_s"] - res["fbcache_all_hits_tail"]["median_s"]) / steps
    res["summary"] = {
        # per-step costs from runs of n and 2n steps: the sampler's fixed per-run cost cancels
        "full_step_ms": round(step_full * 1e3, 2),
        "hit_step_ms": round(step_hit * 1e3, 2),
        "hit_step_fraction_of_full": round(step_hit / step_full, 4),
        "run_fixed_cost_ms": round((res["unpatched"]["median_s"] - steps * step_full) * 1e3, 1),
        "speedup_50pct_tail": round(res["unpatched"]["median_s"] / res["fbcache_50pct_tail"]["median_s"], 3),
        "speedup_50pct_tail_extrapolate": round(
            res["unpatched"]["median_s"] / res["fbcache_50pct_tail_extrapolate"]["median_s"], 3
        ),
        # the older estimate: charges the whole run's fixed cost to the n-1 hit steps
        "hit_step_fraction_incl_run_cost": round(hit_step / base_step, 4),
        "overhead_computed_steps_pct": round(100 * (full_step / base_step - 1), 2),
        # fastest run of each case: robust where host noise (other tenants, CPU clocks) only adds time
        "paired_speedup_50pct_tail": res["fbcache_50pct_tail"].get("paired_speedup_median"),
        "paired_speedup_50pct_tail_extrapolate": res["fbcache_50pct_tail_extrapolate"].get("paired_speedup_median"),
        "paired_overhead_computed_steps_pct": round(
            100 * (1 / res["fbcache_all_computed"]["paired_speedup_median"] - 1), 2
        ),
        "speedup_50pct_tail_min": round(res["unpatched"]["min_s"] / res["fbcache_50pct_tail"]["min_s"], 3),
        "overhead_computed_steps_pct_min": round(
            100 * (res["fbcache_all_computed"]["min_s"] / res["unpatched"]["min_s"] - 1), 2
        ),
        "speedup_50pct_tail_extrapolate_host_conds": round(
            res["unpatched"]["median_s"] / res["fbcache_50pct_tail_extrapolate_host_conds"]["median_s"], 3
        ),
        "paired_speedup_50pct_tail_extrapolate_host_conds": res["fbcache_50pct_tail_extrapolate_host_conds"].get(
            "paired_speedup_median"
        ),
        "extra_peak_MiB_50pct_tail": round(
            res["fbcache_50pct_tail"]["peak_extra_MiB"] - res["unpatched"]["peak_extra_MiB"], 1
        ),
        "extra_peak_MiB_50pct_tail_extrapolate": round(
            res["fbcache_50pct_tail_extrapolate"]["peak_extra_MiB"] - res["unpatched"]["peak_extra_MiB"], 1
        ),
    }
    if "fbcache_50pct_per_block" in res:
        res["summary"]["speedup_50pct_per_block"] = round(
            res["unpatched"]["median_s"] / res["fbcache_50pct_per_block"]["median_s"], 3
        )
        res["summary"]["extra_peak_MiB_50pct_per_block"] = round(
            res["fbcache_50pct_per_block"]["peak_extra_MiB"] - res["unpatched"]["peak_extra_MiB"], 1
        )

    # Decision cost alone: rel-L1 + one sync on a residual of the real first-block shape.
    holder = fbc.FBCacheHolder(0.1)
    holder.active = True
    shape = (2, 320, 128, 128) if family == "sdxl" else (1, 4096, 3072)
    if tiny:
        shape = (2, 32, 16, 16)
    r = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    holder.begin_call({"cond_or_uncond": [0, 1] if shape[0] == 2 else [0], "sigmas": torch.ones(shape[0], device=dev)})
    holder.decide(r)
    _sync()
    t0 = time.perf_counter()
    for _ in range(50):
        holder.begin_call(
            {"cond_or_uncond": [0, 1] if shape[0] == 2 else [0], "sigmas": torch.ones(shape[0], device=dev)}
        )
        holder._complete.clear()
        holder.decide(r)
    _sync()
    res["summary"]["decision_ms"] = round((time.perf_counter() - t0) / 50 * 1e3, 3)

    if profile_hits:
        _profile_hits(res, mp, patched, sampler, steps, profile_hits)
    if compile_too:
        _compile_case(res, mp, patched, measure, sampler)
    del mp
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def _no_sync_holder(fbc):
    """A holder class whose decision is always "compute" without reading anything from the GPU."""
    from speedkit.fbcache.holder import KeyStats

    class NoSyncHolder(fbc.FBCacheHolder):
        def decide(self, residual: torch.Tensor) -> bool:
            call = self.call if self.call is not None else self.begin_call({})
            call.hit = False
            for key in call.keys or ("all",):
                self.stats.setdefault(key, KeyStats()).computed += 1
            return False

    return NoSyncHolder


def _profile_hits(res, mp, patched, sampler, steps: int, trace_dir: Path) -> dict:
    """Where a hit step's time goes: GPU busy time vs wall time of an unpatched, an all-hits and an
    alternating (50 %) run (torch.profiler), the top host-side ops, and a Chrome trace per run."""
    from torch.profiler import ProfilerActivity, profile

    trace_dir.mkdir(parents=True, exist_ok=True)
    runs = {
        "unpatched": mp,
        "all_hits_tail": patched([False] + [True] * (steps - 1)),
        # alternating computed/hit: where the extra time per pair (vs a full plus a hit step) goes
        "50pct_tail": patched([False, True]),
    }
    for name, model in runs.items():
        sampler(model)()  # warm
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            sampler(model)()
            _sync()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        res[f"profile_{name}"] = {
            "wall_ms": round(wall * 1e3, 2),
            "gpu_busy_ms": round(gpu_us / 1e3, 2),
            "gpu_idle_ms": round(wall * 1e3 - gpu_us / 1e3, 2),
            "steps": steps,
        }
        logger.info("profile %s: %s", name, res[f"profile_{name}"])
        logger.info(
            "top ops by device time:\n%s",
            events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60),
        )
        logger.info(
            "top ops by host time:\n%s",
            events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60),
        )
        prof.export_chrome_trace(str(trace_dir / f"{res['family']}_{name}.json"))
    # The same runs over a few steps with Python stacks: which host code the GPU waits on.
    from gpu_gaps import gpu_gaps

    for name in ("unpatched", "50pct_tail"):
        model = runs[name]
        short = min(steps, 8)
        sampler(model, short)()
        _sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            sampler(model, short)()
            _sync()
        path = trace_dir / f"{res['family']}_{name}_stacks.json"
        prof.export_chrome_trace(str(path))
        gaps = gpu_gaps(path)
        gaps["steps"] = short
        res[f"gaps_{name}"] = gaps
        logger.info(
            "GPU idle by host stack, %s (%d steps, Python stacks on):\n%s", name, short, json.dumps(gaps, indent=1)
        )
    un, hits = res["profile_unpatched"], res["profile_all_hits_tail"]
    gpu_hit = (hits["gpu_busy_ms"] - un["gpu_busy_ms"] / steps) / (steps - 1)
    res.setdefault("summary", {})["hit_step_gpu_ms"] = round(gpu_hit, 2)
    half = res["profile_50pct_tail"]
    res["summary"]["gpu_idle_ms_per_step_unpatched"] = round(un["gpu_idle_ms"] / steps, 2)
    res["summary"]["gpu_idle_ms_per_step_all_hits"] = round(hits["gpu_idle_ms"] / steps, 2)
    res["summary"]["gpu_idle_ms_per_computed_hit_pair"] = round(half["gpu_idle_ms"] / max(steps // 2, 1), 2)
    if un["gpu_busy_ms"] > 0:  # 0 on a CPU run
        res["summary"]["hit_step_gpu_fraction_of_full"] = round(gpu_hit / (un["gpu_busy_ms"] / steps), 4)
    return res


def _compile_case(res, mp, patched, measure, sampler) -> dict:
    """torch.compile with FBCache, two ways.

    1. ComfyUI's TorchCompileModel helper (inductor on the whole diffusion model): the cache's
       data-dependent branch runs inside the compiled region.
    2. ``nn.Module.compile()`` on every ResBlock / SpatialTransformer (class kept, so the UNet's
       own dispatch still works): the heavy layers compiled, the block loop and the cache eager.
    """
    import torch._dynamo.utils as dynamo_utils

    def stats():
        return {k: dict(v) for k, v in dynamo_utils.counters.items() if k in ("stats", "graph_break", "recompiles")}

    try:
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        cm = mp.clone()
        set_torch_compile_wrapper(cm, backend="inductor")
        t0 = time.perf_counter()
        sampler(cm)()
        res["whole_compile_warmup_s"] = round(time.perf_counter() - t0, 1)
        cp = patched([False, True], base=cm)
        t0 = time.perf_counter()
        sampler(cp)()
        res["whole_compile_fbcache_first_run_s"] = round(time.perf_counter() - t0, 1)
        measure({"whole_compiled_unpatched": cm, "whole_compiled_fbcache_50pct_tail": cp})
        res.setdefault("summary", {})["whole_compiled_speedup_50pct_tail"] = round(
            res["whole_compiled_unpatched"]["median_s"] / res["whole_compiled_fbcache_50pct_tail"]["median_s"], 3
        )
        res["whole_compile_dynamo"] = stats()
    except Exception as exc:  # report why compile did not work instead of failing the whole profile
        logger.exception("whole-model torch.compile case failed")
        res["whole_compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    try:
        dm = mp.model.diffusion_model
        layers = [m for m in dm.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]
        for m in layers:
            m.compile()
        t0 = time.perf_counter()
        sampler(mp)()
        res["layer_compile_warmup_s"] = round(time.perf_counter() - t0, 1)
        cp = patched([False, True])
        sampler(cp)()
        measure({"layer_compiled_unpatched": mp, "layer_compiled_fbcache_50pct_tail": cp})
        res.setdefault("summary", {})["layer_compiled_speedup_50pct_tail"] = round(
            res["layer_compiled_unpatched"]["median_s"] / res["layer_compiled_fbcache_50pct_tail"]["median_s"], 3
        )
        res["layer_compiled_count"] = len(layers)
        res["layer_compile_dynamo"] = stats()
    except Exception as exc:
        logger.exception("per-layer torch.compile case failed")
        res["layer_compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--families", default="sdxl,flux")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sdxl-steps", type=int, default=20)
    ap.add_argument(
        "--flux-steps", type=int, default=20, help="20 = ComfyUI's Flux dev example workflow (session 2 used 10)"
    )
    ap.add_argument("--compile", default="sdxl", help="comma list of families to also run with torch.compile")
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test of the script)")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile cases")
    ap.add_argument(
        "--diagnose-sync",
        action="store_true",
        help="only unpatched / all computed / all computed without the decision's host sync",
    )
    ap.add_argument(
        "--profile-hits",
        type=Path,
        default=None,
        help="also profile an all-hits run (GPU busy time per hit step); traces go here",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fbcache_models as fm

    fm.prepare_comfy()
    fbc, adapter = fm.import_pack()
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device_name, "torch": torch.__version__}
    plan = {"sdxl": (args.sdxl_steps, 7.0), "flux": (args.flux_steps, 1.0)}
    for family in args.families.split(","):
        steps, cfg = plan[family]
        results[family] = profile(
            family,
            steps,
            cfg,
            args.repeats,
            fbc,
            adapter,
            family in args.compile.split(","),
            per_block=True,
            tiny=args.tiny,
            compile_only=args.compile_only,
            profile_hits=args.profile_hits,
            diagnose_sync=args.diagnose_sync,
        )
        args.out.write_text(json.dumps(results, indent=1))
        logger.info("%s summary: %s", family, results[family].get("summary"))
    logger.info(
        "%s", json.dumps({k: v.get("summary", v) if isinstance(v, dict) else v for k, v in results.items()}, indent=1)
    )


if __name__ == "__main__":
    main()
