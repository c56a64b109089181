"""First Block Cache ``skip_whole_step`` against real ComfyUI (CPU).

Through ComfyUI's own sampler code (CFG 4, cond and uncond batched), on tiny SD1.5-shaped and
Flux-shaped models: a skipped step runs no block, and with ``reuse`` its result is exactly what an
independent ``APPLY_MODEL`` wrapper gives that returns ``x - sigma * (last computed prediction)``
on the same steps; a speed-target plan with ``skip_whole_step`` runs its first blocks only on the
planned steps and says so in its report. Same subprocess runner as ``test_fbcache_comfy.py``.
"""

from __future__ import annotations

import textwrap

import pytest
from test_fbcache_comfy import SCRIPT_PRELUDE, run_comfy_script

SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    from comfy.patcher_extension import WrappersMP
    texts = collected_messages()
    dev = torch.device("cpu")
    PATTERN = [False, False, True, True, False, True]

    def reference(mp):
        # the whole-step rule written independently: skipped steps return x - sigma * last prediction
        state = {"call": 0, "eps": None}
        m = mp.clone()

        def outer(executor, *a, **k):
            state.update(call=0, eps=None)
            return executor(*a, **k)

        def apply(executor, x, sigma, *a, **k):
            i = state["call"]
            state["call"] += 1
            s = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
            if PATTERN[i % len(PATTERN)] and state["eps"] is not None:
                return x - state["eps"] * s
            denoised = executor(x, sigma, *a, **k)
            state["eps"] = (x - denoised) / s
            return denoised

        m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "test_reference", outer)
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_reference", apply)
        return m

    def first_block(mp):
        dm = mp.model.diffusion_model
        return dm.input_blocks[1][0] if hasattr(dm, "input_blocks") else dm.double_blocks[0]

    report = {}
    for fam in ("sd15", "flux"):
        mp, *inputs = tiny_case(fam, dev)
        run = sampler_for(*inputs, steps=10)
        runs = []
        first_block(mp).register_forward_pre_hook(lambda *_: runs.append(1))
        r = {}
        for sampler in ("euler", "dpmpp_2m"):
            runs.clear()
            ours = run(adapter.apply_first_block_cache(
                mp, fbc.FBCacheHolder(0.5, force_pattern=PATTERN, hit_residual="reuse", skip_whole_step=True)), sampler)
            r[f"{sampler}_first_block_runs"] = len(runs)
            expected = run(reference(mp), sampler)
            r[f"{sampler}_max_diff"] = float((ours - expected).abs().max())
            r[f"{sampler}_differs_from_first_block_hits"] = float((ours - run(adapter.apply_first_block_cache(
                mp, fbc.FBCacheHolder(0.5, force_pattern=PATTERN, hit_residual="reuse")), sampler)).abs().max())
        target = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "taylor1", target_speedup=2.0,
                              skip_whole_step=True).args[0]
        runs.clear()
        run(target)
        r["calibration_first_block_runs"] = len(runs)
        runs.clear()
        start = len(texts)
        latent = run(target)
        r["planned_first_block_runs"] = len(runs)
        r["planned_report"] = [t for t in texts[start:] if "hit rate" in t]
        r["planned_finite"] = bool(torch.isfinite(latent).all())
        report[fam] = r
    emit_report(report)
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    return run_comfy_script(SCRIPT)


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_whole_step_skips_match_an_independent_rule_and_run_no_block(report, family, sampler):
    r = report["data"][family]
    computed = sum(1 for k in range(10) if not [False, False, True, True, False, True][k % 6])
    assert r[f"{sampler}_first_block_runs"] == computed  # one call per step, cond and uncond batched
    assert r[f"{sampler}_max_diff"] < 1e-5, r
    assert r[f"{sampler}_differs_from_first_block_hits"] > 1e-4  # not the first-block path in disguise


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_planned_run_with_whole_step_skips(report, family):
    r = report["data"][family]
    assert r["calibration_first_block_runs"] == 10
    assert 0 < r["planned_first_block_runs"] <= 5  # 2x: half of the 10 steps or fewer run a block
    (text,) = r["planned_report"]
    skipped = 10 - r["planned_first_block_runs"]
    assert f"{skipped} skipped calls ran no block" in text and "Skips decided ahead" in text
    assert r["planned_finite"]
