"""The training loop on tiny UNets: convergence, resume, saving, cancel, text-encoder LoRA."""

from __future__ import annotations

import errno
import json

import lora_toy as toy
import pytest
import torch

from speedkit.lora_train import layers, schedule, trainer

CAPTIONS = ["a red cube", "a blue ball", "green tree, sky", "yellow sun"]


@pytest.fixture(autouse=True)
def _one_thread():
    """These loops are tiny: one thread is faster and immune to a busy 2-core CI box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_run(naming="diffusers", preset="attention", *, train_te=False, adm=False, **overrides):
    device = torch.device(overrides.pop("device", "cpu"))
    cuda_graphs = overrides.pop("cuda_graphs", True)
    # a UNet in bf16/fp16 computes natively in that dtype (no autocast), as a ComfyUI model loaded
    # in the run's precision does; None: fp32 weights, the run's precision through autocast
    model_dtype = overrides.pop("model_dtype", None)
    torch.manual_seed(0)
    unet = toy.TinyUNet(naming, dim=16, context_dim=16, adm_dim=22 if adm else 0).requires_grad_(False).to(device)
    if model_dtype is not None:
        unet.to(model_dtype)
    te = toy.TinyTextEncoder(16).requires_grad_(False).to(device)
    latents = [torch.randn(4, 4, 4) for _ in CAPTIONS]
    samples = [
        trainer.Sample(lat, cap, (64 + i, 64, 0, i, 32, 32), (32, 32))
        for i, (lat, cap) in enumerate(zip(latents, CAPTIONS, strict=True))
    ]
    lora = layers.LoRASet()
    rank = overrides.pop("rank", 8)
    lora.add(unet, layers.find_unet_targets(unet, preset), rank=rank, alpha=rank, prefix="lora_unet", device=device)
    if train_te:
        lora.add(te, layers.find_te_targets(te), rank=4, alpha=4, prefix="lora_te1", group="te")

    def encode(captions, batch):
        hidden, pooled = te(captions)
        cond = {"context": hidden}
        if adm:
            ids = torch.tensor([s.time_ids for s in batch], dtype=torch.float32, device=pooled.device) / 64
            cond["y"] = torch.cat([pooled, ids], dim=1)
        return cond

    def denoise(x, t, cond):
        if model_dtype is None:
            return unet(x, t, cond["context"], cond.get("y"))
        y = cond.get("y")
        y = None if y is None else y.to(model_dtype)
        return unet(x.to(model_dtype), t, cond["context"].to(model_dtype), y)

    settings = dict(
        steps=300, rank=rank, alpha=rank, unet_lr=5e-3, precision="fp32", grad_checkpointing=False, seed=1, batch_size=4
    )
    settings.update(overrides)
    settings["train_te"] = train_te
    cfg = trainer.TrainConfig(**settings)
    blocks = [m for m in unet.modules() if isinstance(m, toy.BasicTransformerBlock)]
    tr = trainer.Trainer(
        cfg,
        lora,
        samples,
        denoise,
        encode,
        device,
        checkpoint_blocks=blocks,
        text_modules=[te],
        cuda_graphs=cuda_graphs,
        autocast=None if model_dtype is None else False,
    )
    return tr, unet, te, latents


def held_out_loss(unet, te, latents):
    """eps-MSE on fixed noise/timesteps the run never saw (the LoRA is on while evaluating)."""
    g = torch.Generator().manual_seed(1234)
    x0 = torch.stack(latents).repeat(8, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    acp = schedule.alphas_cumprod()
    with torch.no_grad():
        pred = unet(schedule.add_noise(x0, noise, t, acp), t, te(CAPTIONS * 8)[0])
    return schedule.mse_per_sample(pred, noise).mean().item()


def info(name="test_lora"):
    return trainer.RunInfo(name, "sd_v1", "stable-diffusion-v1/lora", "diffusers", resolution=32, dataset_dir="/d/x")


@pytest.mark.parametrize("naming,preset", [("diffusers", "attention"), ("ldm", "attention+mlp")])
def test_loss_halves_in_a_few_hundred_steps(naming, preset, tmp_path):
    tr, unet, te, latents = make_run(naming, preset)
    before = held_out_loss(unet, te, latents)
    result = tr.run(tmp_path, info())
    after = held_out_loss(unet, te, latents)
    assert after <= 0.5 * before, f"held-out loss {before:.4f} -> {after:.4f}, expected at least halved"
    first, last = sum(result.losses[:30]) / 30, sum(result.losses[-30:]) / 30
    assert last < 0.7 * first
    tr.lora.set_multiplier(0.0)
    assert held_out_loss(unet, te, latents) == pytest.approx(before, rel=1e-6), "LoRA off = the base model"
    assert result.steps_done == 300 and not result.cancelled and result.lora_path.is_file()
    assert result.peak_vram_bytes is None  # reported for CUDA runs only


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    overrides = dict(
        steps=12,
        save_every=5,
        lr_scheduler="cosine",
        warmup_steps=3,
        min_snr_gamma=5.0,
        noise_offset=0.05,
        caption_dropout=0.2,
        shuffle_captions=True,
        keep_tokens=1,
        grad_accum=2,
        batch_size=2,
    )
    full, *_ = make_run(**overrides)
    full.run(tmp_path / "full", info())
    reference = [p.detach().clone() for p in full.lora.parameters()]

    part, *_ = make_run(**dict(overrides, steps=12))
    stop_at = 5
    result = part.run(tmp_path / "part", info(), should_stop=lambda: part.step >= stop_at)
    assert result.cancelled and result.steps_done == 5
    state = json.loads((tmp_path / "part" / "test_lora-state.json").read_text())
    assert state["step"] == 5 and len(state["losses"]) == 5

    resumed, *_ = make_run(**overrides)
    resumed.load_state(tmp_path / "part" / "test_lora-state.json")
    assert resumed.step == 5
    resumed.run(tmp_path / "part", info())
    for a, b in zip(reference, resumed.lora.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert not list((tmp_path / "part").glob("*.pt")) and not list((tmp_path / "part").glob("*.pkl"))


def test_resume_rejects_a_different_rank(tmp_path):
    tr, *_ = make_run(steps=2, save_every=1)
    tr.run(tmp_path, info())
    other, *_ = make_run(steps=4, rank=4)
    with pytest.raises(ValueError, match="rank=8 but this run has rank=4"):
        other.load_state(tmp_path / "test_lora")


def test_save_every_keep_last_and_kohya_file(tmp_path):
    from safetensors import safe_open

    tr, *_ = make_run(steps=7, save_every=2, keep_last=2, save_dtype="fp16")
    result = tr.run(tmp_path, info())
    assert sorted(p.name for p in tmp_path.glob("test_lora-step*.safetensors")) == [
        "test_lora-step000004.safetensors",
        "test_lora-step000006.safetensors",
    ]
    assert result.lora_path == tmp_path / "test_lora.safetensors"
    assert not list(tmp_path.glob(".*tmp*")), "no temp file left behind"
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    suffixes = {k.split(".", 1)[1] for k in keys}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert meta["ss_network_dim"] == "8" and meta["ss_steps"] == "7" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["ss_mixed_precision"] == "no" and meta["ss_save_precision"] == "fp16"


def test_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    tr, *_ = make_run(steps=2)
    tr.run(tmp_path, info())
    good = (tmp_path / "test_lora.safetensors").read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    again, *_ = make_run(steps=3)
    with pytest.raises(OSError, match="disk full while saving .*previous file is intact"):
        again.run(tmp_path, info())
    assert (tmp_path / "test_lora.safetensors").read_bytes() == good
    assert not list(tmp_path.glob(".*tmp*"))


def test_output_name_with_separators_is_rejected(tmp_path):
    tr, *_ = make_run(steps=1)
    for bad in ("../evil", "a/b", "a\\b", ""):
        with pytest.raises(ValueError, match="output_name="):
            tr.run(tmp_path, info(bad))


def test_error_mid_run_saves_what_was_trained(tmp_path):
    tr, *_ = make_run(steps=10)

    def explode(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.run(tmp_path, info(), on_step=explode)
    state = json.loads((tmp_path / "test_lora-state.json").read_text())
    assert state["step"] == 3 and (tmp_path / "test_lora.safetensors").is_file()


def test_text_encoder_lora_trains_and_is_saved_with_te_prefix(tmp_path):
    from safetensors.torch import load_file

    tr, unet, te, _ = make_run(steps=3, train_te=True, te_lr=1e-3)
    assert len(tr.optimizer.param_groups) == 2 and tr.optimizer.param_groups[1]["lr"] == 1e-3
    tr.run(tmp_path, info())
    tensors = load_file(str(tmp_path / "test_lora.safetensors"))
    te_ups = [v for k, v in tensors.items() if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert len(te_ups) == 12 and any(v.abs().sum() > 0 for v in te_ups), "TE LoRA must have been updated"
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in tensors)


def test_sdxl_style_vector_conditioning_and_checkpointing_match(tmp_path):
    """The y (pooled + time_ids) path trains; gradient checkpointing gives the same gradients."""
    a, *_ = make_run(steps=3, adm=True, grad_checkpointing=False)
    b, *_ = make_run(steps=3, adm=True, grad_checkpointing=True)
    a.run(tmp_path / "a", info())
    b.run(tmp_path / "b", info())
    for p, q in zip(a.lora.parameters(), b.lora.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)


def test_bf16_autocast_runs(tmp_path):
    tr, *_ = make_run(steps=3, precision="bf16")
    result = tr.run(tmp_path, info())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in tr.lora.parameters()), "LoRA weights stay fp32"


@pytest.mark.parametrize("accum", [1, 2])
def test_working_copies_train_exactly_what_casting_every_call_trains(tmp_path, monkeypatch, accum):
    """A UNet in bf16 computing natively: the LoRA layers' bf16 working copies (one refresh per
    step, grads moved into the fp32 masters once per micro-step) give bit for bit the LoRA that
    casting the fp32 masters in every call gives."""
    common = dict(steps=6, precision="bf16", model_dtype=torch.bfloat16, grad_accum=accum, grad_checkpointing=True)
    working, *_ = make_run(**common)
    assert working.lora.has_working_copies
    working.run(tmp_path / "a", info())
    monkeypatch.setattr(layers.LoRASet, "use_working_copies", lambda self, dtype, device: 0)
    casting, *_ = make_run(**common)
    assert not casting.lora.has_working_copies
    casting.run(tmp_path / "b", info())
    assert working.losses == casting.losses
    for p, q in zip(working.lora.parameters(), casting.lora.parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, q)


@pytest.mark.parametrize(
    "field,value,match",
    [("steps", 0, "steps=0"), ("precision", "fp8", "precision='fp8'"), ("caption_dropout", 1.5, "caption_dropout")],
)
def test_bad_config_is_a_clear_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        make_run(**{field: value})


def test_conditioning_of_long_prompts_is_repeated_to_lcm():
    parts = [{"context": torch.ones(1, 77, 4)}, {"context": torch.zeros(1, 154, 4)}]
    out = trainer.stack_conditioning(parts)
    assert out["context"].shape == (2, 154, 4)


def test_fp16_uses_loss_scaling(tmp_path):
    tr, *_ = make_run(steps=3, precision="fp16", save_every=2)
    assert tr.scaler.is_enabled()
    result = tr.run(tmp_path, info())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    scale = json.loads((tmp_path / "test_lora-state.json").read_text())["grad_scale"]
    assert isinstance(scale, float) and scale > 0, "the loss scale is part of the resume state"


def test_cancel_inside_a_step_keeps_the_last_completed_step(tmp_path):
    """ComfyUI raises its interrupt from inside the model's layers, i.e. in the middle of a step."""
    tr, *_ = make_run(steps=10, save_every=2)
    denoise = tr.denoise

    def interrupted_at_step_5(x, t, cond):
        if tr.step == 4:  # the 5th step is under way
            raise KeyboardInterrupt
        return denoise(x, t, cond)

    tr.denoise = interrupted_at_step_5
    with pytest.raises(KeyboardInterrupt):
        tr.run(tmp_path, info())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "test_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "4"
    assert json.loads((tmp_path / "test_lora-state.json").read_text())["step"] == 4


