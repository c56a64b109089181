"""Benchmark: First Block Cache as users get it, in a live ComfyUI server (GPU).

One headless ComfyUI (``COMFYUI_ROOT``; its own defaults unless ``--server-args`` says
otherwise) with the pack and the test probe nodes. Models with random weights and real shapes,
built once into ``--assets``:

- ``sdxl``: a full-size SDXL checkpoint (CheckpointLoaderSimple, CLIPTextEncode), 1024x1024,
  CFG 5 (cond and uncond in one batch);
- ``flux``: a Flux.1-dev-size diffusion model (19 double + 38 single blocks; UNETLoader) with
  random text embeddings (256 x 4096, pooled 768, guidance 3.5), 1024x1024, CFG 1;
- ``wan``: a Wan 2.1 14B text-to-video-size diffusion model (40 blocks, dim 5120) with random
  text embeddings (512 x 4096), 832x480, 33 frames, CFG 5.

Each family is sampled with KSampler (euler, normal, ``--steps``): unpatched, and through
``SpeedKit_FirstBlockCache`` with forced hit patterns (probe node ``SpeedKitProbe_FBCachePattern``;
random weights have no meaningful dynamics, so a share of skipped steps is forced rather than
found): every step computed (the cache's cost on computed steps), every other step skipped, the
pattern a speed-target plan chose on the trained toy of ``benchmarks/fbcache_quality.py``
(``--toy-results``: the UNet's plan for SDXL, the DiT's for Flux and Wan), and every step after
the first skipped (the cost of a skipped step). Time comes from the server's
``execution_start`` -> ``execution_success`` stamps, the first run of each case reported apart,
then the median of ``--repeats`` runs (interleaved: one run of every case per round).
``--batch`` sets the empty-latent node's batch size (a batch spreads the prompt's fixed part over
more images). ``--waiting`` adds each pattern with every decision waiting for the GPU (the node's
``decide_ahead`` off); ``--whole-step`` adds each with ``skip_whole_step`` (a skipped step runs
no block: predicted ``steps / computed``). The prediction a speedup is compared with counts FLOPs
(``torch.utils.flop_counter``: matmuls, convolutions, attention) of one computed and one skipped
model call of the same architecture and size, loaded from the same file in this process:
``steps / (computed + skipped * hit_fraction)``. That predicts the sampling steps; a prompt also
spends time outside them that no cache shortens, measured by an unpatched one-step prompt timed
beside the others (``fixed_s``: its time less one step, one step being the full run's time less its
own over ``steps - 1``), and ``predicted_wall_speedup`` is the prediction for the whole prompt:
``base / (fixed + (base - fixed) / predicted)``.

Usage (from the pack folder, on a CUDA machine with ComfyUI's requirements installed)::

    COMFYUI_ROOT=/path/to/ComfyUI python benchmarks/server_fbcache_bench.py --assets /tmp/fbc_assets \\
        --families sdxl,flux,wan --out fbcache_server.json

The model files take about 5 GB (SDXL), 24 GB (Flux) and 28 GB (Wan) in ``--assets``; on a small
disk run one family per call and delete its file after. ``--tiny`` runs the same cases on small
models on the CPU (a check of the script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_env import register_pack, run_header, server_with_assets

REPO = register_pack()
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "gpu_server"), str(REPO / "benchmarks")]

from server_cases import PROBE_NODES  # noqa: E402
from tiny_models import build_dit, build_models, build_sdxl  # noqa: E402

from comfy_server import ComfyServer, execution_seconds, free_port, widget_inputs  # noqa: E402

log = logging.getLogger("server_fbcache_bench")

ONE_STEP = "unpatched_one_step"
"""An unpatched prompt of one sampling step: with the full run it splits a prompt's time into
the sampling steps and the rest (loading, conditioning, noise, sampler set-up, the latent's way
back), which no cache shortens."""

FAMILIES: dict[str, dict] = {
    "sdxl": {
        "file": "sdxl_random.safetensors",
        "latent": ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "cfg": 5.0,
        "toy": "unet",
    },
    "flux": {
        "file": "flux_random.safetensors",
        "cond": {"tokens": 256, "dim": 4096, "pooled_dim": 768, "guidance": 3.5},
        "latent": ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
        "cfg": 1.0,
        "toy": "dit",
    },
    "wan": {
        "file": "wan21_14b_random.safetensors",
        "cond": {"tokens": 512, "dim": 4096, "pooled_dim": 0, "guidance": -1.0},
        "latent": ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        "cfg": 5.0,
        "toy": "dit",
    },
}
TINY = {
    "sdxl": {"file": "tiny_sd15.safetensors", "latent": ("EmptyLatentImage", {"width": 64, "height": 64})},
    "flux": {"file": "flux_tiny.safetensors", "latent": ("EmptySD3LatentImage", {"width": 64, "height": 64})},
    "wan": {
        "file": "wan_tiny.safetensors",
        "latent": ("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 5, "batch_size": 1}),
    },
}


def family_spec(family: str, tiny: bool) -> dict:
    spec = dict(FAMILIES[family])
    if tiny:
        spec.update(TINY[family])
        if "cond" in spec:
            spec["cond"] = {**spec["cond"], "tokens": 16}
    return spec


def toy_pattern(results: Path | None, kind: str, target: float, steps: int) -> str | None:
    """The hit pattern ('1' = skipped step) of the toy's speed-target plan (euler), or None."""
    if results is None or not results.is_file():
        return None
    rows = json.loads(results.read_text()).get(kind, {}).get("rows", [])
    for r in rows:
        if r["method"] == "fbc_target" and r["sampler"] == "euler" and r["setting"] == target and r.get("plan"):
            computed = {round(p) for p in r["plan"]}
            if r["base_calls"] != steps:
                return None
            return "".join("0" if s in computed else "1" for s in range(steps))
    return None


