"""LoRA layers: exact alpha/rank scaling, identity at step 0, rank checks, injection, kohya names."""

from __future__ import annotations

import lora_toy as toy
import pytest
import torch
from torch import nn

from speedkit.lora_train import layers, naming


def test_identity_at_step_zero_and_exact_scaling():
    base = nn.Linear(12, 10)
    layer = layers.LoRALayer(base, rank=4, alpha=2.0, name="x")
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x)), "up starts at zero: the wrapped layer must equal the base exactly"
    assert torch.count_nonzero(layer.lora_down.weight) > 0, "down must start random"
    with torch.no_grad():
        layer.lora_up.weight.normal_()
    expected = base(x) + (x @ layer.lora_down.weight.T @ layer.lora_up.weight.T) * (2.0 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    layer.multiplier = 0.5
    expected_half = base(x) + (x @ layer.lora_down.weight.T @ layer.lora_up.weight.T) * (2.0 / 4) * 0.5
    torch.testing.assert_close(layer(x), expected_half, rtol=0, atol=1e-6)


def test_conv_lora_matches_merged_weight():
    base = nn.Conv2d(6, 8, 3, padding=1)
    layer = layers.LoRALayer(base, rank=3, alpha=3.0, name="c")
    with torch.no_grad():
        layer.lora_up.weight.normal_()
    x = torch.randn(2, 6, 5, 5)
    merged = base.weight + torch.einsum("or,rikl->oikl", layer.lora_up.weight[:, :, 0, 0], layer.lora_down.weight)
    torch.testing.assert_close(layer(x), nn.functional.conv2d(x, merged, base.bias, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 11])
def test_rank_out_of_range_names_layer_and_size(rank):
    with pytest.raises(ValueError, match=r"rank=.*layer blocks_0_to_q \(Linear 12->10\).*between 1 and 10"):
        layers.LoRALayer(nn.Linear(12, 10), rank=rank, alpha=1.0, name="blocks_0_to_q")


def test_injection_leaves_base_untouched_and_detach_restores():
    unet = toy.TinyUNet("ldm", dim=16, context_dim=8)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    originals = dict(unet.named_modules())
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    ref = unet(x, t, ctx)
    lora = layers.LoRASet()
    names = lora.add(unet, layers.find_unet_targets(unet, "attention"), rank=4, alpha=4, prefix="lora_unet")
    assert len(names) == 3 * 2 * 4  # 3 transformers x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    torch.testing.assert_close(unet(x, t, ctx), ref, rtol=0, atol=0)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.5)
    assert not torch.allclose(unet(x, t, ctx), ref)
    lora.detach()
    assert dict(unet.named_modules()).keys() == originals.keys()
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(unet(x, t, ctx), ref, rtol=0, atol=0)


def test_presets_choose_kohya_targets():
    unet = toy.TinyUNet("diffusers", dim=16, context_dim=8)
    attn = layers.find_unet_targets(unet, "attention")
    full = layers.find_unet_targets(unet, "attention+mlp")
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or p.endswith("to_out.0") for p in attn)
    assert len(attn) == 3 * 2 * 4
    extra = sorted(set(full) - set(attn))
    leaves = {p.split("attentions.0.", 1)[1].replace("transformer_blocks.0.", "") for p in extra}
    assert leaves == {"proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"}
    assert not any(".resnets." in p or "conv_" in p or "time_embed" in p for p in full)
    with pytest.raises(ValueError, match="target='everything'"):
        layers.find_unet_targets(unet, "everything")