def test_cuda_graphs_are_not_used_on_cpu(tmp_path):
    tr, *_ = make_run(steps=2)
    tr.run(tmp_path, info())
    assert tr.graph_stats == {"cuda_graphs": False}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "precision,checkpointing,accum,adm",
    [("fp32", True, 1, False), ("bf16", True, 2, True), ("fp32", False, 1, True), ("bf16-native", True, 2, True)],
)
def test_cuda_graphs_train_the_same_lora_as_eager(tmp_path, precision, checkpointing, accum, adm):
    """Graph replay computes the same steps: same losses, same LoRA weights, and it really replays.
    ``bf16-native``: a bf16 UNet without autocast, the LoRA layers on their bf16 working copies."""
    native = precision.endswith("-native")
    precision = precision.removesuffix("-native")
    common = dict(
        steps=8, precision=precision, grad_checkpointing=checkpointing, grad_accum=accum, adm=adm, device="cuda"
    )
    if native:
        common["model_dtype"] = torch.bfloat16
    eager, *_ = make_run(cuda_graphs=False, **common)
    graphed, *_ = make_run(cuda_graphs=True, **common)
    eager.run(tmp_path / "a", info())
    peak = graphed.run(tmp_path / "b", info()).peak_vram_bytes
    assert peak is not None and peak > 0
    stats = graphed.graph_stats
    assert stats["cuda_graphs"] and stats["captures"] == 1 and stats["replays"] >= 8 * accum - 2, stats
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    assert graphed.losses == pytest.approx(eager.losses, rel=tol["rtol"] * 10)
    for p, q in zip(eager.lora.parameters(), graphed.lora.parameters(), strict=True):
        torch.testing.assert_close(q, p, **tol)


@pytest.mark.gpu
def test_cuda_graphs_step_aside_for_fp16_and_text_encoder_training(tmp_path):
    fp16, *_ = make_run(steps=2, precision="fp16", device="cuda")
    te, *_ = make_run(steps=2, train_te=True, device="cuda")
    assert fp16.graph_stats == {"cuda_graphs": False} and te.graph_stats == {"cuda_graphs": False}
    te.run(tmp_path, info())


@pytest.mark.gpu
def test_adamw8bit_trains_with_bitsandbytes_on_gpu(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    tr, *_ = make_run(steps=20, optimizer="AdamW8bit", device="cuda")
    assert type(tr.optimizer).__name__ == "AdamW8bit"
    result = tr.run(tmp_path, info())
    assert result.steps_done == 20 and all(torch.isfinite(torch.tensor(result.losses)))
    # lora_up starts at zero: any non-zero entry was written by the 8-bit optimizer
    ups = [layer.lora_up.weight for layer in tr.lora.layers.values()]
    assert all(float(u.abs().sum()) > 0 for u in ups)
    assert (tmp_path / "test_lora.safetensors").is_file()
