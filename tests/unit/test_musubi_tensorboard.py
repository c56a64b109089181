"""TrainingMonitor's TensorBoard reading against real event files laid out as musubi writes them.

musubi's trainer (training/trainer_base.py + accelerator_setup.py) logs through accelerate's
TensorBoardTracker: ``<logging_dir>/<log_prefix><timestamp>/network_train/events...``, an
``add_hparams`` sub-folder, ``loss/current``, ``loss/average`` and ``lr/<group>`` every step and
``loss/epoch`` at step = epoch number. The files here are written with torch's SummaryWriter the
same way the tracker calls it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest

from speedkit.musubi import monitor

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard): nothing to read")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402 - needs tensorboard


def write_run(logs: Path, name: str, steps: int, epochs: int = 2, start: int = 1, scale: float = 1.0) -> Path:
    """One musubi training run's TensorBoard files (as accelerate's TensorBoardTracker writes them)."""
    writer = SummaryWriter(str(logs / name / "network_train"))
    writer.add_hparams({"learning_rate": 2e-4, "network_dim": 32, "optimizer_type": "AdamW8bit"}, metric_dict={})
    for step in range(start, start + steps):
        for tag, value in {
            "loss/current": scale / step,
            "loss/average": scale / step + 0.01,
            "lr/unet": 2e-4 * min(1.0, step / 4),
        }.items():
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()
    for epoch in range(epochs):
        writer.add_scalar("loss/epoch", scale * 0.5 / (epoch + 1), global_step=epoch + 1)
    writer.close()
    return logs / name


def test_reads_musubis_curves_from_a_run(tmp_path):
    logs = tmp_path / "logs"
    write_run(logs, "mylora_20260101120000", steps=12)
    tb = monitor.read_tensorboard(logs)
    assert tb.runs == ["mylora_20260101120000"] and tb.run == "mylora_20260101120000"
    assert set(tb.series) == {"loss/current", "loss/average", "lr/unet", "loss/epoch"}
    steps, values = zip(*tb.series["loss/current"], strict=True)
    assert list(steps) == list(range(1, 13))
    np.testing.assert_allclose(values, [1 / s for s in range(1, 13)], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in tb.series["lr/unet"]][:5], [5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4], rtol=1e-6)
    assert tb.series["loss/epoch"] == [(1, 0.5), (2, 0.25)]
    per_step, per_epoch = monitor.split_epoch_series(tb.series)
    assert set(per_epoch) == {"loss/epoch"} and "loss/epoch" not in per_step
    img = monitor.plot_series(per_step, 320, 160)
    assert img.shape == (160, 320, 3) and (img != img[0, 0]).any(axis=-1).sum() > 300
    # the run folder itself, or musubi's network_train folder, gives the same curves
    for inner in (logs / "mylora_20260101120000", logs / "mylora_20260101120000" / "network_train"):
        assert monitor.scalars_from_tensorboard(inner) == tb.series


def test_runs_are_not_mixed_and_the_newest_is_read(tmp_path):
    logs = tmp_path / "logs"
    old = write_run(logs, "lora_20260101120000", steps=8, scale=2.0)
    write_run(logs, "lora_20260102090000", steps=5)
    past = time.time() - 3600
    for f in old.rglob("events.out.tfevents.*"):
        os.utime(f, (past, past))
    tb = monitor.read_tensorboard(logs)
    assert tb.runs == ["lora_20260101120000", "lora_20260102090000"] and tb.run == "lora_20260102090000"
    assert [s for s, _ in tb.series["loss/current"]] == [1, 2, 3, 4, 5]  # steps restart per run: never appended
    older = monitor.scalars_from_tensorboard(logs, run="lora_20260101120000")
    assert len(older["loss/current"]) == 8 and older["loss/current"][0] == (1, 2.0)
    with pytest.raises(ValueError, match="run 'nope' has no scalars under .*runs: lora_20260101120000"):
        monitor.read_tensorboard(logs, run="nope")


def test_a_resumed_run_keeps_the_last_value_of_a_step(tmp_path):
    logs = tmp_path / "logs"
    run = logs / "lora_20260101120000" / "network_train"
    first = SummaryWriter(str(run))
    for step in range(1, 7):
        first.add_scalar("loss/current", 1.0, global_step=step)
    first.close()
    time.sleep(0.01)
    second = SummaryWriter(str(run))  # resumed from step 4: steps 4..6 are logged again
    for step in range(4, 9):
        second.add_scalar("loss/current", 0.25, global_step=step)
    second.close()
    series = monitor.scalars_from_tensorboard(logs)["loss/current"]
    assert series == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.25), (5, 0.25), (6, 0.25), (7, 0.25), (8, 0.25)]


def test_missing_or_empty_logs_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="holds no TensorBoard event files: train with log_tensorboard on"):
        monitor.read_tensorboard(tmp_path)
    writer = SummaryWriter(str(tmp_path / "logs" / "lora_1" / "network_train"))
    writer.add_hparams({"a": 1}, metric_dict={})  # what exists before the first step is logged
    writer.close()
    with pytest.raises(ValueError, match="has event files but no scalars yet"):
        monitor.read_tensorboard(tmp_path / "logs")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match="needs the tensorboard package .*pip install tensorboard"):
        monitor.read_tensorboard(tmp_path / "logs")
