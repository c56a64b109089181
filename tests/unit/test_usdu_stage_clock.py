"""USDU's per-stage clock: host time per stage, call counts, a summary in first-run order."""

from __future__ import annotations

import time

import pytest
import torch

from usdu.stage_clock import StageClock


def test_stages_add_up_in_first_run_order():
    clock = StageClock("cpu")
    for _ in range(2):
        with clock.stage("VAE encode"):
            time.sleep(0.01)
        with clock.stage("sampling"):
            time.sleep(0.03)
    text = clock.summary()
    assert text.index("VAE encode 2x") < text.index("sampling 2x") < text.index("whole run")
    assert clock.stages["sampling"].host_s >= 0.06 > clock.stages["VAE encode"].host_s
    assert clock.gpu_seconds("sampling") is None and "GPU" not in text


def test_a_stage_that_raises_is_still_counted():
    clock = StageClock()
    with pytest.raises(RuntimeError), clock.stage("VAE decode"):
        raise RuntimeError("out of memory")
    assert clock.stages["VAE decode"].calls == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_span_covers_the_stage_work():
    clock = StageClock("cuda")
    a = torch.randn(4096, 4096, device="cuda")
    with clock.stage("sampling"):
        for _ in range(20):
            a = a @ a / 64
    assert clock.gpu_seconds("sampling") > 0 and "GPU span" in clock.summary()
