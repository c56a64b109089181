"""First Block Cache on ComfyUI's own DiT classes: SD3, HunyuanVideo, Wan 2.x, LTXV, Qwen-Image, Flux.

Each family's diffusion model is built from ComfyUI's classes (``comfy.supported_models`` ->
``comfy.ldm...``) with a tiny config (2-3 blocks, hidden size 64-128) and explicitly initialised
random weights, patched with the node's adapter and sampled through ``comfy.sample.sample``
(what KSampler calls) on CPU. AuraFlow stands in for a family without first-block hooks, and a
tiny SD1.5 UNet with a real ``comfy.controlnet.ControlNet`` checks the ControlNet rule. Same
subprocess runner as ``test_fbcache_comfy.py``.
"""

from __future__ import annotations

import textwrap

import pytest
from test_fbcache_comfy import SCRIPT_PRELUDE, run_comfy_script

DIT_FAMILIES = {
    # family: (class of the diffusion model, hook description in the attach log line)
    "sd3": ("OpenAISignatureMMDITWrapper", "2 double_blocks"),
    "hunyuan_video": ("HunyuanVideo", "2 double_blocks, 2 single_blocks"),
    "wan": ("WanModel", "3 double_blocks"),
    "ltxv": ("LTXVModel", "3 double_blocks"),
    "qwen_image": ("QwenImageTransformer2DModel", "3 double_blocks"),
    # also in test_fbcache_comfy.py; here for the real-threshold checks (its blocks update in place)
    "flux": ("Flux", "2 double_blocks, 2 single_blocks"),
}

SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    import comfy.model_patcher, comfy.supported_models as sm
    F32, dev = torch.float32, torch.device("cpu")

    def patcher(mc):
        mc.set_inference_dtype(F32, None)
        model = mc.get_model({}, "", device=dev)
        fm.init_weights(model.diffusion_model)
        # SD3's MMDiT keeps pos_embed in a torch.empty buffer that only a checkpoint fills: give it values
        buffers = dict(model.diffusion_model.named_buffers())
        if "pos_embed" in buffers:
            with torch.no_grad():
                buffers["pos_embed"].copy_(0.02 * torch.randn(buffers["pos_embed"].shape, generator=torch.Generator().manual_seed(5)))
        model.diffusion_model.to(dtype=F32)
        return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)

    def cond(ctx_shape, **extra):
        g = torch.Generator().manual_seed(1)
        def one():
            e = {k: (torch.randn(v, generator=g) if isinstance(v, tuple) else v) for k, v in extra.items()}
            return [[torch.randn(ctx_shape, generator=g), e]]
        return one(), one()

    FAMILIES = {
        "sd3": lambda: (sm.SD3({"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2,
            "input_size": None, "adm_in_channels": 16, "num_patches": 64, "pos_embed_max_size": 8,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [], "dtype": F32}),
            (1, 16, 16, 16), cond((1, 8, 32), pooled_output=(1, 16))),
        "hunyuan_video": lambda: (sm.HunyuanVideo({"image_model": "hunyuan_video", "in_channels": 16,
            "patch_size": [1, 2, 2], "out_channels": 16, "vec_in_dim": 16, "axes_dim": [4, 6, 6], "meanflow": False,
            "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2,
            "depth_single_blocks": 2, "theta": 256, "qkv_bias": True, "byt5": False, "guidance_embed": True,
            "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False, "dtype": F32}),
            (1, 16, 3, 8, 8), cond((1, 8, 32), pooled_output=(1, 16), guidance=6.0)),
        "wan": lambda: (sm.WAN21_T2V({"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2),
            "in_dim": 16, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 4,
            "num_layers": 3, "dtype": F32}),
            (1, 16, 3, 8, 8), cond((1, 8, 32))),
        "ltxv": lambda: (sm.LTXV({"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64,
            "attention_head_dim": 16, "num_attention_heads": 4, "caption_channels": 32, "num_layers": 3, "dtype": F32}),
            (1, 128, 2, 4, 4), cond((1, 8, 32), frame_rate=25, attention_mask=torch.ones(1, 8, dtype=torch.long))),
        "qwen_image": lambda: (sm.QwenImage({"image_model": "qwen_image", "in_channels": 64, "out_channels": 16,
            "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
            "axes_dims_rope": (4, 6, 6), "dtype": F32}),
            (1, 16, 1, 16, 16), cond((1, 8, 32))),
        "wan_vace": lambda: (sm.WAN21_Vace({"image_model": "wan2.1", "model_type": "vace", "patch_size": (1, 2, 2),
            "in_dim": 16, "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 4,
            "num_layers": 4, "vace_layers": 2, "vace_in_dim": 96, "dtype": F32}),
            (1, 16, 3, 8, 8), cond((1, 8, 32))),
        "flux": lambda: (sm.Flux(fm.flux_config(True, F32)), (1, 16, 16, 16),
            fm.conditioning("flux", True, 1, dev, 128, 128)),
        "auraflow": lambda: (sm.AuraFlow({"cond_seq_dim": 32, "in_channels": 4, "out_channels": 4, "patch_size": 2,
            "dim": 64, "n_layers": 3, "n_double_layers": 1, "n_heads": 2, "global_conddim": 64, "max_seq": 64, "dtype": F32}),
            (1, 4, 16, 16), cond((1, 8, 32))),
    }

    class Decisions(logging.Handler):
        # verbose=True makes the holder log "sigma=%s diffs=%s -> %s" for every model call
        def __init__(self):
            super().__init__()
            self.diffs, self.decisions = [], []
        def emit(self, record):
            if record.msg.startswith("First Block Cache: sigma="):
                self.diffs.extend(d for d in record.args[1] if d is not None)
                self.decisions.append(record.args[2])

    def counted(fn):
        h = Decisions()
        lg = logging.getLogger("speedkit.fbcache.holder")
        lg.addHandler(h)
        try:
            out = fn()
        finally:
            lg.removeHandler(h)
        return out, h

    def forced(mp, pattern, mode="tail"):
        return adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, cache_mode=mode, force_pattern=pattern))

    report = {}
    for fam in FAMILIES:
        mc, shape, (pos, neg) = FAMILIES[fam]()
        mp = patcher(mc)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))

        def run(m, sampler="euler", steps=6):
            return comfy.sample.sample(m, noise, steps, 4.0, sampler, "simple", pos, neg, torch.zeros_like(noise),
                                       seed=0, disable_pbar=True)

        base = run(mp)
        half_tail = run(forced(mp, [False, True]))
        half_block = run(forced(mp, [False, True], "per_block"))
        (low, low_log) = counted(lambda: run(node.execute(mp, 1.5, 0.0, 1.0, 2, "tail", True).args[0], steps=8))
        (tiny, tiny_log) = counted(lambda: run(adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(1e-9))))
        report[fam] = {
            "class": type(mp.model.diffusion_model).__name__,
            "base_finite": bool(torch.isfinite(base).all()),
            "threshold0_is_input": node.execute(mp, 0.0).args[0] is mp,
            "threshold0_identical": bool(torch.equal(run(node.execute(mp, 0.0).args[0]), base)),
            "all_computed_identical": bool(torch.equal(run(forced(mp, [False])), base)),
            "tiny_threshold_identical": bool(torch.equal(tiny, base)),
            "tiny_threshold_skips": tiny_log.decisions.count("skip"),
            "half_finite": bool(torch.isfinite(half_tail).all() and torch.isfinite(half_block).all()),
            "half_differs": not bool(torch.equal(half_tail, base)),
            "half_tail_vs_per_block": float((half_tail - half_block).abs().max()),
            "half_vs_base": float((half_tail - base).abs().max()),
            "scale": float(base.abs().max()),
            "low_finite": bool(torch.isfinite(low).all()),
            "low_skips": low_log.decisions.count("skip"),
            "low_computes": low_log.decisions.count("compute"),
            "low_diffs": low_log.diffs,
            "base_again_identical": bool(torch.equal(run(mp), base)),
        }
    emit_report(report)
    """
)

CONTROLNET_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    import comfy.cldm.cldm, comfy.controlnet
    dev = torch.device("cpu")
    mp = fm.build_patcher("sd15", True, dev)
    cfg = dict(mp.model.model_config.unet_config)
    cfg.pop("out_channels", None)
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, device=dev, **cfg)
    fm.init_weights(control_model, seed=3)
    control_model.to(dtype=torch.float32)
    cnet = comfy.controlnet.ControlNet(control_model, load_device=dev)
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pos0, neg0 = fm.conditioning("sd15", True, 1, dev, 128, 128)

    def with_control(conds, rng):
        c_net = cnet.copy().set_cond_hint(hint, 1.0, rng)
        return [[t, dict(d, control=c_net, control_apply_to_uncond=False)] for t, d in conds]

    def run(m, rng, steps=6):
        return comfy.sample.sample(m, noise, steps, 4.0, "euler", "normal", with_control(pos0, rng),
                                   with_control(neg0, rng), torch.zeros_like(noise), seed=0, disable_pbar=True)

    def half():
        return adapter.apply_first_block_cache(mp, fbc.FBCacheHolder(0.5, force_pattern=[False, True]))

    full = run(mp, (0.0, 1.0))
    early = run(mp, (0.0, 0.5))
    report = {
        "control_changes_output": not bool(torch.equal(full, run(mp, (0.0, 0.0)))),
        "full_range_cached_identical": bool(torch.equal(run(half(), (0.0, 1.0)), full)),
        "early_range_cached_finite": bool(torch.isfinite(run(half(), (0.0, 0.5))).all()),
        "early_range_cached_differs": not bool(torch.equal(run(half(), (0.0, 0.5)), early)),
    }
    emit_report(report)
    """
)


