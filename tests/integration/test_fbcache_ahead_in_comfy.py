"""First Block Cache deciding ahead of the GPU, against real ComfyUI (CPU).

Runs whose skips are fixed in advance (forced patterns, a calibrated speed-target plan) on
samplers that call the model once per step learn each step from the sampler's callback and
decide without reading the GPU; the result must be the one the waiting decisions give. Same
subprocess runner as ``test_fbcache_comfy.py``; the waiting runs empty the holder's sampler list.
"""

from __future__ import annotations

import textwrap

import pytest
from test_fbcache_comfy import SCRIPT_PRELUDE, run_comfy_script

SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    import importlib
    holder_module = importlib.import_module(type(fbc.FBCacheHolder(0.5)).__module__)
    texts = collected_messages()
    dev = torch.device("cpu")
    report = {}
    all_samplers = holder_module.AHEAD_SAMPLERS

    def both(run, make, sampler="euler"):
        # (ahead, waiting) latents and the report lines of each
        out = {}
        for name, samplers in (("ahead", all_samplers), ("waiting", frozenset())):
            holder_module.AHEAD_SAMPLERS = samplers
            start = len(texts)
            latent = run(make(), sampler)
            out[name] = (latent, [t for t in texts[start:] if "hit rate" in t])  # the run's report
        holder_module.AHEAD_SAMPLERS = all_samplers
        return out

    for fam in ("sd15", "flux"):
        mp, *inputs = tiny_case(fam, dev)
        run = sampler_for(*inputs, steps=10)
        r = {}
        for sampler in ("euler", "dpmpp_2m", "euler_ancestral"):
            for hit in ("reuse", "taylor1", "taylor2"):
                pair = both(run, lambda: adapter.apply_first_block_cache(
                    mp, fbc.FBCacheHolder(0.5, force_pattern=[False, False, True, True], hit_residual=hit)), sampler)
                r[f"forced_{sampler}_{hit}_equal"] = bool(torch.equal(pair["ahead"][0], pair["waiting"][0]))
                r[f"forced_{sampler}_{hit}_ahead"] = any("decided ahead" in t for t in pair["ahead"][1])
                r[f"forced_{sampler}_{hit}_waiting_says_nothing"] = not any("ahead" in t for t in pair["waiting"][1])
        # a speed target: calibrate once, then the planned runs, ahead and waiting
        target = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "taylor1", target_speedup=2.0).args[0]
        run(target)
        pair = both(run, lambda: target)
        r["planned_equal"] = bool(torch.equal(pair["ahead"][0], pair["waiting"][0]))
        r["planned_ahead"] = any("Skips decided ahead" in t for t in pair["ahead"][1])
        r["planned_skips"] = any("skipped" in t and "/ 0 skipped" not in t for t in pair["ahead"][1])
        # the node's decide_ahead off: the same plan, every decision waiting for the GPU
        off = node.execute(mp, 0.1, 0.0, 1.0, 3, "tail", False, "taylor1", target_speedup=2.0,
                           decide_ahead=False).args[0]
        run(off)
        start = len(texts)
        r["switched_off_equals_waiting"] = bool(torch.equal(run(off), pair["waiting"][0]))
        r["switched_off_not_ahead"] = not any("ahead" in t for t in texts[start:] if "hit rate" in t)
        # heun calls the model twice per step: its runs never decide ahead
        heun = both(run, lambda: adapter.apply_first_block_cache(
            mp, fbc.FBCacheHolder(0.5, force_pattern=[False, True])), "heun")
        r["heun_equal"] = bool(torch.equal(heun["ahead"][0], heun["waiting"][0]))
        r["heun_not_ahead"] = not any("ahead" in t for t in heun["ahead"][1])
        report[fam] = r
    # the callback wrapper: ComfyUI's convention counts steps, any other passes through untouched
    h = fbc.FBCacheHolder(0.5, force_pattern=[False, True]).prepare(lambda p: 1.0 - p)
    guider = types.SimpleNamespace(model_options={"transformer_options": {"speedkit_fbcache": h}})
    seen = []
    args, _ = adapter._count_steps(adapter._run_holder(guider), ("sigmas", {}, lambda *a, **k: seen.append((a, k))), {})
    args[2](3, "x0", "x", 10)
    args[2](x0="x0")
    _, kw = adapter._count_steps(adapter._run_holder(guider), ("sigmas", {}), {"callback": None})
    kw["callback"](5, "x0", "x", 10)
    report["callback"] = {"steps_done": h._steps_done, "passed_on": len(seen), "kwargs_kept": seen[-1][1] == {"x0": "x0"}}
    emit_report(report)
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    return run_comfy_script(SCRIPT)


def test_the_step_counting_callback_passes_every_call_on(report):
    assert report["data"]["callback"] == {"steps_done": 6, "passed_on": 2, "kwargs_kept": True}


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_decided_ahead_equals_waiting_in_comfy(report, family):
    r = report["data"][family]
    failed = [k for k, v in r.items() if v is not True]
    assert not failed, (failed, r)