def patterns(steps: int, toy: str | None) -> dict[str, str]:
    out = {"computed": "0", "half": "01", "all_hits": "0" + "1" * (steps - 1)}
    if toy:
        out["toy_plan"] = toy
    return out


def graph(family: str, spec: dict, steps: int, seed: int, pattern: str | None, info: dict, fbc: dict, **probe) -> dict:
    """An API prompt: load, condition, (patch), sample, sink."""
    g: dict = {}
    if family == "sdxl":
        g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": spec["file"]}}
        g["2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a detailed photo"}}
        g["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}}
    else:
        g["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": spec["file"], "weight_dtype": "default"}}
        g["2"] = {"class_type": "SpeedKitProbe_RandomConditioning", "inputs": {**spec["cond"], "seed": 1}}
        g["3"] = {"class_type": "SpeedKitProbe_RandomConditioning", "inputs": {**spec["cond"], "seed": 2}}
    latent_node, latent_inputs = spec["latent"]
    g["4"] = {"class_type": latent_node, "inputs": {"batch_size": 1, **latent_inputs}}
    model = ["1", 0]
    if pattern is not None:
        g["5"] = {
            "class_type": "SpeedKit_FirstBlockCache",
            "inputs": widget_inputs(info, "SpeedKit_FirstBlockCache", model=model, **fbc),
        }
        g["6"] = {
            "class_type": "SpeedKitProbe_FBCachePattern",
            "inputs": {"model": ["5", 0], "pattern": pattern, **probe},
        }
        model = ["6", 0]
    g["7"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": spec["cfg"], "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        },
    }  # fmt: skip
    g["8"] = {"class_type": "SpeedKitProbe_LatentSink", "inputs": {"samples": ["7", 0]}}
    return g


