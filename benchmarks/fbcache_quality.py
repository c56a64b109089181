"""Quality vs speed of First Block Cache against EasyCache, MagCache and TaylorSeer on trained toy models (CPU).

1. Trains (or loads) the two toys of ``fbcache_toys.py``: a UNet with SDXL's block structure
   (eps, SDXL schedule) and a Wan 2.1 DiT (flow matching), a fixed number of steps each.
2. Samples a fixed batch of (condition, seed) pairs through ComfyUI's KSampler code
   (``comfy.sample.sample``), CFG 5: uncached, with our cache in each mode (reuse, extrapolate,
   Taylor orders 1-2, first/last-n-blocks variants) at several thresholds, with speed targets
   (each plans its skipped steps on a calibration run of other images), with
   ComfyUI's native EasyCache, with the re-implemented MagCache and TaylorSeer rules of
   ``fbcache_baselines.py``, and uncached with fewer steps (``fewer_steps``: the same sampler and
   scheduler, 15 to 8 steps), all on the same runs. Diagnostics: ``fbc_cross_plan`` (each
   whole-step forecast on the other's plan), ``fbc_plan_search`` (plans searched by real runs on
   the calibration images), ``more_steps`` (the 30-step reference against 60 steps),
   ``skip_sensitivity`` (one skipped step at each position against two estimates of its cost,
   ``fbcache_sensitivity.py``), ``fbc_space`` (the flow toy's whole-step plans with the velocity
   forecast the node uses and with forecasts of the noise prediction and of the denoised latent). A
   ``sampler:scheduler`` other than the model's default pairing gets its own panel, and so does
   each CFG scale other than 5 (``--cfg 1,3``: panels ``sampler@cfg1``, ``sampler@cfg3``).
3. Reports PSNR and SSIM against the uncached output, in the model's own latent space (the
   training data lie in [-1, 1], the PSNR's peak-to-peak range is 2), and the speedup by FLOPs:
   uncached FLOPs / the run's FLOPs, where a computed call counts the FLOPs of a full model call
   and a cache hit the FLOPs of the blocks it ran (its first/last blocks, input and output
   layers), each measured once per layout with ``torch.utils.flop_counter`` (matmuls,
   convolutions, attention; elementwise work such as the forecast is not counted). A call that
   EasyCache, MagCache or TaylorSeer skip runs no block and costs 0.

Run: ``PYTHONPATH=$COMFYUI_ROOT:. python benchmarks/fbcache_quality.py --out quality.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("fbcache_quality")

THRESHOLDS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25)
EASYCACHE_THRESHOLDS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5)
MAGCACHE_THRESHOLDS = (0.01, 0.03, 0.06, 0.12, 0.25, 0.5, 1.0)
TAYLORSEER_INTERVALS = (2, 3, 4, 5, 6)
TARGETS = (2.0, 2.5, 3.0, 3.5)
PSNR_TARGETS = (30.0, 35.0, 40.0, 45.0)
"""``target_psnr`` settings of the quality-target runs (the node's PSNR: the uncached run's own value
range as the peak, which is wider than the data's [-1, 1] under strong guidance)."""
SINGLE_SKIPS = (3, 8, 14, 20, 25, 28)
"""Steps at which the ``single_skip`` runs skip their one call (of 30)."""
DEFAULT_CFG = 5.0
"""The CFG scale of every panel without ``@cfgN`` in its name."""
FEWER_STEPS = (15, 12, 10, 9, 8)
"""Step counts of the uncached ``fewer_steps`` runs (2x to 3.75x fewer model calls than 30)."""
TAYLOR1 = {"hit_residual": "taylor1", "max_consecutive_hits": 3}
DEFAULT_SAMPLERS = {"unet": "euler:normal,dpmpp_2m:karras", "dit": "euler:normal,dpmpp_2m:normal"}
"""dpmpp_2m with karras on the UNet, as SDXL workflows pair them (``normal`` puts one very long
log-sigma step at the end of SDXL's discrete schedule, where dpmpp_2m's second-order term
amplifies any error of the step before: one skipped step there cost 20-25 dB on the toy). The
flow DiT keeps ``normal`` (karras is not used with flow models)."""


def ours_methods(kind: str) -> list[tuple[str, dict]]:
    """(method name, FBCacheHolder settings without the threshold) of our cache in this sweep."""
    methods = [
        ("fbc_reuse", {"hit_residual": "reuse", "max_consecutive_hits": -1}),
        ("fbc_reuse_h2", {"hit_residual": "reuse", "max_consecutive_hits": 2}),
        ("fbc_extrapolate_h2", {"hit_residual": "extrapolate", "max_consecutive_hits": 2}),
        ("fbc_taylor1_h3", TAYLOR1),
        ("fbc_taylor2_h3", {"hit_residual": "taylor2", "max_consecutive_hits": 3}),
    ]
    if kind == "unet":  # UNet n_last (at most 1, the last output block) is not in this sweep yet
        methods.append(("fbc_taylor1_h3_F2", {**TAYLOR1, "n_first": 2}))
    else:
        methods += [
            ("fbc_taylor1_h3_F2B0", {**TAYLOR1, "n_first": 2}),
            ("fbc_taylor1_h3_F1B1", {**TAYLOR1, "n_last": 1}),
            ("fbc_taylor1_h3_F2B1", {**TAYLOR1, "n_first": 2, "n_last": 1}),
        ]
    return methods


TARGET_SETTINGS = TAYLOR1
"""Our cache's settings for the speed-target runs."""


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over channels (Gaussian window 7, sigma 1.5), inputs in [0, 1]."""
    k = torch.exp(-((torch.arange(7, dtype=torch.float32) - 3) ** 2) / (2 * 1.5**2))
    k = k / k.sum()
    w = (k[:, None] * k[None, :])[None, None].repeat(a.shape[1], 1, 1, 1)

    def blur(t):
        return F.conv2d(t, w, padding=3, groups=a.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    va = blur(a * a) - mu_a**2
    vb = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.mean().item()


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    mse = F.mse_loss(a, b).item()
    return 99.0 if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def image_view(x: torch.Tensor) -> torch.Tensor:
    """The scene's colour channels (first 3) as [n, 3, H, W] in [0, 1]."""
    if x.ndim == 5:
        x = x[:, :, 0]
    return ((x[:, :3] + 1) / 2).clamp(0, 1)


class Counter:
    """Counts model calls that ran the first block and those that ran the middle of the network."""

    def __init__(self, first: torch.nn.Module, middle: torch.nn.Module) -> None:
        self.first = self.middle = 0
        first.register_forward_pre_hook(self._first)
        middle.register_forward_pre_hook(self._middle)

    def _first(self, *_):
        self.first += 1

    def _middle(self, *_):
        self.middle += 1

    def reset(self) -> None:
        self.first = self.middle = 0


class Bench:
    """One trained toy: samples it with every method and records the rows."""

    def __init__(self, kind: str, model, args, results: dict, scenes, modules) -> None:
        self.kind, self.model, self.args, self.results = kind, model, args, results
        self.fm, self.fb, self.ft, self.fbc, self.adapter, self.comfy_sample, self.flop_mode = modules
        cpu = torch.device("cpu")
        import comfy.model_patcher

        self.patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        dm = model.diffusion_model
        if kind == "unet":
            # ComfyUI runs the layers of a block one by one: hook the first layer of each
            self.counter = Counter(dm.input_blocks[1][0], dm.middle_block[0])
        else:
            self.counter = Counter(dm.blocks[0], dm.blocks[len(dm.blocks) // 2])
        self.eval_inputs = self.ft.cases(scenes, args.images, kind)
        self.calibration_inputs = self.ft.cases(scenes, args.images, kind, seed=11)  # targets calibrate on other images
        self.section = results[kind]
        self.hit_flops: dict[tuple[str, int, int], float] = {}
        self.schedulers: dict[str, str] = {}
        self.cfgs: dict[str, float] = {}  # panel -> CFG scale (DEFAULT_CFG where absent)

    def sample(
        self, mp, sampler: str, steps: int | None = None, inputs=None, callback=None
    ) -> tuple[torch.Tensor, float]:
        """Latent in the model's space (the training data's) and the wall time; ``callback``: ComfyUI's
        per-step ``callback(step, x0, x, total_steps)``."""
        p, n, z = inputs or self.eval_inputs
        self.counter.reset()
        t0 = time.perf_counter()
        out = self.comfy_sample.sample(
            mp,
            z,
            steps or self.args.steps,
            self.cfgs.get(sampler, DEFAULT_CFG),
            sampler.partition("@")[0].partition(":")[0],
            self.schedulers.get(sampler, "normal"),
            p,
            n,
            torch.zeros_like(z),
            seed=0,
            disable_pbar=True,
            callback=callback,
        )
        return self.model.process_latent_in(out), time.perf_counter() - t0

    def flops_of(self, mp, sampler: str, steps: int) -> tuple[float, int, int]:
        """(FLOPs, calls that ran the first block, calls that ran the middle) of one short run."""
        with self.flop_mode(display=False) as fc:
            self.sample(mp, sampler, steps)
        return fc.get_total_flops(), self.counter.first, self.counter.middle

    def hit_cost(self, sampler: str, n_first: int, n_last: int) -> float:
        """FLOPs of one cache hit with this layout (forced hits every other call)."""
        key = (sampler, n_first, n_last)
        if key not in self.hit_flops:
            holder = self.fbc.FBCacheHolder(0.5, force_pattern=[False, True], n_first=n_first, n_last=n_last)
            mp = self.adapter.apply_first_block_cache(self.patcher, holder)
            total, first, middle = self.flops_of(mp, sampler, 6)
            self.hit_flops[key] = (total - middle * self.full_flops) / max(first - middle, 1)
        return self.hit_flops[key]

    def smoothness(self, sampler: str) -> dict:
        """Per step of an uncached run: the relative L2 change of the noise/velocity prediction (the
        batched call, cond and uncond) from the step before, and the relative L2 miss of the straight
        line through the two steps before (what a one-step linear forecast would miss)."""
        from comfy.patcher_extension import WrappersMP

        preds: list[torch.Tensor] = []

        def record(executor, x, sigma, *args, **kwargs):
            denoised = executor(x, sigma, *args, **kwargs)
            preds.append((x - denoised) / sigma.reshape((-1,) + (1,) * (x.ndim - 1)))
            return denoised

        m = self.patcher.clone()
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "fbcache_quality_smoothness", record)
        self.sample(m, sampler)
        change = [((b - a).norm() / b.norm()).item() for a, b in zip(preds, preds[1:], strict=False)]
        miss = [
            ((c - (2 * b - a)).norm() / c.norm()).item() for a, b, c in zip(preds, preds[1:], preds[2:], strict=False)
        ]
        logger.info("%s %s smoothness: change %s, line miss %s", self.kind, sampler, change, miss)
        return {"change_from_step_before": [round(v, 4) for v in change], "line_miss": [round(v, 4) for v in miss]}

    def forced_plan(self, sampler: str, plan, residual: str, inputs=None) -> tuple[torch.Tensor, float]:
        """A run that computes exactly the steps in ``plan`` and skips the others whole (forced)."""
        computed = {round(p) for p in plan}
        pattern = [s not in computed for s in range(self.base_calls)]
        holder = self.fbc.FBCacheHolder(
            0.5, force_pattern=pattern, skip_whole_step=True, hit_residual=residual, max_consecutive_hits=-1
        )
        return self.sample(self.adapter.apply_first_block_cache(self.patcher, holder), sampler, inputs=inputs)

    def target_run(self, sampler: str, method: str, setting: float, holder, cost: float, more) -> None:
        """A target's first run on the calibration images (other seeds), then the measured run on the
        evaluation images, recorded with the plan, its predictions and ``more(calibration, out)``."""
        mp = self.adapter.apply_first_block_cache(self.patcher, holder)
        _, first_t = self.sample(mp, sampler, inputs=self.calibration_inputs)
        calibration = next(iter(holder.calibrations.values()))
        out, t = self.sample(mp, sampler)
        self.record(
            sampler,
            method,
            setting,
            out,
            t,
            cost,
            plan=list(calibration.plan),
            predicted_speedup_calls=round(calibration.speedup, 3),
            predicted_psnr=round(calibration.psnr, 2),
            first_run_seconds=round(first_t, 2),
            **more(calibration, out),
        )

    def cross_plans(self, sampler: str) -> None:
        """Whole-step skips with ``fit1`` on the plan the ``taylor1`` target chose, and the reverse
        (forced patterns, from this sampler's ``fbc_target_whole*`` rows): how much of a forecast's
        result is its own and how much the plan's."""
        rows = [r for r in self.section["rows"] if r["sampler"] == sampler and r.get("plan")]
        for source, residual in (("fbc_target_whole", "fit1"), ("fbc_target_whole_fit1", "taylor1")):
            for row in (r for r in rows if r["method"] == source):
                out, t = self.forced_plan(sampler, row["plan"], residual)
                method = f"fbc_cross_plan_{residual}"
                self.record(sampler, method, row["setting"], out, t, 0.0, plan=row["plan"], plan_of=source)

    def forecast_spaces(self, sampler: str, target: float = 3.0) -> None:
        """On the flow toy, each whole-step ``target`` plan of this sampler (forced) with its
        forecast of the velocity (the node, rows ``fbc_space_velocity_*``), of the noise
        prediction and of the denoised latent (:class:`fbcache_baselines.QuantityForecastWholeStep`,
        rows ``fbc_space_noise_*`` and ``fbc_space_denoised_*``),
        ``taylor1`` and ``fit1`` each: which quantity a skip should forecast."""
        from speedkit.fbcache import forecast

        rows = [r for r in self.section["rows"] if r["sampler"] == sampler and r.get("plan")]
        for source in ("fbc_target_whole", "fbc_target_whole_fit1"):
            row = next((r for r in rows if r["method"] == source and r["setting"] == target), None)
            if row is None:
                continue
            computed = {round(p) for p in row["plan"]}
            for residual in ("taylor1", "fit1"):
                out, t = self.forced_plan(sampler, row["plan"], residual)
                extra = {"plan": row["plan"], "plan_of": source}
                self.record(sampler, f"fbc_space_velocity_{residual}", target, out, t, 0.0, **extra)
                for space in self.fb.QuantityForecastWholeStep.SPACES:
                    method = self.fb.QuantityForecastWholeStep(computed, residual, forecast, space)
                    out, t = self.sample(self.fb.attach(self.patcher, method), sampler)
                    self.record(sampler, f"fbc_space_{space}_{residual}", target, out, t, 0.0, **extra)

    def plan_search(self, sampler: str, target: float = 3.0, max_rounds: int = 8) -> None:
        """How good a plan with the same number of computed steps can get: from the plan the
        ``fbc_target_whole*`` run chose at ``target``, move one computed step (not the first) by 1 or
        2 at a time and keep a move when the PSNR of a real run on the calibration images (against
        their own uncached run) improves, until no move does; then the eval images on the plan
        found. The node cannot do this (it sees one sampling run); the search estimates what a
        better plan could give each forecast, and how far a plan tuned on some images carries over."""
        calib_base, _ = self.sample(self.patcher, sampler, inputs=self.calibration_inputs)
        rows = [r for r in self.section["rows"] if r["sampler"] == sampler and r.get("plan")]
        for source, residual in (("fbc_target_whole", "taylor1"), ("fbc_target_whole_fit1", "fit1")):
            start = next((r for r in rows if r["method"] == source and r["setting"] == target), None)
            if start is None:
                continue
            plan = sorted(round(p) for p in start["plan"])

            def score(candidate: list[int], residual: str = residual) -> float:
                return psnr(self.forced_plan(sampler, candidate, residual, self.calibration_inputs)[0], calib_base)

            best = first = score(plan)
            runs = 1
            for _ in range(max_rounds):
                improved = False
                for i in range(len(plan)):
                    for move in (-2, -1, 1, 2):
                        step = plan[i] + move
                        # the first step stays computed: a run cannot skip before anything is cached
                        if plan[i] == 0 or not 0 < step < self.base_calls or step in plan:
                            continue
                        candidate = sorted(plan[:i] + [step] + plan[i + 1 :])
                        value, runs = score(candidate), runs + 1
                        if value > best + 0.05:
                            best, plan, improved = value, candidate, True
                if not improved:
                    break
            out, t = self.forced_plan(sampler, plan, residual)
            self.record(
                sampler,
                f"fbc_plan_search_{residual}",
                target,
                out,
                t,
                0.0,
                plan=plan,
                plan_of=source,
                calibration_psnr_start=round(first, 2),
                calibration_psnr_found=round(best, 2),
                search_runs=runs,
            )

    def record(self, sampler: str, method: str, setting, out: torch.Tensor, seconds: float, hit_cost: float, **extra):
        full, hits = self.counter.middle, self.counter.first - self.counter.middle
        flops = full * self.full_flops + hits * hit_cost
        row = {
            "sampler": sampler,
            "method": method,
            "setting": setting,
            "full_calls": full,
            "hit_calls": hits,
            "base_calls": self.base_calls,
            "speedup": round(self.base_calls * self.full_flops / flops, 3),
            "speedup_calls": round(self.base_calls / max(full, 1), 3),
            "psnr": round(psnr(out, self.base), 2),
            "ssim": round(ssim(image_view(out), image_view(self.base)), 4),
            "seconds": round(seconds, 2),
            **extra,
        }
        self.section["rows"].append(row)
        logger.info("%s %s", self.kind, row)
        self.args.out.write_text(json.dumps(self.results, indent=1))

    def run(self, sampler: str, selected) -> None:
        fbc, adapter, fm, fb = self.fbc, self.adapter, self.fm, self.fb
        self.base, base_t = self.sample(self.patcher, sampler)
        self.base_calls = self.counter.middle
        total, _, calls = self.flops_of(self.patcher, sampler, 6)
        self.full_flops = total / calls
        # a rerun replaces this sampler's rows of the methods it runs
        self.section["rows"] = [r for r in self.section["rows"] if r["sampler"] != sampler or not selected(r["method"])]
        self.section.setdefault("baseline", {})[sampler] = {
            "calls": self.base_calls,
            "scheduler": self.schedulers.get(sampler, "normal"),
            "cfg": self.cfgs.get(sampler, DEFAULT_CFG),
            "gflop_per_call": round(self.full_flops / 1e9, 4),
            "seconds": round(base_t, 2),
            "range": [round(self.base.min().item(), 3), round(self.base.max().item(), 3)],
        }
        logger.info(
            "%s %s baseline: %d calls, %.3f GFLOP each", self.kind, sampler, self.base_calls, self.full_flops / 1e9
        )
        for name, settings in ours_methods(self.kind):
            if not selected(name):
                continue
            cost = self.hit_cost(sampler, settings.get("n_first", 1), settings.get("n_last", 0))
            for th in THRESHOLDS:
                holder = fbc.FBCacheHolder(th, **settings)
                out, t = self.sample(adapter.apply_first_block_cache(self.patcher, holder), sampler)
                self.record(sampler, name, th, out, t, cost, hit_flops_fraction=round(cost / self.full_flops, 4))
        for method, extra in (
            ("fbc_target", {}),
            ("fbc_target_whole", {"skip_whole_step": True}),
            ("fbc_target_fit1", {"hit_residual": "fit1"}),
            ("fbc_target_whole_fit1", {"skip_whole_step": True, "hit_residual": "fit1"}),
        ):
            if not selected(method):
                continue
            cost = self.hit_cost(sampler, 1, 0)  # a whole-step skip runs no block: not counted at all
            for target in TARGETS:
                holder = fbc.FBCacheHolder(0.1, target_speedup=target, **{**TARGET_SETTINGS, **extra})
                self.target_run(sampler, method, target, holder, cost, lambda cal, out: {"threshold": cal.threshold})
        for method, check in (("fbc_psnr_checked", True), ("fbc_psnr_estimate", False)):
            if not selected(method):
                continue
            # quality targets (whole steps, fit1), with the node's check (measured on the calibration
            # images) and with the estimate alone; both judged on the evaluation images
            settings = {**TARGET_SETTINGS, "skip_whole_step": True, "hit_residual": "fit1", "check_quality": check}
            peak = float(self.base.max() - self.base.min())  # the node's peak: the uncached run's range
            cost = self.hit_cost(sampler, 1, 0)  # before the runs: it samples (and resets the call counter)
            for target in PSNR_TARGETS:
                holder = fbc.FBCacheHolder(0.1, target_psnr=target, **settings)
                self.target_run(
                    sampler,
                    method,
                    target,
                    holder,
                    cost,
                    lambda cal, out, peak=peak: {
                        # 99: nothing skipped, as psnr()
                        "measured_psnr": None if cal.measured_psnr is None else round(min(cal.measured_psnr, 99.0), 2),
                        "psnr_run_peak": round(psnr(out, self.base, peak), 2),
                        "checks": cal.checks,
                    },
                )
        if selected("fbc_cross_plan"):  # each whole-step forecast on the plan chosen for the other
            self.cross_plans(sampler)
        if selected("fbc_space") and self.kind == "dit":  # velocity (the node), noise or denoised forecast
            self.forecast_spaces(sampler)
        if selected("fbc_plan_search"):  # the best plan of the same size that real runs find
            self.plan_search(sampler)
        if selected("skip_sensitivity"):  # one skipped step: measured against two estimates of its cost
            from fbcache_sensitivity import skip_sensitivity

            skip_sensitivity(self, sampler)
        if selected("more_steps"):  # how far the 30-step reference itself is from a finer run
            out, t = self.sample(self.patcher, sampler, 2 * self.args.steps)
            self.record(sampler, "more_steps", 2 * self.args.steps, out, t, 0.0)
        if selected("fewer_steps"):  # no cache, fewer sampling steps for the same FLOPs: what any user can do
            for steps in FEWER_STEPS:
                out, t = self.sample(self.patcher, sampler, steps)
                self.record(sampler, "fewer_steps", steps, out, t, 0.0)
        if selected("smoothness"):  # how well the uncached run's prediction follows a straight line in the step
            self.section.setdefault("smoothness", {})[sampler] = self.smoothness(sampler)
            self.args.out.write_text(json.dumps(self.results, indent=1))
        if selected("single_skip"):  # how much one skipped step costs, by position (reuse, forced)
            cost = self.hit_cost(sampler, 1, 0)
            for step in SINGLE_SKIPS:
                pattern = [k == step for k in range(self.base_calls)]
                holder = fbc.FBCacheHolder(0.5, force_pattern=pattern)
                out, t = self.sample(adapter.apply_first_block_cache(self.patcher, holder), sampler)
                self.record(sampler, "single_skip", step, out, t, cost)
        if selected("easycache"):
            channels = self.eval_inputs[2].shape[1]
            for th in EASYCACHE_THRESHOLDS:
                out, t = self.sample(fm.easycache_patcher(self.patcher, channels, th), sampler)
                self.record(sampler, "easycache", th, out, t, 0.0)
        if selected("magcache"):
            ratios = fb.calibrate_magcache(
                self.patcher, lambda m: self.sample(m, sampler, inputs=self.calibration_inputs)
            )
            for th in MAGCACHE_THRESHOLDS:
                out, t = self.sample(fb.attach(self.patcher, fb.MagCache(ratios, th)), sampler)
                self.record(sampler, "magcache", th, out, t, 0.0)
        if selected("taylorseer"):
            for interval in TAYLORSEER_INTERVALS:
                out, t = self.sample(fb.attach(self.patcher, fb.TaylorSeerWholeStep(interval)), sampler)
                self.record(sampler, "taylorseer", interval, out, t, 0.0)


def trained(kind: str, args, scenes, ft) -> tuple[object, dict]:
    """The toy of ``kind``, loaded from ``--model-dir`` or trained (and saved there)."""
    model = ft.build(kind)
    path = args.model_dir / f"{kind}_{args.train_steps}x{args.batch}.pt"
    if path.is_file():
        model.diffusion_model.load_state_dict(torch.load(path))
        model.diffusion_model.eval().requires_grad_(False)
        info = json.loads(path.with_suffix(".json").read_text())
    else:
        with torch.inference_mode(False), torch.enable_grad():
            info = ft.train(model, kind, scenes, args.train_steps, args.batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.diffusion_model.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps(info))
    info["params_M"] = round(sum(p.numel() for p in model.diffusion_model.parameters()) / 1e6, 2)
    return model, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kinds", default="unet,dit")
    ap.add_argument(
        "--samplers",
        default="",
        help="comma list of sampler[:scheduler] (default: per model, see DEFAULT_SAMPLERS)",
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument(
        "--cfg",
        default=str(DEFAULT_CFG),
        help=f"comma list of CFG scales; each other than {DEFAULT_CFG:g} gets its own panels (sampler@cfgN)",
    )
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "speedkit-fbcache-toys")
    ap.add_argument("--methods", default="", help="comma list of method-name prefixes to run (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("speedkit.fbcache", "speedkit.nodes.fbcache", "root"):  # ComfyUI logs on the root logger
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("fbcache_quality", "fbcache_toys"):
        logging.getLogger(name).setLevel(logging.INFO)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fbcache_models as fm

    fm.prepare_comfy()
    import comfy.sample
    import fbcache_baselines as fb
    import fbcache_toys as ft
    from torch.utils.flop_counter import FlopCounterMode

    fbc, adapter = fm.import_pack()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wanted = [m for m in args.methods.split(",") if m]

    def selected(name: str) -> bool:
        return not wanted or any(name.startswith(w) for w in wanted)

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("settings", {}).update(
        {"steps": args.steps, "images": args.images, "cfg": DEFAULT_CFG, "threads": args.threads}
    )
    scenes = ft.Scenes()
    modules = (fm, fb, ft, fbc, adapter, comfy.sample, FlopCounterMode)
    for kind in args.kinds.split(","):
        model, info = trained(kind, args, scenes, ft)
        results.setdefault(kind, {"rows": []})["train"] = info
        bench = Bench(kind, model, args, results, scenes, modules)
        spec = args.samplers or DEFAULT_SAMPLERS[kind]
        pairing = dict(e.split(":") for e in DEFAULT_SAMPLERS[kind].split(","))
        for cfg in (float(c) for c in args.cfg.split(",")):
            for entry in spec.split(","):
                sampler, _, scheduler = entry.partition(":")
                scheduler = scheduler or "normal"
                # another scheduler than the default pairing gets its own panel: "sampler:scheduler"
                key = sampler if pairing.get(sampler, scheduler) == scheduler else f"{sampler}:{scheduler}"
                if cfg != DEFAULT_CFG:  # and so does another CFG scale: "sampler[:scheduler]@cfgN"
                    key += f"@cfg{cfg:g}"
                    bench.cfgs[key] = cfg
                bench.schedulers[key] = scheduler
                bench.run(key, selected)
    args.out.write_text(json.dumps(results, indent=1))
    logger.info("done")


if __name__ == "__main__":
    main()
