"""First Block Cache core, CPU, no ComfyUI: holder decisions and the UNet/DiT/step hooks.

The stand-in networks below drive the hooks exactly the way ComfyUI's ``UNetModel._forward``
(``input_block_patch`` after every input block, ``out`` at the end, a DIFFUSION_MODEL wrapper
around it) and Flux's ``forward_orig`` (``patches_replace["dit"][(kind, i)]`` around double
and single blocks, ``cat(txt, img)`` in between) do.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from speedkit.fbcache import (
    HOLDER_KEY,
    FBCacheHolder,
    make_block_replacement,
    resolve_family,
    step_apply_model_wrapper,
    unet_diffusion_wrapper,
    unet_input_block_patch,
)

# ------------------------------------------------------------------------------------ stand-ins


class _Executor:
    """Calls ``fn`` like ComfyUI's WrapperExecutor: ``executor(*args)`` and ``executor.class_obj``."""

    def __init__(self, fn, class_obj):
        self.fn, self.class_obj = fn, class_obj

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _apply_control(h, control, name):
    """ComfyUI's order: each block takes the last entry of ``control[name]`` (None = nothing to add)."""
    if control is not None and control.get(name):
        add = control[name].pop()
        if add is not None:
            h = h + add
    return h


class UNetModel(nn.Module):
    """Conv in, ResBlock-like block, downsample, deep block, upsample output blocks with skip concat, out."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList(
            [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)]
        )
        self.middle_block = nn.Conv2d(8, 8, 3, padding=1)
        self.output_blocks = nn.ModuleList([nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)])
        self.out = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
        self.calls = {"middle": 0}
        self.scale = 2  # upsampling before the output blocks (undoes input block 2's stride)

    def _forward(self, x, t, context, y, control, transformer_options):
        hs, h = [], x
        patches = transformer_options.get("patches", {})
        for i, block in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", i)
            h = block(h) if i != 1 else h + torch.tanh(block(h) + t.view(-1, 1, 1, 1))
            h = _apply_control(h, control, "input")
            for p in patches.get("input_block_patch", []):
                h = p(h, transformer_options)
            hs.append(h)
        self.calls["middle"] += 1
        h = _apply_control(self.middle_block(h), control, "middle")
        if self.scale != 1:
            h = nn.functional.interpolate(h, scale_factor=self.scale)
        hs.pop()
        for block in self.output_blocks:
            h = block(torch.cat([h, _apply_control(hs.pop(), control, "output")], 1))
        return self.out(h)

    def forward(self, x, t, transformer_options, wrapper=None, control=None):
        args = (x, t, None, None, control, transformer_options)
        if wrapper is None:
            return self._forward(*args)
        return wrapper(_Executor(self._forward, self), *args)


class Flux(nn.Module):
    """Double blocks on (img, txt), then single blocks on cat(txt, img), as in Flux's forward_orig."""

    def __init__(self, double=3, single=3, dim=8):
        super().__init__()
        self.double_blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(double)])
        self.double_txt = nn.ModuleList([nn.Linear(dim, dim) for _ in range(double)])
        self.single_blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(single)])
        self.final = nn.Linear(dim, dim)

    def forward(self, img, txt, vec, transformer_options, control=None):
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, (bi, bt) in enumerate(zip(self.double_blocks, self.double_txt, strict=True)):

            def wrap(a, bi=bi, bt=bt):
                return {
                    "img": a["img"] + torch.tanh(bi(a["img"]) + a["vec"]),
                    "txt": a["txt"] + torch.tanh(bt(a["txt"])),
                }

            args = {"img": img, "txt": txt, "vec": vec, "transformer_options": transformer_options}
            out = (
                replace[("double_block", i)](args, {"original_block": wrap})
                if ("double_block", i) in replace
                else wrap(args)
            )
            img, txt = out["img"], out["txt"]
            if control is not None:
                img = img + control[i]
        x = torch.cat([txt, img], 1)
        for i, b in enumerate(self.single_blocks):

            def wrap1(a, b=b):
                return {"img": a["img"] + torch.tanh(b(a["img"]) + a["vec"])}

            args = {"img": x, "vec": vec, "transformer_options": transformer_options}
            x = (
                replace[("single_block", i)](args, {"original_block": wrap1})
                if ("single_block", i) in replace
                else wrap1(args)
            )["img"]
        return self.final(x[:, txt.shape[1] :])


STACKS = (("double_block", 3), ("single_block", 3))


def dit_options(holder, stacks=STACKS, previous=None):
    replace = {
        (k, i): make_block_replacement(k, i, stacks, (previous or {}).get((k, i))) for k, n in stacks for i in range(n)
    }
    return {HOLDER_KEY: holder, "patches_replace": {"dit": replace}}


def call_options(base, sigma, cond_or_uncond=(0,), uuids=None):
    to = dict(base)
    to["sigmas"] = torch.full((len(cond_or_uncond),), float(sigma))
    to["cond_or_uncond"] = list(cond_or_uncond)
    to["uuids"] = list(uuids) if uuids is not None else [f"u{c}" for c in cond_or_uncond]
    return to


def active(holder, percent_to_sigma=None):
    return holder.prepare(percent_to_sigma or (lambda p: math.inf if p <= 0 else (0.0 if p >= 1 else 10 * (1 - p))))


SIGMAS = [9.0, 7.0, 5.0, 3.5, 2.0, 1.0]


def run_flux(model, holder, img, txt, sigmas=SIGMAS, drift=0.02, control=None):
    outs = []
    to = dit_options(holder) if holder is not None else {}
    for k, s in enumerate(sigmas):
        vec = torch.full((1, 1, img.shape[-1]), s / 10)
        outs.append(model(img + drift * k, txt, vec, call_options(to, s), control))
    return outs


