"""First Block Cache against real ComfyUI: the node on small random SD1.5- and Flux-shaped models.

The models are ComfyUI's own ``UNetModel`` / ``Flux`` classes (via ``comfy.supported_models``)
with tiny widths and explicitly initialised random weights; sampling goes through
``comfy.sample.sample`` (what KSampler calls). It runs in a subprocess with ComfyUI on
``PYTHONPATH`` so this test process keeps a clean import state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT_PRELUDE = textwrap.dedent(
    """
    import json, sys, types, logging
    import torch
    sys.path.insert(0, sys.argv[1] + "/benchmarks")
    import fbcache_models as fm
    fm.prepare_comfy()
    import comfy.sample
    fbc, adapter = fm.import_pack()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
    node = adapter.FirstBlockCache

    def emit_report(report):
        # the result channel to the parent test (stdout; the log goes to stderr)
        sys.stdout.write("FBCACHE_REPORT " + json.dumps(report) + "\\n")
        sys.stdout.flush()

    def collected_messages():
        # every log message from now on, appended to the returned list
        texts = []

        class Collect(logging.Handler):
            def emit(self, record):
                texts.append(record.getMessage())

        logging.getLogger().addHandler(Collect())
        return texts

    def tiny_case(fam, dev, frames=1):
        # a small random `fam` model on `dev`, fixed noise, an empty latent and (pos, neg)
        mp = fm.build_patcher(fam, True, dev)
        ch = 16 if fam == "flux" else 4
        noise = torch.randn(frames, ch, 16, 16, generator=torch.Generator().manual_seed(0))
        pos, neg = fm.conditioning(fam, True, 1, dev, 128, 128)
        return mp, noise, torch.zeros_like(noise), pos, neg

    def sampler_for(noise, latent, pos, neg, steps):
        # run(model, sampler="euler"): KSampler's code path, CFG 4, the same inputs every time
        def run(m, sampler="euler"):
            return comfy.sample.sample(m, noise, steps, 4.0, sampler, "normal", pos, neg, latent, seed=0,
                                       disable_pbar=True)
        return run
    """
)
"""Start of every subprocess script: ComfyUI and the pack imported, ``fm``, ``fbc``, ``adapter``, ``node``,
``emit_report``, ``collected_messages``, ``tiny_case`` and ``sampler_for``."""

SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    dev = torch.device("cpu")
    report = {}
    for fam in ("sd15", "flux"):
        mp, *inputs = tiny_case(fam, dev)
        run = sampler_for(*inputs, steps=6)
        base = run(mp)
        off = node.execute(mp, 0.0).args[0]
        forced_miss = adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False]))
        forced_half = adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False, True]))
        # min_steps=0: these 6-step runs are cached (the node's default leaves runs under 8 steps alone)
        cached = node.execute(mp, 0.3, 0.0, 1.0, -1, "tail", False, min_steps=0).args[0]
        per_block = node.execute(mp, 0.3, 0.0, 1.0, 2, "per_block", False, min_steps=0).args[0]
        half = run(forced_half)
        third_reuse = run(adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False, False, True])))
        third_extrap = run(adapter.apply_first_block_cache(
            mp, fbc.FBCacheHolder(0.5, force_pattern=[False, False, True], hit_residual="extrapolate")))
        default_mode = node.execute(mp, 0.3).args[0].model_options["transformer_options"]["speedkit_fbcache"]
        cached_a = run(cached)
        run(cached, "heun")  # another prompt in between
        report[fam] = {
            "off_is_input": off is mp,
            "threshold0_identical": bool(torch.equal(run(off), base)),
            "all_computed_identical": bool(torch.equal(run(forced_miss), base)),
            "half_differs": not bool(torch.equal(half, base)),
            "half_finite": bool(torch.isfinite(half).all()),
            "extrapolate_finite": bool(torch.isfinite(third_extrap).all()),
            "extrapolate_differs_from_reuse": not bool(torch.equal(third_extrap, third_reuse)),
            "node_default_hit_residual": default_mode.hit_residual,
            "cached_finite": bool(torch.isfinite(cached_a).all()),
            "cached_rerun_identical": bool(torch.equal(run(cached), cached_a)),
            "per_block_heun_finite": bool(torch.isfinite(run(per_block, "heun")).all()),
            "dpmpp_2m_finite": bool(torch.isfinite(run(cached, "dpmpp_2m")).all()),
            "input_untouched": "speedkit_fbcache" not in mp.model_options["transformer_options"],
            "base_again_identical": bool(torch.equal(run(mp), base)),
            "chained_twice_identical_to_once": bool(torch.equal(
                run(adapter.apply_first_block_cache(forced_half, fbc.FBCacheHolder(0.5, force_pattern=[False, True]))),
                half)),
        }
    try:
        node.execute(mp, -1.0)
        report["negative_threshold"] = "accepted"
    except ValueError as exc:
        report["negative_threshold"] = str(exc)
    try:
        node.execute(object(), 0.2)
        report["bad_model"] = "accepted"
    except ValueError as exc:
        report["bad_model"] = str(exc)
    emit_report(report)
    """
)


