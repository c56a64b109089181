"""First Block Cache 2 against real ComfyUI: forecasts, first/last-n blocks, targets, short runs, torch.compile.

Small random SD1.5-, Flux- and Wan-shaped models from ComfyUI's own classes, sampled through
``comfy.sample.sample`` (what KSampler calls); same subprocess runner as ``test_fbcache_comfy.py``.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
from test_fbcache_comfy import REPO, SCRIPT_PRELUDE, run_comfy_script

SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    import math, comfy.model_patcher, comfy.supported_models as sm
    dev = torch.device("cpu")
    report = {}

    def wan_case():
        mc = sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16,
            "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 4,
            "num_layers": 6, "dtype": torch.float32})
        mc.set_inference_dtype(torch.float32, None)
        model = mc.get_model({}, "", device=dev)
        fm.init_weights(model.diffusion_model)
        mp = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)
        g = torch.Generator().manual_seed(1)
        pos = [[torch.randn(1, 8, 32, generator=g), {}]]
        neg = [[torch.randn(1, 8, 32, generator=g), {}]]
        noise = torch.randn(1, 16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        return mp, noise, torch.zeros_like(noise), pos, neg

    cases = {"sd15": tiny_case("sd15", dev), "flux": tiny_case("flux", dev), "wan": wan_case()}
    for fam, (mp, *inputs) in cases.items():
        run = sampler_for(*inputs, steps=10)
        short = sampler_for(*inputs, steps=6)
        base, base_short = run(mp), short(mp)
        r = {}
        # under min_steps (the node's default 8): the cache stays off for that run, even with forced hits
        default = node.execute(mp, 0.5).args[0].model_options["transformer_options"]["speedkit_fbcache"]
        r["node_default_min_steps"] = default.min_steps
        def forced(min_steps):
            holder = fbc.FBCacheHolder(0.5, force_pattern=[False, True], min_steps=min_steps)
            return adapter.apply_first_block_cache(mp, holder)
        r["short_run_uncached"] = bool(torch.equal(short(forced(8)), base_short))
        r["long_run_cached"] = not bool(torch.equal(run(forced(8)), base))
        r["forced_short_run_cached"] = not bool(torch.equal(short(forced(0)), base_short))
        # forecasts through the node
        outs = {}
        for hit in ("reuse", "extrapolate", "taylor1", "taylor2"):
            m = adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False, False, False, True],
                                                                      hit_residual=hit))
            outs[hit] = run(m)
        r["forecasts_finite"] = all(bool(torch.isfinite(o).all()) for o in outs.values())
        r["forecasts_differ"] = len({o.sum().item() for o in outs.values()}) == 4
        tiny = node.execute(mp, 1e-9, 0.0, 1.0, -1, "tail", False, "taylor2", 2, 1).args[0]
        r["tiny_threshold_fn_bn_identical"] = bool(torch.equal(run(tiny), base))
        fnbn = node.execute(mp, 0.5, 0.0, 1.0, 3, "tail", False, "taylor2", 2, 1).args[0]
        r["fn_bn_finite"] = bool(torch.isfinite(run(fnbn)).all())
        # the same forced hits with and without n_last: the hits differ (the last block(s) ran on the prediction)
        pair = [run(adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False, True], n_last=b)))
                for b in (0, 1)]
        r["n_last_changes_hits"] = not bool(torch.equal(*pair)) and all(bool(torch.isfinite(o).all()) for o in pair)
        # a speed target: the first run computes every step (identical to uncached), the next one skips
        target = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "taylor2", target_speedup=2.0).args[0]
        first = run(target)
        second = run(target)
        r["calibration_run_identical"] = bool(torch.equal(first, base))
        r["calibrated_run_differs"] = not bool(torch.equal(second, base))
        r["calibrated_run_finite"] = bool(torch.isfinite(second).all())
        holder = target.model_options["transformer_options"]["speedkit_fbcache"]
        r["calibrations"] = len(holder.calibrations)
        r["other_sampler_calibrates_again"] = bool(torch.equal(run(target, "dpmpp_2m"), run(mp, "dpmpp_2m")))
        r["calibrations_after"] = len(holder.calibrations)
        # a quality target at CFG 4 (the guider's scale reaches the holder): its estimate carries a caveat
        # on the flow models only, naming the multistep sampler
        for name in ("dpmpp_2m", "euler"):
            quality = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "taylor2", target_psnr=30.0,
                                   check_quality=False).args[0]
            run(quality, name)
            holder = quality.model_options["transformer_options"]["speedkit_fbcache"]
            r[f"psnr_caveat_{name}"] = next(iter(holder.calibrations.values())).caveat
        # a sampler from another pack (a name the pack does not know) whose update reuses its last
        # prediction, at CFG 3 through SamplerCustom's path: read as multistep from its own steps
        def sample_pack_two_step(model, x, sigmas, extra_args=None, callback=None, disable=None):
            extra_args = {} if extra_args is None else extra_args
            s_in = x.new_ones([x.shape[0]])
            old = None
            for i in range(len(sigmas) - 1):
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                if callback is not None:
                    callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
                if sigmas[i + 1] == 0:
                    x = denoised
                else:
                    ratio = sigmas[i + 1] / sigmas[i]
                    x = ratio * x + (1 - ratio) * (denoised if old is None else 1.5 * denoised - 0.5 * old)
                old = denoised
            return x

        import comfy.samplers
        noise, latent, pos, neg = inputs
        sigmas = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "normal", 10)
        for label, cfg in (("cfg3", 3.0), ("cfg2", 2.0)):
            quality = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "taylor2", target_psnr=30.0,
                                   check_quality=False).args[0]
            comfy.sample.sample_custom(quality, noise, cfg, comfy.samplers.KSAMPLER(sample_pack_two_step), sigmas,
                                       pos, neg, latent, seed=0, disable_pbar=True)
            holder = quality.model_options["transformer_options"]["speedkit_fbcache"]
            r[f"psnr_caveat_custom_{label}"] = next(iter(holder.calibrations.values())).caveat
        # a quality target with its check (the node's default): the first run returns the uncached result,
        # a later run reproduces the PSNR the check measured (same inputs, the checked plan)
        import comfy.model_management
        def psnr_of(out, ref):
            # in the model's latent space, where the node measures (Wan scales each channel on the way out)
            out, ref = mp.model.process_latent_in(out), mp.model.process_latent_in(ref)
            rms = (out - ref).pow(2).mean().sqrt().item()
            return float("inf") if rms == 0 else 20 * math.log10((ref.amax() - ref.amin()).item() / rms)
        checked = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "fit1", target_psnr=30.0,
                               skip_whole_step=True).args[0]
        first = run(checked)
        holder = checked.model_options["transformer_options"]["speedkit_fbcache"]
        cal = next(iter(holder.calibrations.values()))
        second = run(checked)
        r["check_first_identical"] = bool(torch.equal(first, base))
        r["check_measured"] = cal.measured_psnr
        r["check_again"] = psnr_of(second, first)
        r["check_all_computed"] = cal.computed == cal.total
        r["check_caveat"] = cal.caveat
        # a cancel during a check run reaches ComfyUI and keeps no plan; another failure leaves the estimate
        for label, error in (("cancel", comfy.model_management.InterruptProcessingException),
                             ("failure", RuntimeError)):
            quality = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "fit1", target_psnr=30.0,
                                   skip_whole_step=True).args[0]
            seen = []
            def stop_in_check(step, x0, x, total):
                seen.append(step)
                if len(seen) > total:  # past the calibration run's own steps
                    raise error("stopped in a check run")
            noise, latent, pos, neg = inputs
            try:
                out = comfy.sample.sample(quality, noise, 10, 4.0, "euler", "normal", pos, neg, latent, seed=0,
                                          disable_pbar=True, callback=stop_in_check)
                r[f"{label}_returned_uncached"] = bool(torch.equal(out, base))
            except comfy.model_management.InterruptProcessingException:
                r[f"{label}_raised"] = True
            holder = quality.model_options["transformer_options"]["speedkit_fbcache"]
            r[f"{label}_calibrations"] = [c.measured_psnr for c in holder.calibrations.values()]
        report[fam] = r
    emit_report(report)
    """
)