@pytest.fixture
def flux():
    torch.manual_seed(0)
    return Flux().eval()


@pytest.fixture
def flux_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 6, 8, generator=g), torch.randn(1, 2, 8, generator=g)


# ------------------------------------------------------------------------------------ no-op and formulas


@torch.no_grad()
def test_threshold_zero_is_bit_identical(flux, flux_inputs):
    base = run_flux(flux, None, *flux_inputs)
    holder = active(FBCacheHolder(0.0))
    cached = run_flux(flux, holder, *flux_inputs, drift=0.0)  # identical inputs: distance 0, still no hit
    base0 = run_flux(flux, None, *flux_inputs, drift=0.0)
    assert all(torch.equal(a, b) for a, b in zip(cached, base0, strict=True))
    assert holder.summary()["skipped"] == 0 and len(base) == len(cached)


@torch.no_grad()
def test_all_computed_schedule_is_bit_identical_and_counts(flux, flux_inputs):
    base = run_flux(flux, None, *flux_inputs)
    holder = active(FBCacheHolder(0.5, force_pattern=[False]))
    out = run_flux(flux, holder, *flux_inputs)
    assert all(torch.equal(a, b) for a, b in zip(out, base, strict=True))
    assert holder.summary()["computed"] == len(SIGMAS)


def _manual_flux_hit(model, img, txt, vec, ref_trace):
    """Expected hit output: block 0 computed, cached residuals added back (both modes)."""
    a = model.double_blocks[0]
    img0 = img + torch.tanh(a(img) + vec)
    txt0 = txt + torch.tanh(model.double_txt[0](txt))
    img_d = img0 + ref_trace["d_img"]
    txt_d = txt0 + ref_trace["d_txt"]
    x = torch.cat([txt_d, img_d], 1) + ref_trace["s"]
    return model.final(x[:, txt.shape[1] :])


def _trace_flux(model, img, txt, vec):
    """Residuals of double blocks 1.. (img, txt) and of all single blocks, from one computed call."""
    i, t = img, txt
    i = i + torch.tanh(model.double_blocks[0](i) + vec)
    t = t + torch.tanh(model.double_txt[0](t))
    i1, t1 = i, t
    for bi, bt in zip(model.double_blocks[1:], model.double_txt[1:], strict=True):
        i, t = i + torch.tanh(bi(i) + vec), t + torch.tanh(bt(t))
    x0 = torch.cat([t, i], 1)
    x = x0
    for b in model.single_blocks:
        x = x + torch.tanh(b(x) + vec)
    return {"d_img": i - i1, "d_txt": t - t1, "s": x - x0}


@pytest.mark.parametrize("mode", ["tail", "per_block"])
@torch.no_grad()
def test_injection_formula_exact_under_forced_hits(flux, flux_inputs, mode):
    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, cache_mode=mode, force_pattern=[False, True]))
    outs = run_flux(flux, holder, img, txt)
    for k in range(1, len(SIGMAS), 2):  # hit calls reuse the residuals of call k-1
        vec_ref = torch.full((1, 1, 8), SIGMAS[k - 1] / 10)
        vec = torch.full((1, 1, 8), SIGMAS[k] / 10)
        trace = _trace_flux(flux, img + 0.02 * (k - 1), txt, vec_ref)
        expected = _manual_flux_hit(flux, img + 0.02 * k, txt, vec, trace)
        torch.testing.assert_close(outs[k], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(outs[k], outs[k - 1])  # block 0 really ran on the new input
    assert holder.summary()["skipped"] == len(SIGMAS) // 2


@torch.no_grad()
def test_per_block_applies_current_controlnet_residuals_on_hits(flux, flux_inputs):
    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, cache_mode="per_block", force_pattern=[False, True]))
    to = dit_options(holder)
    controls = [[torch.full((1, 6, 8), 0.1 * (k + 1) * (i + 1)) for i in range(3)] for k in range(2)]
    vecs = [torch.full((1, 1, 8), s / 10) for s in SIGMAS[:2]]
    flux(img, txt, vecs[0], call_options(to, SIGMAS[0]), controls[0])
    hit = flux(img, txt, vecs[1], call_options(to, SIGMAS[1]), controls[1])
    # expected: block 0 computed, + c0(now); every later double block: in + own residual (ref) + c_i(now)
    i, t = img, txt
    ref_res = []
    i = i + torch.tanh(flux.double_blocks[0](i) + vecs[0]) + controls[0][0]
    t = t + torch.tanh(flux.double_txt[0](t))
    for n in (1, 2):
        ni, nt = i + torch.tanh(flux.double_blocks[n](i) + vecs[0]), t + torch.tanh(flux.double_txt[n](t))
        ref_res.append((ni - i, nt - t))
        i, t = ni + controls[0][n], nt
    x = torch.cat([t, i], 1)
    single_res = []
    for b in flux.single_blocks:
        nx = x + torch.tanh(b(x) + vecs[0])
        single_res.append(nx - x)
        x = nx
    i = img + torch.tanh(flux.double_blocks[0](img) + vecs[1]) + controls[1][0]
    t = txt + torch.tanh(flux.double_txt[0](txt))
    for n in (1, 2):
        i, t = i + ref_res[n - 1][0] + controls[1][n], t + ref_res[n - 1][1]
    x = torch.cat([t, i], 1)
    for r in single_res:
        x = x + r
    torch.testing.assert_close(hit, flux.final(x[:, 2:]), rtol=1e-5, atol=1e-5)


