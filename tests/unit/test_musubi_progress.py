"""musubi console lines -> progress events (formats taken from musubi's trainer and tqdm)."""

from __future__ import annotations

from speedkit.musubi.progress import ProgressState, parse_line


def test_training_tqdm_line_with_loss():
    ev = parse_line("steps:  12%|█▏        | 120/1000 [01:23<10:12,  1.44it/s, avr_loss=0.0912]")
    assert ev.kind == "steps" and ev.desc == "steps"
    assert (ev.step, ev.total) == (120, 1000)
    assert ev.values == {"avr_loss": 0.0912}
    assert ev.rate == "1.44it/s" and ev.remaining == "10:12"


def test_slow_rate_and_extra_postfix_values():
    ev = parse_line(
        "steps:  50%|█████     | 5/10 [00:20<00:20,  4.02s/it, avr_loss=1.2e-01, Keys Scaled=3, Average key norm=0.5]"
    )
    assert ev.rate == "4.02s/it"
    assert ev.values["avr_loss"] == 0.12 and ev.values["Keys Scaled"] == 3 and ev.values["Average key norm"] == 0.5


def test_first_redraw_without_rate():
    ev = parse_line("steps:   0%|          | 0/1000 [00:00<?, ?it/s]")
    assert ev.kind == "steps" and (ev.step, ev.total) == (0, 1000) and ev.values == {}


def test_state_markers():
    assert parse_line("epoch 3/16").kind == "epoch"
    ev = parse_line("saving checkpoint: /out/my-lora-000003.safetensors")
    assert ev.kind == "checkpoint" and ev.path == "/out/my-lora-000003.safetensors"
    assert parse_line("INFO:musubi_tuner.training.trainer_base:model saved.").kind == "saved"
    assert parse_line("removing old checkpoint: /out/a-000001.safetensors").kind == "removed"
    assert parse_line("  total optimization steps / 学習ステップ数: 1600").total == 1600
    assert parse_line("12it [00:03,  3.50it/s]").kind == "count"
    assert parse_line("INFO:root:loading model") is None
    assert parse_line("") is None


def test_state_follows_the_training_bar_not_the_sampling_bar():
    state = ProgressState()
    state.feed("  total optimization steps / 学習ステップ数: 20")
    state.feed("epoch 1/2")
    state.feed("steps:  10%|█         | 2/20 [00:02<00:18,  1.00it/s, avr_loss=0.5]")
    state.feed(" 40%|████      | 8/20 [00:01<00:01,  8.00it/s]")  # a sampling bar during training
    state.feed("steps:  15%|█▌        | 3/20 [00:03<00:17,  1.00it/s, avr_loss=0.4]")
    state.feed("saving checkpoint: /o/x-000001.safetensors")
    state.feed("removing old checkpoint: /o/x-000001.safetensors")
    state.feed("model saved.")
    assert (state.step, state.total, state.epoch, state.epochs) == (3, 20, 1, 2)
    assert state.loss == 0.4 and state.loss_history == [(2, 0.5), (3, 0.4)]
    assert state.checkpoints == ["/o/x-000001.safetensors"] and state.kept_checkpoints == []
    assert state.model_saved
    assert "step 3/20" in state.summary() and "loss 0.4" in state.summary()


def test_generate_bar_drives_progress_when_there_is_no_training_bar():
    state = ProgressState()
    state.feed(" 25%|██▌       | 5/20 [00:05<00:15,  1.00it/s]")
    assert (state.step, state.total) == (5, 20) and state.loss is None
