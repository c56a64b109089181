"""gradient_checkpointing auto / on / off: the input's values, the decision, and the trial step."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_lora_trainer import info, make_run

from speedkit.lora_train import checkpoint_choice as cc

GIB = cc.GIB


@pytest.mark.parametrize(
    ("value", "mode"), [("auto", "auto"), ("on", "on"), ("off", "off"), (True, "on"), (False, "off")]
)
def test_modes_and_switch_values_of_saved_workflows(value, mode):
    assert cc.is_mode(value) and cc.checkpointing_mode(value) == mode


@pytest.mark.parametrize("value", ["yes", "", 1, 0, None, "Auto"])
def test_other_values_are_refused_naming_the_input(value):
    assert not cc.is_mode(value)
    with pytest.raises(ValueError, match=r"gradient_checkpointing=.*auto.*on.*off"):
        cc.checkpointing_mode(value)


def test_decision_keeps_room_beyond_the_trial_peak():
    total = 80 * GIB
    spare = cc.spare_bytes(total)
    assert spare == 8 * GIB and cc.spare_bytes(8 * GIB) == 2 * GIB
    on, why = cc.decide(10 * GIB, 10 * GIB + spare, total)
    assert not on and "fits" in why and "10.00 GiB" in why
    on, why = cc.decide(10 * GIB, 10 * GIB + spare - 1, total)
    assert on and "does not fit" in why
    assert cc.decide(None, 70 * GIB, total) == (True, "a step without it ran out of memory")
    assert cc.decide(0, 70 * GIB, total)[0]


def test_config_refuses_a_bad_mode():
    with pytest.raises(ValueError, match="grad_checkpointing='sometimes' is invalid"):
        make_run(steps=2, grad_checkpointing="sometimes")


def test_auto_on_the_cpu_checkpoints_and_says_so(tmp_path, caplog):
    tr, *_ = make_run(steps=2, grad_checkpointing="auto")
    assert tr.checkpointing is None
    with caplog.at_level("INFO", logger="speedkit.lora_train.trainer"):
        tr.run(tmp_path, info())
    assert tr.checkpointing is True
    assert "gradient_checkpointing auto: on (memory is measured on CUDA devices only)" in caplog.text
    with safe_open(str(tmp_path / "test_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_gradient_checkpointing"] == "True"


def test_the_trial_step_leaves_the_run_untouched(tmp_path):
    """The LoRA trained after a trial step is bit for bit the one trained without it."""
    plain, *_ = make_run(steps=4, grad_checkpointing="off", precision="bf16", adm=True)
    tried, *_ = make_run(steps=4, grad_checkpointing="off", precision="bf16", adm=True)
    before = [p.detach().clone() for p in tried.lora.parameters()]
    rng = torch.random.get_rng_state()
    tried._trial_step()
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.grad is None or not p.grad.any() for p in tried.lora.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, tried.lora.parameters(), strict=True))
    plain.run(tmp_path / "a", info())
    tried.run(tmp_path / "b", info())
    assert plain.losses == tried.losses
    for p, q in zip(plain.lora.parameters(), tried.lora.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.gpu
def test_auto_measures_a_step_and_turns_checkpointing_off_when_it_fits(tmp_path, caplog):
    tr, *_ = make_run(steps=3, grad_checkpointing="auto", device="cuda", precision="bf16")
    need = tr._trial_step_bytes()
    assert need is not None and need > 0
    with caplog.at_level("INFO", logger="speedkit.lora_train.trainer"):
        tr.run(tmp_path, info())
    assert tr.checkpointing is False, caplog.text
    assert "gradient_checkpointing auto: off (a step without it needs" in caplog.text


@pytest.mark.gpu
def test_auto_checkpoints_when_a_step_runs_out_of_memory(tmp_path, monkeypatch):
    tr, *_ = make_run(steps=2, grad_checkpointing="auto", device="cuda")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(tr, "_trial_step", oom)
    tr.run(tmp_path, info())
    assert tr.checkpointing is True


def test_memory_another_process_needs_is_kept_free_too():
    total = 80 * GIB
    spare = cc.spare_bytes(total)
    assert not cc.decide(10 * GIB, 10 * GIB + spare, total)[0]
    on, why = cc.decide(10 * GIB, 10 * GIB + spare, total, reserve_bytes=5 * GIB)
    assert on and "(of which 5.00 GiB for the sample images)" in why
    assert not cc.decide(10 * GIB, 15 * GIB + spare, total, reserve_bytes=5 * GIB)[0]


def test_auto_weighs_the_trial_step_against_free_memory_less_the_reserve(monkeypatch, caplog):
    """The trainer's side of ``auto`` (CUDA calls stood in): free memory is the driver's free
    memory plus the allocator's unused blocks, less ``reserve_bytes``."""
    tr, *_ = make_run(steps=2, grad_checkpointing="auto")
    tr.device = torch.device("cuda")
    tr.reserve_bytes = 4 * GIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GIB)
    # 22 GiB free: 10 GiB + 8 GiB spare + 4 GiB reserve fits exactly, one byte more does not
    monkeypatch.setattr(tr, "_trial_step_bytes", lambda: 10 * GIB)
    with caplog.at_level("INFO", logger="speedkit.lora_train.trainer"):
        assert tr._choose_checkpointing() is False
    monkeypatch.setattr(tr, "_trial_step_bytes", lambda: 10 * GIB + 1)
    assert tr._choose_checkpointing() is True
    assert "22.00 GiB free with 12.00 GiB to spare (of which 4.00 GiB for the sample images)" in caplog.text