def test_controlnet_switches_tail_to_per_block_for_the_run():
    from speedkit.fbcache import dit_diffusion_wrapper

    holder = active(FBCacheHolder(0.5, cache_mode="tail"))
    to = {HOLDER_KEY: holder}
    ran = []
    executor = _Executor(lambda *a, **k: ran.append(1) or "out", None)
    # APPLY_MODEL order: x, t, c_concat, c_crossattn, control, transformer_options
    assert dit_diffusion_wrapper(executor, "x", "t", None, "ctx", None, to) == "out"
    dit_diffusion_wrapper(executor, "x", "t", None, "ctx", {"input": [], "output": [None]}, to)  # adds nothing
    assert holder.cache_mode == "tail"
    dit_diffusion_wrapper(executor, "x", "t", None, "ctx", {"input": [torch.ones(1)], "output": []}, to)
    assert holder.cache_mode == "per_block" and len(ran) == 3


class _UNetRun:
    def __init__(self, holder):
        self.holder = holder
        self.to = {HOLDER_KEY: holder, "patches": {"input_block_patch": [unet_input_block_patch]}} if holder else {}

    def __call__(self, model, x, sigma, keys=(0,), control=None):
        to = call_options(self.to, sigma, keys)
        t = torch.full((x.shape[0],), sigma / 10)
        return model(x, t, to, unet_diffusion_wrapper if self.holder else None, control)


def _lerp_trace(t0: dict, t1: dict, w: float) -> dict:
    return {k: t1[k] + w * (t1[k] - t0[k]) for k in t1}