def run_comfy_script(script: str, timeout: int = 600) -> dict:
    """Run ``script`` (starting with :data:`SCRIPT_PRELUDE`) in a subprocess with ComfyUI importable.

    The script gets the repository root as ``sys.argv[1]`` and writes one ``FBCACHE_REPORT <json>``
    line. Returns ``{"data": <that json>, "log": <stderr>}``; skips without ``COMFYUI_ROOT``.
    """
    root_env = os.environ.get("COMFYUI_ROOT")
    if not root_env or not (Path(root_env) / "main.py").is_file():
        pytest.skip("integration tests need COMFYUI_ROOT pointing at a ComfyUI v0.19.3 checkout")
    root = Path(root_env)
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(REPO)], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FBCACHE_REPORT ")), None)
    if line is None:
        pytest.fail(f"subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {"data": json.loads(line.split(" ", 1)[1]), "log": proc.stderr}


@pytest.fixture(scope="module")
def report() -> dict:
    return run_comfy_script(SCRIPT)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_threshold_zero_and_all_computed_give_identical_latents(report, family):
    r = report["data"][family]
    assert r["off_is_input"] and r["threshold0_identical"] and r["all_computed_identical"]
    assert r["input_untouched"] and r["base_again_identical"]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_cached_runs_complete_with_every_sampler(report, family):
    r = report["data"][family]
    assert r["half_differs"] and r["half_finite"] and r["cached_finite"]
    assert r["cached_rerun_identical"]  # A/B/A: nothing is kept between sampling runs
    assert r["per_block_heun_finite"] and r["dpmpp_2m_finite"]
    assert r["chained_twice_identical_to_once"]  # a second node replaces the first, no double hooks


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_extrapolated_hit_residual_runs_and_is_the_node_default(report, family):
    r = report["data"][family]
    assert r["extrapolate_finite"] and r["extrapolate_differs_from_reuse"]
    assert r["node_default_hit_residual"] == "extrapolate"


def test_report_in_log_and_attach_messages(report):
    log = report["log"]
    assert "First Block Cache attached to UNetModel: first ResBlock, tail residual" in log
    assert "First Block Cache attached to Flux: 2 double_blocks, 2 single_blocks" in log
    assert "computed /" in log and "hit rate" in log and "estimated speedup" in log and "cache memory" in log


CANCEL_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    import comfy.model_management as mm
    mp, *inputs = tiny_case("sd15", torch.device("cpu"))
    run = sampler_for(*inputs, steps=10)
    cached = node.execute(mp, 0.3).args[0]
    mm.interrupt_current_processing(True)  # Cancel pressed before the first model call
    try:
        run(cached)
        outcome = "finished"
    except mm.InterruptProcessingException:
        outcome = "interrupted"
    emit_report({"outcome": outcome, "after": bool(torch.isfinite(run(cached)).all())})
    """
)


def test_a_run_cancelled_before_its_first_step_is_no_unsupported_model():
    """Cancel before the first model call: no "hooks never ran ... report the model type" warning,
    and the next run on the same patched model is cached as usual."""
    result = run_comfy_script(CANCEL_SCRIPT)
    assert result["data"] == {"outcome": "interrupted", "after": True}
    log = result["log"]
    assert "the run stopped before its first step" in log, log[-3000:]
    assert "hooks never ran" not in log, log[-3000:]
    assert "computed /" in log, log[-3000:]


def test_bad_input_messages(report):
    assert "residual_diff_threshold=-1.0" in report["data"]["negative_threshold"]
    assert "not a ComfyUI MODEL" in report["data"]["bad_model"]


def test_node_schema_on_the_server(comfy_server):
    info = comfy_server.object_info()["SpeedKit_FirstBlockCache"]
    assert info["category"] == "SpeedKit/model_patches"
    required = info["input"]["required"]
    for name in (
        "model",
        "residual_diff_threshold",
        "start_percent",
        "end_percent",
        "max_consecutive_hits",
        "cache_mode",
        "verbose",
    ):
        assert name in required, name
        assert required[name][1].get("tooltip"), f"{name} has no tooltip"
    assert required["cache_mode"][1]["default"] == "tail"
    optional = info["input"].get("optional", {})
    assert optional["hit_residual"][1]["default"] == "extrapolate" and optional["hit_residual"][1].get("tooltip")
    assert set(
        optional["hit_residual"][0]
        if isinstance(optional["hit_residual"][0], list)
        else optional["hit_residual"][1]["options"]
    ) == {"reuse", "extrapolate", "taylor1", "taylor2", "fit1"}
    # new inputs are optional and come after the old ones (saved widget values are positional)
    new = {"n_first": 1, "n_last": 0, "min_steps": 8, "target_speedup": 0.0, "target_psnr": 0.0}
    for name, default in new.items():
        assert name in optional and name not in required, name
        assert optional[name][1]["default"] == default and optional[name][1].get("tooltip"), name
    order = info.get("input_order", {})
    assert order.get("optional", list(optional))[:6] == ["hit_residual", *new]


GUIDANCE_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT, SkipLayerGuidanceDiTSimple
    dev = torch.device("cpu")
    report = {}
    cases = {
        "sd15_pag": ("sd15", lambda mp: PerturbedAttentionGuidance.execute(mp, 3.0).args[0]),
        # the tiny Flux's double block 1 is its whole double span: in the SLG calls that span is SLG's skip
        "flux_slg_double": ("flux", lambda mp: SkipLayerGuidanceDiT.execute(mp, 3.0, 0.0, 1.0, "1", "", 0.0).args[0]),
        "flux_slg_single": ("flux", lambda mp: SkipLayerGuidanceDiT.execute(mp, 3.0, 0.0, 1.0, "", "0", 0.0).args[0]),
        "flux_slg_simple": ("flux", lambda mp: SkipLayerGuidanceDiTSimple.execute(mp, 0.0, 1.0, "", "0").args[0]),
    }

    def with_lora_like_patches(mp):
        # weight patches as LoraLoader adds them (ModelPatcher.add_patches), here "diff" patches
        m = mp.clone()
        sd = m.model_state_dict()
        keys = [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2][:6]
        g = torch.Generator().manual_seed(3)
        m.add_patches({k: (torch.randn(sd[k].shape, generator=g) * 0.05,) for k in keys}, 1.0)
        return m

    cases["sd15_lora_patches"] = ("sd15", with_lora_like_patches)
    for name, (fam, guide) in cases.items():
        mp, *inputs = tiny_case(fam, dev)
        run = sampler_for(*inputs, steps=8)
        guided = guide(mp)
        base = run(guided)
        # below any real change of the first block: a correct cache computes every call
        tiny = run(node.execute(guided, 1e-7, 0.0, 1.0, -1, "tail", False).args[0])
        half = run(adapter.apply_first_block_cache(guided, fbc.FBCacheHolder(0.5, force_pattern=[False, True])))
        report[name] = {
            "guide_changes_output": not bool(torch.equal(base, run(mp))),
            "tiny_threshold_identical": bool(torch.equal(tiny, base)),
            "forced_half_finite": bool(torch.isfinite(half).all()),
            "forced_half_differs": not bool(torch.equal(half, base)),
        }
    # ComfyUI's context windows over the batch of an image model (dim 0): one call per window
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    mp, *inputs = tiny_case("sd15", dev, frames=6)
    run = sampler_for(*inputs, steps=6)
    windows = ContextWindowsManualNode.execute(mp, 4, 1, "standard_static", 1, False, "pyramid", 0, False, "", False).args[0]
    base = run(windows)
    tiny = run(node.execute(windows, 1e-7, 0.0, 1.0, -1, "tail", False, min_steps=0).args[0])
    half = run(adapter.apply_first_block_cache(windows, fbc.FBCacheHolder(0.5, force_pattern=[False, True])))
    report["sd15_context_windows"] = {
        "guide_changes_output": not bool(torch.equal(base, run(mp))),
        "tiny_threshold_identical": bool(torch.equal(tiny, base)),
        "forced_half_finite": bool(torch.isfinite(half).all()),
        "forced_half_differs": not bool(torch.equal(half, base)),
    }
    emit_report(report)
    """
)