def hit_fraction(root: Path, family: str, spec: dict, model_path: Path, pattern_cls, adapter) -> float:
    """FLOPs of a skipped model call over a computed one (this architecture and size, first block
    and in/out layers run on a skip), counted on two short sampling runs of the same model file."""
    import comfy.sample
    import comfy.sd
    from torch.utils.flop_counter import FlopCounterMode

    if family == "sdxl":
        patcher = comfy.sd.load_checkpoint_guess_config(str(model_path), output_vae=False, output_clip=False)[0]
        gen = torch.Generator().manual_seed(0)
        ctx, pooled, tokens = (2048, 1280, 77) if "sdxl" in spec["file"] else (768, 0, 77)
        w, h = spec["latent"][1]["width"], spec["latent"][1]["height"]

        def cond() -> list:
            extra = {"width": w, "height": h, "target_width": w, "target_height": h}
            if pooled:
                extra["pooled_output"] = torch.randn(1, pooled, generator=gen)
            return [[torch.randn(1, tokens, ctx, generator=gen), extra]]
    else:
        patcher = comfy.sd.load_diffusion_model(str(model_path))
        gen = torch.Generator().manual_seed(0)
        c = spec["cond"]

        def cond() -> list:
            extra: dict = {}
            if c["pooled_dim"]:
                extra["pooled_output"] = torch.randn(1, c["pooled_dim"], generator=gen)
            if c["guidance"] >= 0:
                extra["guidance"] = c["guidance"]
            return [[torch.randn(1, c["tokens"], c["dim"], generator=gen), extra]]

    latent = latent_shape(family, spec)
    z = torch.zeros(latent)
    positive, negative = cond(), cond()

    def flops(mp) -> float:
        with FlopCounterMode(display=False) as fc:
            comfy.sample.sample(
                mp, z, 2, spec["cfg"], "euler", "normal", positive, negative, z, seed=0, disable_pbar=True
            )
        return fc.get_total_flops()

    full = flops(adapter.apply_first_block_cache(patcher, pattern_cls(0.5, force_pattern=[False])))
    mixed = flops(
        adapter.apply_first_block_cache(patcher, pattern_cls(0.5, force_pattern=[False, True], max_consecutive_hits=-1))
    )
    return (mixed - full / 2) / (full / 2)