@pytest.mark.parametrize("mode", ["tail", "per_block"])
@torch.no_grad()
def test_extrapolated_hit_residual_formula(flux, flux_inputs, mode):
    """hit_residual="extrapolate": a hit adds r1 + w (r1 - r0) of the last two computed calls,
    w = (sigma - s1) / (s1 - s0); the first block still runs on the new input."""
    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, cache_mode=mode, force_pattern=[False, False, True], hit_residual="extrapolate"))
    outs = run_flux(flux, holder, img, txt)
    reuse = active(FBCacheHolder(0.5, cache_mode=mode, force_pattern=[False, False, True]))
    outs_reuse = run_flux(flux, reuse, img, txt)
    for k in (2, 5):  # hits; calls k-2 and k-1 computed
        traces = []
        for c in (k - 2, k - 1):
            vec_c = torch.full((1, 1, 8), SIGMAS[c] / 10)
            traces.append(_trace_flux(flux, img + 0.02 * c, txt, vec_c))
        w = (SIGMAS[k] - SIGMAS[k - 1]) / (SIGMAS[k - 1] - SIGMAS[k - 2])
        vec = torch.full((1, 1, 8), SIGMAS[k] / 10)
        expected = _manual_flux_hit(flux, img + 0.02 * k, txt, vec, _lerp_trace(traces[0], traces[1], w))
        torch.testing.assert_close(outs[k], expected, rtol=1e-5, atol=1e-5)
        plain = _manual_flux_hit(flux, img + 0.02 * k, txt, vec, traces[1])
        torch.testing.assert_close(outs_reuse[k], plain, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(outs[k], outs_reuse[k])  # the prediction really differs from reuse
    assert holder.summary()["skipped"] == 2


def test_extrapolation_weight_is_clamped_and_needs_two_computed_calls():
    from speedkit.fbcache.holder import MAX_EXTRAPOLATION

    holder = active(FBCacheHolder(0.5, force_pattern=[False, True], hit_residual="extrapolate"))
    r0, r1 = torch.zeros(1, 4), torch.ones(1, 4)

    def computed(sigma, r):
        holder.begin_call({"cond_or_uncond": [0], "sigmas": torch.tensor([sigma])})
        holder.call.sigma_value = sigma
        holder.store("tail", {"h": r, "none": None})

    def hit(sigma):
        holder.begin_call({"cond_or_uncond": [0], "sigmas": torch.tensor([sigma])})
        holder.call.sigma_value = sigma
        return holder.cached("tail")

    computed(10.0, r0)
    assert torch.equal(hit(9.0)["h"], r0)  # one computed call: nothing to extrapolate from
    computed(9.0, r1)
    assert torch.equal(hit(8.5)["h"], torch.full((1, 4), 1.5))  # w = 0.5
    assert torch.equal(hit(0.0)["h"], torch.full((1, 4), 1.0 + MAX_EXTRAPOLATION))  # w = 9 clamped
    assert torch.equal(hit(9.5)["h"], r1)  # sigma back above s1: w < 0 clamped to 0
    assert hit(8.0)["none"] is None
    assert holder.memory_bytes() == 2 * r1.untyped_storage().nbytes()

    plain = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    for sigma, r in ((10.0, r0), (9.0, r1)):
        plain.begin_call({"cond_or_uncond": [0]})
        plain.call.sigma_value = sigma
        plain.store("tail", {"h": r})
    plain.call.sigma_value = 8.0
    assert plain.cached("tail")["h"] is r1
    assert plain.memory_bytes() == r1.untyped_storage().nbytes()  # reuse keeps no older residual


def test_hit_residual_is_validated():
    with pytest.raises(ValueError, match="hit_residual"):
        FBCacheHolder(0.1, hit_residual="quadratic")


@torch.no_grad()
def test_unet_tail_injection_formula_and_skip():
    torch.manual_seed(0)
    model = UNetModel().eval()
    x = torch.randn(1, 4, 8, 8)
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    run = _UNetRun(holder)
    out0 = run(model, x, 5.0)
    assert model.calls["middle"] == 1
    x1 = x * 0.9
    out1 = run(model, x1, 4.0)
    assert model.calls["middle"] == 1  # the deep part was skipped
    # expected: out(h1(x1) + (h_final(x) - h1(x)))

    def h1_of(inp, sigma):
        h0 = model.input_blocks[0](inp)
        return h0 + torch.tanh(model.input_blocks[1](h0) + sigma / 10)

    captured = {}
    handle = model.out.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    ref = model(x, torch.full((1,), 0.5), {})
    handle.remove()
    torch.testing.assert_close(ref, out0)
    expected = model.out(h1_of(x1, 4.0) + (captured["h"] - h1_of(x, 5.0)))
    torch.testing.assert_close(out1, expected, rtol=1e-5, atol=1e-5)
    # no hook left behind on the shared module
    assert not model.out._forward_pre_hooks


@torch.no_grad()
def test_unet_all_computed_identical_and_patch_order_respected():
    torch.manual_seed(0)
    model = UNetModel().eval()
    x = torch.randn(2, 4, 8, 8)
    seen = []

    def other_patch(h, to):
        seen.append(to["block"])
        return h * 1.0

    holder = active(FBCacheHolder(0.5, force_pattern=[False]))
    run = _UNetRun(holder)
    run.to["patches"]["input_block_patch"] = [other_patch, unet_input_block_patch]
    base = model(x, torch.full((2,), 0.5), {})
    out = run(model, x, 5.0, keys=(0, 1))
    assert torch.equal(base, out)
    assert seen == [("input", 0), ("input", 1), ("input", 2)]


# ------------------------------------------------------------------------------------ holder semantics


def _decide(holder, r, sigma, keys=(0,)):
    holder.begin_call(call_options({}, sigma, keys))
    hit = holder.decide(r)
    if not hit:
        holder.finish_compute()
    holder.end_call()
    return hit


def test_reference_updated_on_computed_steps_only():
    holder = active(FBCacheHolder(0.15))
    base = torch.ones(1, 4, 4)
    assert not _decide(holder, base, 9)  # no reference yet
    assert _decide(holder, base * 1.1, 8)  # 10 % from the reference: hit, reference stays
    assert not _decide(holder, base * 1.2, 7)  # 20 % from the *computed* reference, not 9 % from the last call
    assert holder.stats["u0"].diffs == pytest.approx([0.1, 0.2], rel=1e-5)
    assert _decide(holder, base * 1.3, 6)  # reference is now 1.2: 8 %
    assert holder.stats["u0"].diffs[-1] == pytest.approx(0.1 / 1.2, rel=1e-5)


def test_cond_and_uncond_keep_separate_state_batched_or_not():
    holder = active(FBCacheHolder(0.15))
    cond, uncond = torch.ones(1, 4, 4), torch.full((1, 4, 4), -2.0)
    assert not _decide(holder, torch.cat([cond, uncond]), 9, keys=(0, 1))
    # batched: the uncond half changed a lot -> whole call computed
    assert not _decide(holder, torch.cat([cond * 1.05, uncond * 1.5]), 8, keys=(0, 1))
    s = holder.summary()["per_conditioning"]
    assert s["cond"] == {"computed": 2, "skipped": 0} and s["uncond"] == {"computed": 2, "skipped": 0}
    # separate calls (low VRAM): cond alone may hit while uncond computes
    assert _decide(holder, cond * 1.06, 7, keys=(0,)) is False  # its composition (cond alone) has no residuals yet
    assert _decide(holder, cond * 1.07, 6, keys=(0,))
    assert not _decide(holder, uncond * 2.5, 6, keys=(1,))
    s = holder.summary()["per_conditioning"]
    assert s["cond"]["skipped"] == 1 and s["uncond"]["skipped"] == 0


def test_two_calls_per_step_heun_do_not_reset():
    holder = active(FBCacheHolder(0.15))
    r = torch.ones(1, 4, 4)
    sig = [9, 7, 7, 5, 5, 3]  # heun: every sigma but the first is evaluated twice
    hits = [_decide(holder, r * (1 + 0.01 * i), s) for i, s in enumerate(sig)]
    assert holder.resets == 0
    assert hits == [False, True, True, True, True, True]
    assert holder.stats["u0"].total == len(sig)


def test_sigma_increase_and_shape_change_reset_the_cache():
    holder = active(FBCacheHolder(0.15))
    r = torch.ones(1, 4, 4)
    assert not _decide(holder, r, 9)
    assert _decide(holder, r, 8)
    assert not _decide(holder, r, 9.5)  # sigma went up: a new trajectory, identical residual or not
    assert holder.resets == 1
    assert _decide(holder, r, 9)
    assert not _decide(holder, torch.ones(1, 4, 6), 8)  # resolution changed
    assert not _decide(holder, r.double(), 7)  # dtype changed
    assert holder.resets == 3


def test_clone_and_reset_drop_all_state():
    holder = active(FBCacheHolder(0.15, start_percent=0.1, end_percent=0.9, max_consecutive_hits=3))
    _decide(holder, torch.ones(1, 4, 4), 9)
    fresh = holder.clone()
    assert fresh.summary()["computed"] == 0 and not fresh.active and fresh.memory_bytes() == 0
    assert (fresh.threshold, fresh.start_percent, fresh.end_percent, fresh.max_consecutive_hits) == (0.15, 0.1, 0.9, 3)
    assert holder.memory_bytes() > 0
    holder.reset()
    assert holder.memory_bytes() == 0 and holder.summary()["computed"] == 0


def test_max_consecutive_hits():
    holder = active(FBCacheHolder(0.5, max_consecutive_hits=2))
    r = torch.ones(1, 4, 4)
    hits = [_decide(holder, r, 9 - i) for i in range(8)]
    assert hits == [False, True, True, False, True, True, False, True]


def test_start_end_window_in_sigma():
    # percent_to_sigma of a linear schedule 10 -> 0: start 0.3 -> 7, end 0.7 -> 3
    holder = active(FBCacheHolder(0.5, start_percent=0.3, end_percent=0.7))
    assert holder.start_sigma == pytest.approx(7.0) and holder.end_sigma == pytest.approx(3.0)
    r = torch.ones(1, 4, 4)
    hits = [_decide(holder, r, s) for s in (9, 8, 7, 5, 3.5, 3, 2)]
    assert hits == [False, False, True, True, True, False, False]


def test_one_host_sync_per_call(monkeypatch):
    holder = active(FBCacheHolder(0.15))
    r = torch.ones(2, 4, 4)
    _decide(holder, r, 9, keys=(0, 1))
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("unexpected .item() sync"))
    _decide(holder, r * 1.01, 8, keys=(0, 1))
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"residual_diff_threshold": -0.1}, "residual_diff_threshold"),
        ({"residual_diff_threshold": float("nan")}, "residual_diff_threshold"),
        ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent=0.8 is after end_percent=0.2"),
        ({"max_consecutive_hits": -2}, "max_consecutive_hits"),
        ({"cache_mode": "everything"}, "cache_mode"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, match):
    settings = {
        "residual_diff_threshold": 0.1,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "max_consecutive_hits": -1,
        "cache_mode": "tail",
    }
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FBCacheHolder(**settings)