COMPILE_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    dev = torch.device("cpu")
    report = {}
    for fam in ("sd15", "flux"):
        mp, *inputs = tiny_case(fam, dev)
        run = sampler_for(*inputs, steps=8)

        def compiled(holder):
            m = adapter.apply_first_block_cache(mp, holder)
            set_torch_compile_wrapper(m, backend="eager")
            return m

        torch._dynamo.reset()
        errors = []
        # warm-up: cached runs with hits and misses compile what ComfyUI's model needs; on a UNet,
        # n_last adds an output_block_patch (another model patch set, compiled once)
        for n_last in (0, 1):
            run(compiled(fbc.FBCacheHolder(0.5, force_pattern=[False, True], hit_residual="taylor2", n_last=n_last)))
        with torch._dynamo.config.patch(error_on_recompile=True):
            cases = {
                "reuse": fbc.FBCacheHolder(0.5, force_pattern=[False, False, True]),
                "extrapolate": fbc.FBCacheHolder(0.5, force_pattern=[False, True, True], hit_residual="extrapolate"),
                "taylor2": fbc.FBCacheHolder(0.5, force_pattern=[False, False, True, True], hit_residual="taylor2"),
                "threshold": fbc.FBCacheHolder(0.3, hit_residual="taylor2"),
                "fn_bn": fbc.FBCacheHolder(0.5, force_pattern=[False, True], hit_residual="taylor2", n_first=2, n_last=1),
                "fit1": fbc.FBCacheHolder(0.5, force_pattern=[False, False, False, True], hit_residual="fit1"),
                "whole_step": fbc.FBCacheHolder(0.5, force_pattern=[False, False, False, True, True], hit_residual="fit1",
                                                skip_whole_step=True),
            }
            for name, holder in cases.items():
                try:
                    run(compiled(holder))
                except Exception as exc:
                    errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            target = compiled(fbc.FBCacheHolder(0.1, hit_residual="taylor2", target_speedup=2.0))
            whole = compiled(fbc.FBCacheHolder(0.1, hit_residual="fit1", target_speedup=2.0, skip_whole_step=True))
            for name, m in (("calibration run", target), ("calibrated run", target),
                            ("whole-step calibration run", whole), ("whole-step calibrated run", whole)):
                try:
                    run(m)
                except Exception as exc:
                    errors.append(f"target {name}: {type(exc).__name__}: {str(exc)[:300]}")
        report[fam] = errors
        torch._dynamo.reset()
    emit_report(report)
    """
)

FAMILIES = ["sd15", "flux", "wan"]


@pytest.fixture(scope="module")
def report() -> dict:
    return run_comfy_script(SCRIPT)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_under_min_steps_are_left_alone(report, family):
    r = report["data"][family]
    assert r["node_default_min_steps"] == 8
    assert r["short_run_uncached"] and r["long_run_cached"] and r["forced_short_run_cached"], r
    assert "6 steps, fewer than min_steps 8" in report["log"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hit_residual_runs_and_they_differ(report, family):
    r = report["data"][family]
    assert r["forecasts_finite"] and r["forecasts_differ"], r


@pytest.mark.parametrize("family", FAMILIES)
def test_first_and_last_n_blocks_through_the_node(report, family):
    r = report["data"][family]
    assert r["tiny_threshold_fn_bn_identical"] and r["fn_bn_finite"], r
    assert r["n_last_changes_hits"], r


def test_layouts_are_reported_and_lowered_where_needed(report):
    log = report["log"]
    assert "WanModel: 6 double_blocks, tail residuals, F2B1" in log
    assert "Flux: 2 double_blocks, 2 single_blocks, tail residuals, F2B1" in log
    # on a UNet the last output block is the one n_last can keep computed
    assert "tail residual, last output block computed" in log


@pytest.mark.parametrize("family", FAMILIES)
def test_speed_target_calibrates_once_per_sampler_and_schedule(report, family):
    r = report["data"][family]
    assert r["calibration_run_identical"], r  # the calibration run computes every step
    assert r["calibrated_run_differs"] and r["calibrated_run_finite"], r
    assert r["calibrations"] == 1
    assert r["other_sampler_calibrates_again"] and r["calibrations_after"] == 2, r
    log = report["log"]
    assert "calibration run, every step computed; chose plan computing steps" in log
    assert "Target 2x: calibrated plan computing steps" in log


@pytest.mark.parametrize("family", FAMILIES)
def test_quality_target_under_strong_guidance_warns_on_flow_models(report, family):
    """KSampler at CFG 4: on the flow models (Flux, Wan) a quality target's estimate comes with the
    caveat (naming dpmpp_2m as a multistep sampler), on the eps UNet (SD1.5) it does not."""
    r = report["data"][family]
    if family == "sd15":
        assert r["psnr_caveat_dpmpp_2m"] == r["psnr_caveat_euler"] == ""
    else:
        assert "at CFG 4 with dpmpp_2m, which reuses earlier predictions, on a flow model" in r["psnr_caveat_dpmpp_2m"]
        assert "at CFG 4 on a flow model" in r["psnr_caveat_euler"]
        assert "target_psnr 30: the estimated PSNR is likely too high" in report["log"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_multistep_sampler_of_another_pack_is_recognised_from_its_steps(report, family):
    """A sampler function the pack does not know by name, given to SamplerCustom's path, that reuses
    its last prediction: the calibration run reads it as multistep, so on the flow models a quality
    target at CFG 3 gets the caveat (a single-step sampler would not: its limit is 3.5), at CFG 2 not."""
    r = report["data"][family]
    assert "steps read pack_two_step as multistep" in report["log"]
    assert "steps read dpmpp_2m as multistep" in report["log"] and "steps read euler as single-step" in report["log"]
    assert r["psnr_caveat_custom_cfg2"] == ""
    if family == "sd15":
        assert r["psnr_caveat_custom_cfg3"] == ""
    else:
        assert "at CFG 3 with pack_two_step, which reuses earlier predictions" in r["psnr_caveat_custom_cfg3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_quality_target_is_checked_by_sampling_and_later_runs_reproduce_the_measurement(report, family):
    """target_psnr with check_quality (the default) through KSampler's path: the first run returns the
    uncached result; its plan's PSNR was measured by sampling the same inputs again, and the next run
    (same inputs, that plan) lands on the same PSNR; the plan holds the target or computes every step."""
    r = report["data"][family]
    assert r["check_first_identical"], r
    assert r["check_measured"] is not None, r
    if r["check_all_computed"]:
        assert r["check_measured"] == math.inf and r["check_again"] == math.inf, r
    else:
        assert r["check_measured"] >= 30.0, r
        assert abs(r["check_again"] - r["check_measured"]) < 0.05, r
    assert r["check_caveat"] == "", r
    log = report["log"]
    assert "First Block Cache: quality check run:" in log and "target_psnr 30: " in log
    assert "against the calibration run (estimated" in log or "every step is computed" in log


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cancel_during_a_quality_check_reaches_comfyui_and_a_failure_leaves_the_estimate(report, family):
    r = report["data"][family]
    assert r.get("cancel_raised") and r["cancel_calibrations"] == [], r  # no plan kept: the next run calibrates
    assert r["failure_returned_uncached"], r  # the calibration run's own result
    assert r["failure_calibrations"] == [None], r  # the estimate decided
    assert "a quality check run failed (RuntimeError: stopped in a check run)" in report["log"]


def test_cached_sampling_does_not_recompile_under_torch_compile():
    """ComfyUI's own torch.compile wrapper (eager backend): after one warm-up run, cached runs with
    other hit patterns, forecasts (fit1 too), first/last-n blocks, whole-step skips, and the calibration and
    planned runs of speed targets recompile nothing."""
    result = run_comfy_script(COMPILE_SCRIPT, timeout=1200)
    assert result["data"] == {"sd15": [], "flux": []}, result["data"]


def test_example_workflow_widgets_map_to_the_same_settings(comfy_server):
    """The saved example workflow (and the same workflow saved before the new inputs existed) keeps
    its settings: widget values are positional, new inputs come last with defaults that change nothing."""
    from comfy_server import widget_specs

    info = comfy_server.object_info()["SpeedKit_FirstBlockCache"]
    names = [name for name, _, _ in widget_specs(info)]
    workflow = json.loads((REPO / "example_workflows" / "fbcache_sdxl.json").read_text())
    values = next(n["widgets_values"] for n in workflow["nodes"] if n["type"] == "SpeedKit_FirstBlockCache")
    expected_old = {
        "residual_diff_threshold": 0.1,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "max_consecutive_hits": 2,
        "cache_mode": "tail",
        "verbose": False,
        "hit_residual": "extrapolate",
    }
    assert dict(zip(names[:7], values[:7], strict=True)) == expected_old
    defaults = {name: spec[1].get("default") for name, spec in info["input"].get("optional", {}).items()}
    saved = dict(zip(names, values, strict=False))
    for name in (
        "n_first",
        "n_last",
        "min_steps",
        "target_speedup",
        "target_psnr",
        "decide_ahead",
        "skip_whole_step",
        "check_quality",
    ):
        assert saved.get(name, defaults[name]) == defaults[name], name


REPEAT_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    import comfy.samplers
    dev = torch.device("cpu")
    mp, noise, latent, pos, neg = tiny_case("sd15", dev)
    sigmas = torch.tensor([1.0, 1.0, 0.0])  # the second step starts where the first did: same model input
    sampler = comfy.samplers.sampler_object("euler")

    def run(m):
        return comfy.sample.sample_custom(m, noise, 4.0, sampler, sigmas, pos, neg, latent, seed=0,
                                          disable_pbar=True)

    base = run(mp)
    report = {}
    for n_last in (0, 1):
        out = run(adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False, True],
                                                                        n_last=n_last)))
        report[n_last] = {"max_diff": float((out - base).abs().max()), "scale": float(base.abs().max())}
    emit_report(report)
    """
)


def test_unet_hit_on_a_repeated_input_reproduces_the_computed_step():
    """The second call sees exactly the first call's input and is a forced hit: the anchor plus the
    cached residual is then the computed state, so the output must be the computed one. With n_last
    the last output block runs on that state with the current call's skip connection and context: a
    wrong state or skip connection shows here (a wrong timestep embedding would not: this toy's
    GroupNorms have one channel per group, which cancels a per-channel shift)."""
    result = run_comfy_script(REPEAT_SCRIPT)
    data, log = result["data"], result["log"]
    # each run: the first call of each conditioning computed, the second (same input) skipped
    assert log.count("uncond: 1 computed / 1 skipped; cond: 1 computed / 1 skipped") == 2, log[-3000:]
    assert "tail residual, last output block computed]: uncond: 1 computed / 1 skipped" in log
    for n_last in ("0", "1"):
        assert data[n_last]["scale"] > 0.1 and data[n_last]["max_diff"] < 1e-4, data
