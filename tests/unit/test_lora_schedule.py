"""Noise schedule, targets, min-SNR weights, LR schedules, optimizer choice."""

from __future__ import annotations

import math

import pytest
import torch

from speedkit.lora_train import optim, schedule


def test_scaled_linear_schedule_values():
    acp = schedule.alphas_cumprod()
    assert acp.shape == (1000,)
    betas = 1 - acp / torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    assert math.isclose(betas[0].item(), 0.00085, rel_tol=1e-9)
    assert math.isclose(betas[-1].item(), 0.012, rel_tol=1e-9)
    mid = ((0.00085**0.5 + 0.012**0.5) / 2) ** 2  # linear in sqrt(beta): the scaled_linear rule
    assert math.isclose(((betas[499] + betas[500]) / 2).item(), mid, rel_tol=1e-4)
    # ComfyUI's sigma range for SD1.5/SDXL: sigma_max ~ 14.61, sigma_min ~ 0.0292
    sigmas = ((1 - acp) / acp).sqrt()
    assert math.isclose(sigmas[-1].item(), 14.6146, rel_tol=1e-4)
    assert math.isclose(sigmas[0].item(), 0.029168, rel_tol=1e-3)


def test_noise_and_targets():
    acp = schedule.alphas_cumprod()
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    noisy = schedule.add_noise(x0, noise, t, acp)
    a = acp[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert torch.equal(schedule.target(x0, noise, t, acp, "eps"), noise)
    v = schedule.target(x0, noise, t, acp, "v")
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    # v and eps carry the same information: x0 = sqrt(a) x_t - sqrt(1-a) v
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * v, x0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="prediction='x0'"):
        schedule.target(x0, noise, t, acp, "x0")


def test_min_snr_weights():
    acp = schedule.alphas_cumprod()
    t = torch.arange(0, 1000, 37)
    snr = schedule.snr(t, acp)
    w_eps = schedule.min_snr_weights(t, acp, 5.0, "eps")
    w_v = schedule.min_snr_weights(t, acp, 5.0, "v")
    torch.testing.assert_close(w_eps, torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(w_v, torch.clamp(snr, max=5.0) / (snr + 1))
    assert torch.all(w_eps[snr > 5] < 1) and torch.all(w_eps[snr <= 5] == 1)
    assert torch.equal(schedule.min_snr_weights(t, acp, 0.0, "eps"), torch.ones(len(t)))


def test_mse_is_fp32_per_sample():
    pred = torch.full((2, 4, 2, 2), 1.0, dtype=torch.bfloat16)
    tgt = torch.zeros(2, 4, 2, 2, dtype=torch.bfloat16)
    tgt[1] = 3
    out = schedule.mse_per_sample(pred, tgt)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 4.0]


@pytest.mark.parametrize("name", optim.SCHEDULERS)
def test_lr_schedules_with_warmup(name):
    f = optim.lr_lambda(name, total_steps=100, warmup_steps=10)
    assert [round(f(i), 6) for i in range(3)] == [0.1, 0.2, 0.3]
    assert f(9) == 1.0 and f(10) == 1.0
    if name == "constant":
        assert f(99) == 1.0
    elif name == "cosine":
        assert math.isclose(f(55), 0.5, abs_tol=1e-9) and f(99) < 0.001
    else:
        assert math.isclose(f(55), 0.5, abs_tol=1e-9) and math.isclose(f(99), 1 / 90, rel_tol=1e-9)


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.make_optimizer("AdamW", [{"params": [p], "lr": 1e-3}, {"params": [], "lr": 5e-4}])
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.01 and group["eps"] == 1e-8
    sched = optim.make_scheduler(opt, "linear", 4, 0)
    lrs = []
    for _ in range(4):
        lrs.append(group["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_bad_optimizer_and_scheduler_names():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="optimizer='SGD'"):
        optim.make_optimizer("SGD", [{"params": [p], "lr": 1e-3}])
    with pytest.raises(ValueError, match="lr_scheduler='step'"):
        optim.lr_lambda("step", 10, 0)
    with pytest.raises(ValueError, match="warmup_steps=10"):
        optim.lr_lambda("constant", 10, 10)


def test_adamw8bit_without_bitsandbytes_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"AdamW8bit needs the bitsandbytes package.*pip install bitsandbytes"):
        optim.make_optimizer("AdamW8bit", [{"params": [p], "lr": 1e-3}])