# ------------------------------------------------------------------------------------ families and step mode


def test_family_resolution():
    assert resolve_family(UNetModel()).kind == "unet"
    fam = resolve_family(Flux())
    assert fam.kind == "dit" and fam.stacks == STACKS

    class WanModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)] * 4)

    class VaceWanModel(WanModel):
        pass

    vace = resolve_family(VaceWanModel())
    assert vace.stacks == (("double_block", 4),) and vace.per_block_only and "VACE" in vace.reason
    assert not resolve_family(WanModel()).per_block_only

    class Lumina(nn.Module):
        pass

    unknown = resolve_family(Lumina())
    assert unknown.kind == "step" and "Lumina" in unknown.reason
    nunchaku_cls = type("ComfyFluxWrapper", (nn.Module,), {"__module__": "nunchaku_wrappers.flux"})
    assert resolve_family(nunchaku_cls()).kind == "step"
    qwen_wrapper = type("ComfyQwenImageWrapper", (nn.Module,), {"__module__": "custom_nodes.some_pack.wrappers"})
    assert "ignores ComfyUI's block hooks" in resolve_family(qwen_wrapper()).reason
    with pytest.raises(ValueError, match="not a torch module"):
        resolve_family(object())


@torch.no_grad()
def test_step_mode_reuses_noise_prediction():
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    eps_model = {"n": 0}

    def apply_model(x, sigma, *_rest, **_kw):
        eps_model["n"] += 1
        return x - sigma.view(-1, 1, 1, 1) * torch.tanh(x)  # denoised = x - sigma * eps(x)

    executor = _Executor(apply_model, None)
    x0 = torch.randn(1, 4, 4, 4)
    to = {HOLDER_KEY: holder}
    out0 = step_apply_model_wrapper(executor, x0, torch.tensor([5.0]), None, None, None, call_options(to, 5.0))
    x1 = x0 * 0.8
    out1 = step_apply_model_wrapper(executor, x1, torch.tensor([4.0]), None, None, None, call_options(to, 4.0))
    assert eps_model["n"] == 1
    torch.testing.assert_close(out0, apply_model(x0, torch.tensor([5.0])))
    torch.testing.assert_close(out1, x1 - 4.0 * torch.tanh(x0), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_inactive_holder_changes_nothing(flux, flux_inputs):
    """A holder that no sampling run prepared (template on the patcher) must not cache."""
    holder = FBCacheHolder(0.5, force_pattern=[False, True])
    outs = run_flux(flux, holder, *flux_inputs)
    base = run_flux(flux, None, *flux_inputs)
    assert all(torch.equal(a, b) for a, b in zip(outs, base, strict=True))
    assert holder.summary()["computed"] == 0


# ------------------------------------------------------------------------------------ ControlNet on a UNet


def _unet_control(scale):
    """A control dict of ComfyUI's shape for the stand-in UNet (middle 4x4, skip connections 8x8)."""
    return {
        "input": [],
        "middle": [torch.full((1, 8, 4, 4), 0.3 * scale)],
        "output": [torch.full((1, 8, 8, 8), 0.2 * scale), None],
    }


@torch.no_grad()
def test_unet_computes_every_call_with_controlnet_and_drops_the_cache(caplog):
    torch.manual_seed(0)
    model = UNetModel().eval()
    x = torch.randn(1, 4, 8, 8)
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))  # would skip every second call
    run = _UNetRun(holder)
    sigmas = [9.0, 7.0, 5.0, 3.0, 2.0, 1.0]
    controls = [None, 1, 2, None, None, None]  # ControlNet active on calls 1 and 2 only
    inputs = [x * (1 - 0.05 * k) for k in range(len(sigmas))]
    with caplog.at_level(logging.INFO, logger="speedkit.fbcache"):
        outs = [
            run(model, inputs[k], s, control=None if c is None else _unet_control(c))
            for k, (s, c) in enumerate(zip(sigmas, controls, strict=True))
        ]
    # calls 1, 2: computed with their ControlNet; call 3 would be a hit but the cache was dropped
    # (its residuals predate the ControlNet calls); call 4 computes (pattern), call 5 is a hit.
    assert model.calls["middle"] == 5
    for k in (1, 2):
        expected = model(inputs[k], torch.full((1,), sigmas[k] / 10), {}, control=_unet_control(controls[k]))
        assert torch.equal(outs[k], expected)  # exactly the unpatched model with the current control
    messages = [
        r.getMessage() for r in caplog.records if "ControlNet/T2I-Adapter residuals are present" in r.getMessage()
    ]
    assert len(messages) == 1  # once per run
    summary = holder.summary()
    assert summary["control_computes"] == 2 and summary["skipped"] == 1 and summary["computed"] == 5
    assert "2 model calls computed in full because ControlNet was active" in holder.summary_text()