def latent_shape(family: str, spec: dict) -> tuple[int, ...]:
    node, inputs = spec["latent"]
    w, h = inputs["width"] // 8, inputs["height"] // 8
    if node == "EmptyLatentImage":
        return (1, 4, h, w)
    if node == "EmptySD3LatentImage":
        return (1, 16, h, w)
    return (1, 16, (inputs["length"] - 1) // 4 + 1, h, w)


def run_family(server: ComfyServer, family: str, spec: dict, args, toy: str | None) -> dict:
    info = server.object_info()
    fbc = {"max_consecutive_hits": -1, "hit_residual": args.hit_residual, "min_steps": 0}
    res: dict = {
        "family": family,
        "steps": args.steps,
        "batch": spec["latent"][1].get("batch_size", 1),
        "latent": list(latent_shape(family, spec)),  # of one image of the batch
        "cases": {},
    }
    cases: dict[str, tuple[str | None, dict]] = {"unpatched": (None, {}), ONE_STEP: (None, {})}
    for name, pattern in patterns(args.steps, toy).items():
        if args.cases and name not in args.cases.split(","):
            continue
        cases[name] = (pattern, {})
        if args.waiting:
            cases[f"{name}_waiting"] = (pattern, {"decide_ahead": False})
        if args.whole_step and "1" in pattern:
            cases[f"{name}_whole"] = (pattern, {"skip_whole_step": True})

    def timed(name: str, pattern: str | None, probe: dict, seed: int) -> float:
        steps = 1 if name == ONE_STEP else args.steps
        return execution_seconds(server.run_prompt(graph(family, spec, steps, seed, pattern, info, fbc, **probe), 7200))

    # first runs apart, then the repeats interleaved (case after case in each round), so a drift of
    # the machine over the minutes of a family spreads over every case instead of favouring one
    firsts = {name: timed(name, pattern, probe, 0) for name, (pattern, probe) in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.repeats):
        for name, (pattern, probe) in cases.items():
            times[name].append(timed(name, pattern, probe, 1 + r))
    for name, (pattern, probe) in cases.items():
        entry = {
            "first_s": round(firsts[name], 3),
            "runs_s": [round(t, 3) for t in times[name]],
            "median_s": statistics.median(times[name]),
        }
        if pattern is not None:
            full_pattern = (pattern * args.steps)[: args.steps]
            entry["pattern"] = full_pattern
            entry["skipped"] = full_pattern.count("1")
            entry["whole_step"] = bool(probe.get("skip_whole_step"))
        res["cases"][name] = entry
        log.info("%s %s: first %.2f s, median %.2f s", family, name, firsts[name], entry["median_s"])
    if args.sync_debug:
        pattern = toy or "01"
        server.run_prompt(graph(family, spec, args.steps, 99, pattern, info, fbc, sync_debug=True), 7200)
        log.info("%s: one run of pattern %s with CUDA sync debug 'warn' (see the server log)", family, pattern)
    if args.profile:
        runs = [(f"{family}_one_step_computed", 1, "0", {})]  # the prompt's fixed part, through the node
        for name in ("all_hits", "toy_plan", "all_hits_whole", "toy_plan_whole"):
            if name not in cases:
                continue
            pattern, probe = cases[name]
            ways = (True,) if probe.get("skip_whole_step") else (True, False)  # whole steps always decide ahead
            for ahead in ways:
                label = f"{family}_{name}_{'ahead' if ahead else 'waiting'}"
                runs.append((label, args.steps, pattern, {**probe, "decide_ahead": ahead}))
        for label, steps, pattern, probe in runs:
            server.run_prompt(graph(family, spec, steps, 98, pattern, info, fbc, profile_name=label, **probe), 7200)
            made = server.output_dir / "probe" / f"{label}.txt"
            if args.out and made.is_file():
                shutil.copy(made, args.out.parent / made.name)
            res.setdefault("profiles", []).append(made.name)
    base = res["cases"]["unpatched"]["median_s"]
    one = res["cases"].pop(ONE_STEP)
    step = (base - one["median_s"]) / max(args.steps - 1, 1)
    res["unpatched_one_step_s"] = one
    res["step_s"] = round(step, 4)
    fixed = max(one["median_s"] - step, 0.0)
    res["fixed_s"] = round(fixed, 4)
    for entry in res["cases"].values():
        entry["speedup"] = round(base / entry["median_s"], 3)
    price_skips(res, args.steps, one["median_s"], step, fixed)
    return res


def price_skips(res: dict, steps: int, one_step_s: float, step_s: float, fixed_s: float) -> None:
    """What a skipped step costs in the server, from the all-hits prompts: ``(all_hits - one-step
    prompt) / (steps - 1)`` per mode (``skip_s``); then each case's speedup predicted from the
    measured parts, ``base / (fixed + computed * step + skipped * skip)`` (``priced_speedup``,
    ``vs_priced``). Unlike the FLOP count this prices the server's per-step work that a skip
    still does (the sampler's update, conditioning, CFG, progress messages)."""
    cases = res["cases"]
    prices = {
        whole: (cases[name]["median_s"] - one_step_s) / max(steps - 1, 1)
        for name, whole in (("all_hits", False), ("all_hits_whole", True))
        if name in cases
    }
    if not prices:
        return
    res["skip_s"] = {("whole_step" if whole else "first_block"): round(v, 5) for whole, v in prices.items()}
    base = cases["unpatched"]["median_s"]
    for entry in cases.values():
        skipped, whole = entry.get("skipped", 0), bool(entry.get("whole_step"))
        if "pattern" not in entry or whole not in prices:
            continue
        priced = base / (fixed_s + (steps - skipped) * step_s + skipped * prices[whole])
        entry["priced_speedup"] = round(priced, 3)
        entry["vs_priced"] = round(entry["speedup"] / priced, 3)


def wall_prediction(base_s: float, fixed_s: float, predicted: float) -> float:
    """The whole prompt's speedup when its sampling steps speed up by ``predicted`` (the FLOP count)
    and the rest of the prompt, ``fixed_s`` (measured unpatched: one 1-step prompt), does not:
    ``base / (fixed + (base - fixed) / predicted)``."""
    return base_s / (fixed_s + (base_s - fixed_s) / predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=Path(tempfile.gettempdir()) / "speedkit_fbcache_assets")
    parser.add_argument("--families", default="sdxl,flux,wan")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="images per prompt (the empty-latent node's batch_size)")
    parser.add_argument("--hit-residual", default="taylor1")
    parser.add_argument("--toy-results", type=Path, default=REPO / "benchmarks" / "fbcache_results_cpu.json")
    parser.add_argument("--toy-target", type=float, default=3.0, help="the toy speed target whose plan is replayed")
    parser.add_argument("--server-args", default="", help="extra ComfyUI arguments, e.g. --disable-dynamic-vram")
    parser.add_argument("--tiny", action="store_true", help="small models on the CPU: checks the script only")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-count prediction")
    parser.add_argument(
        "--cases", default="", help="only these patterns (comma list of computed, half, toy_plan, all_hits)"
    )
    parser.add_argument(
        "--waiting",
        action="store_true",
        help="also run each skipping pattern with every decision waiting for the GPU (what deciding ahead gains)",
    )
    parser.add_argument(
        "--whole-step",
        action="store_true",
        help="also run each skipping pattern with skip_whole_step (a skipped step runs no block)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="under cProfile: one more run of all_hits and toy_plan each way (whole steps too with "
        "--whole-step), and a one-step prompt through the node (the prompt's fixed part)",
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="one more run per family with CUDA sync debug 'warn': each place the host waits for the GPU is logged",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(os.environ["COMFYUI_ROOT"])
    ckpts, unets = args.assets / "checkpoints", args.assets / "diffusion_models"
    specs = {f: family_spec(f, args.tiny) for f in args.families.split(",")}
    for spec in specs.values():  # the latent node's batch: ComfyUI samples it as one batch
        node, inputs = spec["latent"]
        spec["latent"] = (node, {**inputs, "batch_size": args.batch})
    for family, spec in specs.items():
        if family == "sdxl":
            if args.tiny:
                build_models(root, ckpts / spec["file"], args.assets / "upscale_models" / "unused_x2.safetensors")
            else:
                build_sdxl(root, ckpts / spec["file"])
        else:
            build_dit(root, family, unets / spec["file"], tiny=args.tiny)
    work = Path(tempfile.mkdtemp(prefix="fbcache_bench_"))
    server = server_with_assets(
        ComfyServer,
        root,
        work / "server",
        args.assets,
        ("checkpoints", "diffusion_models"),
        free_port(),
        cpu=args.tiny,
        extra_args=tuple(args.server_args.split()),
        extra_nodes=(PROBE_NODES,),
    )
    results = run_header(args.server_args, tiny=args.tiny, families={})
    server.start()
    try:
        for family, spec in specs.items():
            toy = toy_pattern(args.toy_results, spec["toy"], args.toy_target, args.steps)
            try:
                results["families"][family] = run_family(server, family, spec, args, toy)
            except Exception as exc:  # noqa: BLE001 - one family failing must not hide the others
                log.exception("family %s failed", family)
                results["families"][family] = {"error": repr(exc)[:2000]}
            log.info("results so far:\n%s", json.dumps(results, indent=1, default=str))
    finally:
        results["server_alive"] = server.alive()
        server.stop()
        tail = server.log_text()[-8000:]
        results["log_fatal"] = [k for k in ("Fatal Python error", "terminate called") if k in tail]
    if not args.no_flops:
        predict(results, specs, args, root, ckpts, unets)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
        args.out.with_suffix(".log").write_text(server.log_text()[-200000:])
    log.info("results:\n%s", json.dumps(results, indent=1, default=str))


def predict(results: dict, specs: dict, args, root: Path, ckpts: Path, unets: Path) -> None:
    """Add each case's FLOP-count prediction (after the server stopped: its memory is free again)."""
    sys.path.insert(0, str(root))
    import fbcache_models as fm

    fm.prepare_comfy()
    fbc, adapter = fm.import_pack()
    for family, spec in specs.items():
        res = results["families"].get(family, {})
        if "cases" not in res:
            continue
        path = (ckpts if family == "sdxl" else unets) / spec["file"]
        try:
            fraction = hit_fraction(root, family, spec, path, fbc.FBCacheHolder, adapter)
        except Exception as exc:  # noqa: BLE001 - reported, the timings stand without it
            log.exception("FLOP count of %s failed", family)
            res["flops_error"] = repr(exc)[:2000]
            continue
        res["hit_flops_fraction"] = round(fraction, 4)
        for entry in res["cases"].values():
            skipped = entry.get("skipped", 0)
            cost = 0.0 if entry.get("whole_step") else fraction  # a whole-step skip runs no block
            predicted = args.steps / (args.steps - skipped + skipped * cost)
            entry["predicted_speedup"] = round(predicted, 3)
            entry["vs_prediction"] = round(entry["speedup"] / predicted, 3)
            if "fixed_s" in res:
                wall = wall_prediction(res["cases"]["unpatched"]["median_s"], res["fixed_s"], predicted)
                entry["predicted_wall_speedup"] = round(wall, 3)
                entry["vs_wall_prediction"] = round(entry["speedup"] / wall, 3)


if __name__ == "__main__":
    main()