def test_text_encoder_targets():
    te = toy.TinyTextEncoder(dim=8, layers=2)
    paths = layers.find_te_targets(te)
    assert len(paths) == 12
    assert layers.kohya_name("lora_te1", paths[0]) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def test_sd15_names_are_diffusers_paths():
    nrb = [2, 2, 2, 2]
    cases = {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.8.1.proj_in": "down_blocks.2.attentions.1.proj_in",
        "middle_block.1.transformer_blocks.0.ff.net.2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "output_blocks.3.1.transformer_blocks.0.attn2.to_out.0": "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
    }
    for ldm, diffusers in cases.items():
        assert naming.ldm_to_diffusers_path(ldm, nrb) == diffusers
    assert (
        layers.kohya_name("lora_unet", cases["input_blocks.1.1.transformer_blocks.0.attn1.to_q"])
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    with pytest.raises(ValueError, match="not inside"):
        naming.ldm_to_diffusers_path("input_blocks.0.0", nrb)


def test_kohya_keys_round_trip(tmp_path):
    from safetensors.torch import load_file

    from speedkit.lora_train import checkpoint

    def build():
        unet = toy.TinyUNet("ldm", dim=16, context_dim=8)
        lora = layers.LoRASet()
        lora.add(unet, layers.find_unet_targets(unet, "attention+mlp"), rank=4, alpha=2, prefix="lora_unet")
        return unet, lora

    _, lora = build()
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    path = checkpoint.save_lora(tmp_path / "a.safetensors", lora.state_dict(torch.float32), {"ss_network_dim": "4"})
    tensors = load_file(str(path))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert names == set(lora.layers)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert sum(k.endswith(".lora_down.weight") for k in tensors) == len(lora) == len(names)
    assert tensors[next(k for k in tensors if k.endswith(".alpha"))].item() == 2.0
    _, fresh = build()
    fresh.load_state_dict(tensors)
    for a, b in zip(lora.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({k: v for k, v in tensors.items() if "attn1_to_q.lora_up" not in k})


@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12)])
def test_linear_lora_gradients_match_autograd_reference(shape):
    base = nn.Linear(12, 10).requires_grad_(False)
    layer = layers.LoRALayer(base, rank=3, alpha=6.0, name="g")
    with torch.no_grad():
        layer.lora_up.weight.normal_()
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(*shape[:-1], 10)
    (layer(x) * weight).sum().backward()
    got = (x.grad.clone(), layer.lora_down.weight.grad.clone(), layer.lora_up.weight.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    down = layer.lora_down.weight.detach().clone().requires_grad_(True)
    up = layer.lora_up.weight.detach().clone().requires_grad_(True)
    ref = base(x_ref) + 2.0 * (x_ref @ down.T @ up.T)
    (ref * weight).sum().backward()
    for a, b in zip(got, (x_ref.grad, down.grad, up.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _bf16_unet_with_lora(preset: str, working: bool):
    torch.manual_seed(3)
    # a transformer container (1x1-conv proj_in/out), not a whole UNet: its time embedding is fp32
    unet = nn.ModuleDict({"t": toy.SpatialTransformer(16, 8, 2, 1, False)}).requires_grad_(False).bfloat16()
    lora = layers.LoRASet()
    lora.add(unet, layers.find_unet_targets(unet, preset), rank=4, alpha=2, prefix="lora_unet")
    lora.reset(7)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.3)  # up is zero after reset: give every branch a value and a gradient
    if working:
        assert lora.use_working_copies(torch.bfloat16, "cpu") == len(lora)
    return unet, lora


@pytest.mark.parametrize("preset", ["attention", "attention+mlp"])
@pytest.mark.parametrize("autocast", [False, True])
def test_working_copies_give_the_outputs_and_grads_of_casting_every_call(preset, autocast):
    """Working copies only remove casts: same output, same fp32 master grads as casting the
    masters in every call (bitwise natively; within bf16 rounding under autocast), for Linear and
    1x1-conv targets."""
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 8)
    results = []
    for working in (False, True):
        unet, lora = _bf16_unet_with_lora(preset, working)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unet["t"](x.bfloat16(), ctx.bfloat16())
        (out.float() ** 2).mean().backward()
        lora.flush_grads()
        grads = [p.grad.clone() for p in lora.parameters()]
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((out.detach(), grads))
    (out_cast, grads_cast), (out_work, grads_work) = results
    assert any(g.abs().sum() > 0 for g in grads_work)
    if not autocast:
        assert torch.equal(out_cast, out_work)
        for a, b in zip(grads_cast, grads_work, strict=True):
            assert torch.equal(a, b)
        return
    # under autocast the casting path is two Linear modules and an add, the working one a single
    # addmm (one rounding instead of two): equal within bf16 rounding
    torch.testing.assert_close(out_work, out_cast, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads_cast, grads_work, strict=True):
        assert float((b - a).norm()) <= 2e-2 * float(a.norm()) + 1e-6


def test_working_copies_follow_the_masters_and_keep_accumulating():
    unet, lora = _bf16_unet_with_lora("attention", working=True)
    params = lora.parameters()
    first = params[0]
    x, ctx = torch.randn(2, 16, 4, 4, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)

    def grads_of_one_pass():
        (unet["t"](x, ctx).float() ** 2).mean().backward()
        lora.flush_grads()
        return first.grad.clone()

    once = grads_of_one_pass()
    assert torch.equal(grads_of_one_pass(), 2 * once), "two passes accumulate into the master grads"
    # an optimizer that frees grads (zero_grad(set_to_none=True)) must not lose the next ones
    for p in params:
        p.grad = None
    assert torch.equal(grads_of_one_pass(), once)
    optimizer = torch.optim.SGD(params, lr=0.1)
    optimizer.step()
    before = unet["t"](x, ctx)
    lora.sync()
    after = unet["t"](x, ctx)
    assert not torch.equal(before, after), "sync must bring the optimizer's step into the forward"
    down, up = lora.layers[next(iter(lora.layers))].working
    assert torch.equal(down, first.detach().bfloat16())
    state = lora.state_dict()
    with torch.no_grad():
        first.zero_()
    lora.load_state_dict(state)
    assert torch.equal(down, first.detach().bfloat16()), "loading a state refreshes the working copies"
    assert lora.zero_grads() and all(torch.count_nonzero(p.grad) == 0 for p in params)
    lora.detach()
    assert all(layer.working is None for layer in lora.layers.values())
