"""Train LoRA's replayed steps against its eager steps, in the server, under every setting.

The same 20-step SDXL run (full-size checkpoint, rank 32, bf16, same seed) is trained twice
through the API: with ``cuda_graphs`` on (the default) and off. Under each server setting the
graphed run must record its graphs (in ComfyUI's process under PyTorch's native allocator, in a
worker process under cudaMallocAsync) and train the LoRA the eager run trains in ComfyUI's
process, within bf16 rounding. The server must
survive (the session fixture also fails on fatal lines in its log).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from test_example_workflows_in_server import SDXL_NAME, make_dataset, sdxl_checkpoint  # noqa: F401 - fixture

from comfy_server import PromptError
from speedkit.torch_utils import GRAPHS_WITH_MALLOC_ASYNC_ENV

pytestmark = pytest.mark.gpu
STEPS = 20


def in_worker(setting: str) -> bool:
    """Whether the pack trains in a worker process in a server started with ``setting`` (every
    setting but ``--disable-cuda-malloc`` allocates with cudaMallocAsync, see lora_train/worker.py)."""
    return setting != "disable-cuda-malloc" and os.environ.get(GRAPHS_WITH_MALLOC_ASYNC_ENV) != "1"


def train_prompt(dataset: str, name: str, cuda_graphs: bool, checkpointing: str = "auto") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_NAME}},
        "7": {
            "class_type": "SpeedKit_TrainLoRA",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "dataset_folder": dataset,
                "output_name": name,
                "steps": STEPS,
                "rank": 32,
                "resolution": 512,
                "precision": "bf16",
                "seed": 3,
                "save_precision": "fp32",
                "cuda_graphs": cuda_graphs,
                "gradient_checkpointing": checkpointing,
            },
        },
    }


def test_graphed_training_matches_eager(gpu_server, sdxl_checkpoint):  # noqa: F811
    tag = gpu_server.setting
    dataset = make_dataset(gpu_server.input_dir / "train_set")
    before = len(gpu_server.log_text())
    gpu_server.run_prompt(train_prompt(str(dataset), f"graphed_{tag}", True), 1200)
    log = gpu_server.log_text()[before:]
    gpu_server.run_prompt(train_prompt(str(dataset), f"eager_{tag}", False), 1200)
    loras = gpu_server.models_dir / "loras"
    graphed = load_file(str(loras / f"graphed_{tag}.safetensors"))
    eager = load_file(str(loras / f"eager_{tag}.safetensors"))
    assert graphed.keys() == eager.keys() and len(eager) > 100
    assert "peak VRAM" in log, log[-3000:]
    # graphs under every setting: in ComfyUI's process under the native allocator, else in a worker
    assert "recorded a CUDA graph" in log, log[-3000:]
    assert "CUDA graphs off" not in log and "did not start" not in log, log[-3000:]
    assert ("Train LoRA worker: " in log) == in_worker(tag), log[-3000:]
    # the node's default on a data-centre GPU: a trial step without checkpointing fits
    assert "gradient_checkpointing auto: off (a step without it needs" in log, log[-3000:]
    ups = [k for k in eager if "lora_up" in k]
    assert any(float(eager[k].abs().max()) > 0 for k in ups), "the eager run trained nothing"
    for key, value in eager.items():
        torch.testing.assert_close(graphed[key], value, rtol=2e-2, atol=2e-3, msg=key)
    assert gpu_server.alive()


def test_training_after_a_cancel_inside_a_block_trains(gpu_server, sdxl_checkpoint):  # noqa: F811
    """A Cancel raised inside a checkpointed UNet block (the probe presses it from the first
    ResBlock's first layer) ends that run as interrupted, and the next training run in the same
    server trains: no checkpoint region of the cancelled run is left on ComfyUI's worker thread."""
    tag = gpu_server.setting
    dataset = make_dataset(gpu_server.input_dir / "train_set")
    cancelled = train_prompt(str(dataset), f"cancelled_{tag}", True, checkpointing="on")
    cancelled["50"] = {"class_type": "SpeedKitProbe_CancelInsideBlock", "inputs": {"model": ["1", 0]}}
    cancelled["7"]["inputs"]["model"] = ["50", 0]
    with pytest.raises(PromptError) as info:
        gpu_server.run_prompt(cancelled, 900)
    assert "execution_interrupted" in str(info.value), str(info.value)[-3000:]
    before = len(gpu_server.log_text())
    after = train_prompt(str(dataset), f"after_cancel_{tag}", True, checkpointing="on")
    after["7"]["inputs"]["steps"] = 3
    gpu_server.run_prompt(after, 900)
    log = gpu_server.log_text()[before:]
    assert "3 steps in" in log, log[-3000:]
    lora = load_file(str(gpu_server.models_dir / "loras" / f"after_cancel_{tag}.safetensors"))
    assert len(lora) > 100 and all(torch.isfinite(v).all() for v in lora.values())
    assert gpu_server.alive()