@torch.no_grad()
def test_unet_uncond_without_controlnet_keeps_its_cache_when_run_separately():
    torch.manual_seed(0)
    model = UNetModel().eval()
    x = torch.randn(1, 4, 8, 8)
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    run = _UNetRun(holder)
    for k, s in enumerate((9.0, 7.0, 5.0, 3.0)):
        run(model, x * (1 - 0.05 * k), s, keys=(0,), control=_unet_control(1))  # cond: ControlNet
        run(model, x * (1 - 0.05 * k), s, keys=(1,))  # uncond: none
    per_key = holder.summary()["per_conditioning"]
    assert per_key["cond"] == {"computed": 4, "skipped": 0}
    assert per_key["uncond"] == {"computed": 2, "skipped": 2}


@torch.no_grad()
def test_unet_empty_control_dict_does_not_block_caching():
    torch.manual_seed(0)
    model = UNetModel().eval()
    x = torch.randn(1, 4, 8, 8)
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    run = _UNetRun(holder)
    for k, s in enumerate((5.0, 4.0)):
        run(model, x * (1 - 0.05 * k), s, control={"input": [], "middle": [None], "output": [None, None]})
    assert model.calls["middle"] == 1 and holder.summary()["control_computes"] == 0


def test_step_mode_computes_calls_with_controlnet():
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    calls = []

    def apply_model(x, sigma, c_concat, c_crossattn, control, to):
        calls.append(control is not None)
        return x * 0.5

    executor = _Executor(apply_model, None)
    x = torch.ones(1, 4, 2, 2)
    control = {"input": [], "middle": [torch.ones(1)], "output": []}
    for k, s in enumerate((9.0, 7.0, 5.0, 3.0)):
        to = call_options({HOLDER_KEY: holder}, s)
        step_apply_model_wrapper(
            executor, x * (1 + 0.01 * k), torch.tensor([s]), None, None, control if k == 1 else None, to
        )
    # call 1 (ControlNet) computed although the pattern asked for a hit; call 2 computes a fresh
    # reference (cache dropped), call 3 is a hit
    assert len(calls) == 3 and holder.summary()["control_computes"] == 1


# ------------------------------------------------------------------------------------ in-place DiT blocks


class InPlaceDiT(nn.Module):
    """LTXV-like: every block adds to its input tensor in place and returns that same tensor."""

    def __init__(self, n=3, dim=8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n)])

    def forward(self, x, vec, transformer_options):
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        x = x.clone()  # the network's own activation, like the output of patchify/proj_in
        for i, b in enumerate(self.blocks):

            def wrap(a, b=b):
                h = a["img"]
                h += torch.tanh(b(h) + a["vec"])
                return {"img": h}

            args = {"img": x, "txt": None, "vec": vec, "transformer_options": transformer_options}
            x = (
                replace[("double_block", i)](args, {"original_block": wrap})
                if ("double_block", i) in replace
                else wrap(args)
            )["img"]
        return x


@pytest.mark.parametrize("mode", ["tail", "per_block"])
@torch.no_grad()
def test_blocks_that_update_their_input_in_place_get_true_residuals(mode, caplog):
    torch.manual_seed(0)
    model = InPlaceDiT().eval()
    x = torch.randn(1, 5, 8)
    holder = active(FBCacheHolder(0.5, cache_mode=mode, force_pattern=[False, True]))
    to = dit_options(holder, stacks=(("double_block", 3),))
    vecs = [torch.full((1, 1, 8), s / 10) for s in (9.0, 7.0)]
    with caplog.at_level(logging.INFO, logger="speedkit.fbcache"):
        model(x, vecs[0], call_options(to, 9.0))
        x1 = x * 0.95
        hit = model(x1, vecs[1], call_options(to, 7.0))
    assert holder.summary()["skipped"] == 1
    assert any("updates its input in place" in r.getMessage() for r in caplog.records)

    def block(i, h, vec):
        return h + torch.tanh(model.blocks[i](h) + vec)

    r0 = block(0, x, vecs[0])
    tail = block(2, block(1, r0, vecs[0]), vecs[0]) - r0
    expected = block(0, x1, vecs[1]) + tail
    torch.testing.assert_close(hit, expected, rtol=1e-5, atol=1e-6)
    assert tail.abs().mean() > 1e-3  # the residual is real, not input - input
    # the first-block distance is measured on true residuals, not on input - input = 0
    holder2 = active(FBCacheHolder(0.5, cache_mode=mode, verbose=True))
    to2 = dit_options(holder2, stacks=(("double_block", 3),))
    model(x, vecs[0], call_options(to2, 9.0))
    model(x * 0.5, vecs[1], call_options(to2, 7.0))
    diffs = [d for st in holder2.stats.values() for d in st.diffs]
    assert diffs and all(d > 1e-3 for d in diffs)