@pytest.fixture(scope="module")
def guidance_report() -> dict:
    return run_comfy_script(GUIDANCE_SCRIPT)


@pytest.mark.parametrize(
    "case",
    ["sd15_pag", "flux_slg_double", "flux_slg_single", "flux_slg_simple", "sd15_context_windows", "sd15_lora_patches"],
)
def test_guidance_nodes_that_call_the_model_again_with_other_patches(guidance_report, case):
    """ComfyUI's Perturbed-Attention and Skip Layer Guidance run an extra model call per step for the
    same conditioning with other patches. Cached apart from the normal calls, a threshold below any
    real change gives exactly the uncached result (compared with the normal call's reference, those
    calls used to be skipped and returned the wrong residual). Context windows (one call per window)
    and LoRA-style weight patches are checked the same way."""
    r = guidance_report["data"][case]
    assert r["guide_changes_output"], r  # the other node really acts in this setup
    assert r["tiny_threshold_identical"], r
    assert r["forced_half_finite"] and r["forced_half_differs"]


def test_guidance_calls_are_reported_separately(guidance_report):
    log = guidance_report["log"]
    assert "keep their own cache state (calls with other patches #1)" in log
    assert "(calls with other patches #1):" in log
    assert "(context window 2-5 #1):" in log  # 6 frames, windows of 4 overlapping by 1: 0-3 and 2-5
    # SLG on single block 0 (the single span's start): those calls cannot form a tail and are computed
    assert "single_block 0 is replaced by another node" in log