@pytest.fixture(scope="module")
def families() -> dict:
    return run_comfy_script(SCRIPT)


@pytest.fixture(scope="module")
def controlnet() -> dict:
    return run_comfy_script(CONTROLNET_SCRIPT)


ALL = [*DIT_FAMILIES, "wan_vace", "auraflow"]


@pytest.mark.parametrize("family", ALL)
def test_no_op_and_all_computed_are_bit_identical(families, family):
    r = families["data"][family]
    assert r["base_finite"]
    assert r["threshold0_is_input"] and r["threshold0_identical"]
    assert r["all_computed_identical"]  # every hook ran, every call computed
    assert r["tiny_threshold_identical"] and r["tiny_threshold_skips"] == 0  # real threshold path, no hit
    assert r["base_again_identical"]  # nothing left on the unpatched model


@pytest.mark.parametrize("family", list(DIT_FAMILIES))
def test_dit_family_is_block_hooked(families, family):
    cls, stacks = DIT_FAMILIES[family]
    assert families["data"][family]["class"] == cls
    assert f"First Block Cache attached to {cls}: {stacks}, tail residuals" in families["log"]


@pytest.mark.parametrize("family", ALL)
def test_forced_hits_stay_finite_and_modes_agree(families, family):
    r = families["data"][family]
    assert r["half_finite"] and r["half_differs"]
    # tail and per_block are the same sum of residuals: equal up to float rounding
    assert r["half_tail_vs_per_block"] <= 1e-4 * max(r["scale"], 1.0), r


@pytest.mark.parametrize("family", ALL)
def test_threshold_run_measures_real_changes_and_skips(families, family):
    r = families["data"][family]
    assert r["low_finite"]
    assert r["low_skips"] >= 1 and r["low_computes"] >= 2, r
    # every measured first-block change is a real, positive number (not input - input = 0)
    assert r["low_diffs"] and all(d > 1e-6 for d in r["low_diffs"]), r["low_diffs"]


def test_in_place_blocks_are_detected(families):
    # LTXV's blocks and Flux's/HunyuanVideo's (comfy.ldm.flux.layers) add into their input tensor
    assert families["log"].count("block double_block 0 updates its input in place") >= 3


def test_unsupported_family_falls_back_to_whole_steps_with_a_clear_message(families):
    assert families["data"]["auraflow"]["class"] == "MMDiT"
    log = families["log"]
    assert "MMDiT is not a family with first-block hooks" in log
    assert "so whole model steps are skipped" in log
    assert "First Block Cache attached to MMDiT: whole-step skip" in log


def test_unet_with_controlnet_is_computed_while_the_controlnet_is_active(controlnet):
    r = controlnet["data"]
    assert r["control_changes_output"]  # the ControlNet really acts on this model
    assert r["full_range_cached_identical"]  # every call had control: all computed, bit-identical
    assert r["early_range_cached_finite"] and r["early_range_cached_differs"]  # skips after the range
    log = controlnet["log"]
    assert log.count("ControlNet/T2I-Adapter residuals are present") == 3  # once per cached run
    assert "model calls computed in full because ControlNet was active" in log


def test_wan_vace_uses_per_block_residuals(families):
    # VACE adds hints between blocks: a tail residual would carry the reference step's hints
    assert families["data"]["wan_vace"]["class"] == "VaceWanModel"
    log = families["log"]
    assert "VaceWanModel: VACE adds its hints between blocks, so per_block residuals are used" in log
    assert "First Block Cache attached to VaceWanModel: 4 double_blocks, per_block residuals" in log
    assert "attached to VaceWanModel: 4 double_blocks, tail residuals" not in log