def test_extrapolated_hits_do_not_recompile_under_torch_compile():
    """Each hit has a new sigma; the prediction runs outside dynamo, so a compiled model (e.g.
    ComfyUI's TorchCompileModel) is not recompiled every step."""
    import torch._dynamo

    holder = active(FBCacheHolder(0.5, hit_residual="extrapolate"))
    r0, r1 = torch.zeros(1, 4), torch.ones(1, 4)
    for sigma, r in ((10.0, r0), (9.0, r1)):
        holder.begin_call({"cond_or_uncond": [0]})
        holder.call.sigma_value = sigma
        holder.store("tail", {"h": r})

    def add_cached(x, h):
        return x + h.cached("tail")["h"]

    torch._dynamo.reset()
    compiled = torch.compile(add_cached, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for sigma, expected in ((8.5, 1.5), (8.0, 2.0), (7.0, 3.0)):  # w = 0.5, 1, 2 (clamped max)
            holder.begin_call({"cond_or_uncond": [0]})
            holder.call.sigma_value = sigma
            assert torch.equal(compiled(torch.zeros(1, 4), holder), torch.full((1, 4), expected))
    torch._dynamo.reset()


def test_call_bookkeeping_does_not_recompile_under_torch_compile():
    """begin_call (patch fingerprint, call-variant counters) runs in every model call, inside a
    compiled model's forward too: it stays outside dynamo, so new calls do not recompile."""
    import torch._dynamo

    holder = active(FBCacheHolder(0.5))
    block = lambda a, e: a  # noqa: E731

    def start(x, to):
        holder.begin_call(to)
        return x * 2

    torch._dynamo.reset()
    compiled = torch.compile(start, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, window in enumerate((_Window(0), _Window(3), _Window(0))):
            to = {"cond_or_uncond": [0], "uuids": ["c"], "sigmas": torch.ones(1), "context_window": window}
            to["patches_replace"] = {"dit": {("double_block", 0): block}}
            assert torch.equal(compiled(torch.ones(1), to), torch.full((1,), 2.0))
            assert holder.call.variant == (1 if i == 1 else 0)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ other nodes' patches


def _with_extra_patch(options: dict, name: str, key, fn) -> dict:
    """What ComfyUI's ``set_model_options_patch_replace`` does for a guidance node's second call."""
    to = dict(options)
    to["patches_replace"] = {k: dict(v) for k, v in options.get("patches_replace", {}).items()}
    to["patches_replace"].setdefault(name, {})[key] = fn
    return to


@torch.no_grad()
def test_calls_with_other_patches_keep_their_own_cache_state(flux, flux_inputs, caplog):
    """Perturbed-Attention / Skip Layer Guidance call the model again for the same conditioning with
    other patches. Such a call's first block equals the normal call's, so compared with the normal
    call's reference it would always "hit" and return the wrong residual; it must be cached on its own."""
    img, txt = flux_inputs
    holder = active(FBCacheHolder(1e-9))  # no genuine change is this small: nothing may be skipped

    def perturbed(args, extra):  # stands in for a guidance node's replacement (PAG's attention, SLG's skip)
        out = extra["original_block"](args)
        return {k: v * 0.5 for k, v in out.items()}

    normal = dit_options(holder)
    variant = _with_extra_patch(normal, "dit", ("single_block", 1), perturbed)
    ref_variant = {"patches_replace": {"dit": {("single_block", 1): perturbed}}}
    with caplog.at_level(logging.INFO):
        for k, s in enumerate(SIGMAS):
            vec = torch.full((1, 1, img.shape[-1]), s / 10)
            x = img + 0.02 * k
            a = flux(x, txt, vec, call_options(normal, s))
            b = flux(x, txt, vec, call_options(variant, s))
            assert torch.equal(a, flux(x, txt, vec, call_options({}, s)))
            assert torch.equal(b, flux(x, txt, vec, call_options(ref_variant, s)))
    summary = holder.summary()
    assert summary["skipped"] == 0
    assert summary["per_conditioning"] == {
        "cond": {"computed": len(SIGMAS), "skipped": 0},
        "cond (calls with other patches #1)": {"computed": len(SIGMAS), "skipped": 0},
    }
    assert "keep their own cache state (calls with other patches #1)" in caplog.text


@torch.no_grad()
def test_patch_variants_hit_against_their_own_reference(flux, flux_inputs):
    """With forced hits, each variant injects residuals from its own computed calls."""
    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    normal = dit_options(holder)

    def scaled(args, extra):
        return {k: v * 0.5 for k, v in extra["original_block"](args).items()}

    variant = _with_extra_patch(normal, "other", ("x", 0), scaled)  # a different patch set, same blocks
    s0, s1 = SIGMAS[:2]
    vec0, vec1 = (torch.full((1, 1, img.shape[-1]), s / 10) for s in (s0, s1))
    flux(img, txt, vec0, call_options(normal, s0))
    flux(img * 2, txt, vec0, call_options(variant, s0))  # the variant's computed call sees other inputs
    hit_normal = flux(img + 0.01, txt, vec1, call_options(normal, s1))
    hit_variant = flux(img * 2 + 0.01, txt, vec1, call_options(variant, s1))
    assert holder.summary()["skipped"] == 2
    # a hit adds the residual its own variant computed: recompute both from the cached state
    assert not torch.equal(hit_normal, hit_variant)
    fresh = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    only_variant = _with_extra_patch(dit_options(fresh), "other", ("x", 0), scaled)
    flux(img * 2, txt, vec0, call_options(only_variant, s0))
    assert torch.equal(flux(img * 2 + 0.01, txt, vec1, call_options(only_variant, s1)), hit_variant)


def test_patch_variants_are_bounded_and_evict_their_state():
    from speedkit.fbcache.holder import MAX_CALL_VARIANTS, VariantKey

    holder = active(FBCacheHolder(0.1))
    base = {HOLDER_KEY: holder, "cond_or_uncond": [0], "uuids": ["c"], "sigmas": torch.ones(1)}
    seen = []
    for i in range(MAX_CALL_VARIANTS + 3):
        fn = (lambda i: lambda a, e: a)(i)  # a new function each call, as a careless node would build
        call = holder.begin_call({**base, "patches_replace": {"attn1": {("middle", 0, 0): fn}}})
        holder.decide(torch.randn(1, 4))
        holder.end_call()
        seen.append(call.variant)
    assert max(seen) == MAX_CALL_VARIANTS - 1
    assert len(holder._refs) <= MAX_CALL_VARIANTS
    assert all(isinstance(k, VariantKey) or k == "c" for k in holder._refs)
    # the same patch set again maps to the same variant
    fn = lambda a, e: a  # noqa: E731
    opts = {**base, "patches_replace": {"attn1": {("middle", 0, 0): fn}}}
    assert holder.begin_call(opts).variant == holder.begin_call(dict(opts)).variant


@torch.no_grad()
def test_tail_span_whose_last_block_another_node_replaces_is_computed(flux, flux_inputs, caplog):
    """Skip Layer Guidance replacing the last block of a stack in its calls: those calls cannot form
    that stack's tail residual, so they must never hit (a hit would drop the stack's residual)."""
    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    options = dit_options(holder)
    options["patches_replace"]["dit"][("double_block", 2)] = lambda args, extra: {
        "img": args["img"],
        "txt": args["txt"],
    }
    with caplog.at_level(logging.WARNING):
        for k, s in enumerate(SIGMAS[:4]):
            vec = torch.full((1, 1, img.shape[-1]), s / 10)
            flux(img + 0.02 * k, txt, vec, call_options(options, s))
    assert holder.summary()["skipped"] == 0
    assert "double_block 2 is replaced by another node" in caplog.text


class _Window:
    """ComfyUI's IndexListContextWindow as the hooks see it (``transformer_options["context_window"]``)."""

    def __init__(self, start: int, length: int = 4):
        self.index_list, self.dim = list(range(start, start + length)), 0


@torch.no_grad()
def test_context_windows_keep_their_own_cache_state(flux, flux_inputs, caplog):
    """ComfyUI's context windows call the model once per window of a video with the same
    conditioning; each window is another part of the video and must hit against its own residual."""
    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    options = dit_options(holder)
    s0, s1 = SIGMAS[:2]
    vec0, vec1 = (torch.full((1, 1, img.shape[-1]), s / 10) for s in (s0, s1))
    inputs = {0: img, 3: img * 2 - 1}  # two windows of different content
    with caplog.at_level(logging.INFO):
        for start, x in inputs.items():  # step 0: one call per window, each must be computed
            to = {**call_options(options, s0), "context_window": _Window(start)}
            assert torch.equal(flux(x, txt, vec0, to), flux(x, txt, vec0, call_options({}, s0)))
        hits = {
            start: flux(x + 0.01, txt, vec1, {**call_options(options, s1), "context_window": _Window(start)})
            for start, x in inputs.items()
        }
    assert holder.summary()["skipped"] == 2
    assert "context window 3-6 #1" in caplog.text
    # window 3's hit equals what a run that only ever saw window 3 gives
    alone = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    only = dit_options(alone)
    flux(inputs[3], txt, vec0, {**call_options(only, s0), "context_window": _Window(3)})
    alone_hit = flux(inputs[3] + 0.01, txt, vec1, {**call_options(only, s1), "context_window": _Window(3)})
    assert torch.equal(hits[3], alone_hit)


@torch.no_grad()
def test_report_states_the_cache_memory(flux, flux_inputs):
    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True], hit_residual="extrapolate"))
    run_flux(flux, holder, img * 100, txt)  # large values: the residual storages are what is counted
    held = holder.memory_bytes()
    assert held > 0
    assert holder.summary()["cache_MiB"] == round(held / 2**20, 1)
    assert f"cache memory {round(held / 2**20, 1):g} MiB" in holder.summary_text()
    holder.reset()
    assert holder.summary()["cache_MiB"] == 0