GPU_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    from comfy.patcher_extension import WrappersMP
    dev = torch.device("cuda")
    report = {}
    for fam in ("sd15", "flux"):
        mp, *inputs = tiny_case(fam, dev)
        pos, neg = inputs[2:]
        run = sampler_for(*inputs, steps=6)

        def on_host(m):
            m = m.clone()
            m.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, adapter.WRAPPER_KEY)
            return m

        run(mp)  # first GPU run: kernels chosen, model loaded
        base = run(mp)
        forced_miss = adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False]))
        tiny = node.execute(mp, 1e-9, 0.0, 1.0, -1, "tail", False, min_steps=0).args[0]
        half = adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False, True]))
        half_dev = run(half)
        report[fam] = {
            "unpatched_repeatable": bool(torch.equal(run(mp), base)),
            "all_computed_identical": bool(torch.equal(run(forced_miss), base)),
            "tiny_threshold_identical": bool(torch.equal(run(tiny), base)),
            "heun_tiny_identical": bool(torch.equal(run(tiny, "heun"), run(mp, "heun"))),
            "half_finite_and_differs": bool(torch.isfinite(half_dev).all()) and not bool(torch.equal(half_dev, base)),
            "half_same_as_conditioning_on_host": bool(torch.equal(run(on_host(half)), half_dev)),
            "user_conditioning_still_on_cpu": pos[0][0].device.type == "cpu" and neg[0][0].device.type == "cpu",
        }
    emit_report(report)
    """
)


def test_conditioning_kept_on_the_gpu_changes_no_value():
    """On a GPU the cache keeps the run's conditioning on the device: latents stay bit-identical."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the conditioning only moves when the model runs on one")
    result = run_comfy_script(GPU_SCRIPT)
    for fam in ("sd15", "flux"):
        r = result["data"][fam]
        assert all(r.values()), (fam, r)
    assert "First Block Cache: the conditioning" in result["log"] and "stays on cuda" in result["log"]