@torch.no_grad()
def test_calls_whose_first_or_final_block_another_node_replaces_never_share_state(flux, flux_inputs):
    """One node replaces the final block in its calls, another the first block in theirs: the
    first kind leaves no closed call behind for the second to pick up (the APPLY_MODEL wrapper
    closes every call), so neither ever injects residuals it did not compute."""
    from speedkit.fbcache import dit_diffusion_wrapper

    img, txt = flux_inputs
    holder = active(FBCacheHolder(0.5, force_pattern=[False, True]))
    normal = dit_options(holder)

    def passthrough(args, extra):  # another node's replacement (e.g. Skip Layer Guidance's skip)
        return {k: args[k] for k in ("img", "txt") if k in args}

    final_replaced = _with_extra_patch(normal, "dit", ("single_block", 2), passthrough)
    first_replaced = _with_extra_patch(normal, "dit", ("double_block", 0), passthrough)
    plain_final = {"patches_replace": {"dit": {("single_block", 2): passthrough}}}
    plain_first = {"patches_replace": {"dit": {("double_block", 0): passthrough}}}

    def call(options, x, vec, s):
        to = call_options(options, s)
        return dit_diffusion_wrapper(_Executor(lambda **kw: flux(x, txt, vec, **kw), None), transformer_options=to)

    for k, s in enumerate(SIGMAS):
        vec = torch.full((1, 1, img.shape[-1]), s / 10)
        x = img + 0.02 * k
        assert torch.equal(call(final_replaced, x, vec, s), flux(x, txt, vec, call_options(plain_final, s)))
        assert torch.equal(call(first_replaced, x * 2, vec, s), flux(x * 2, txt, vec, call_options(plain_first, s)))
        assert holder.call is None
