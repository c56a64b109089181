"""Every example workflow of the pack, converted as the front end converts it and queued on a
live ComfyUI on the GPU, under every server setting.

The graphs run as saved; only run length is cut (sampling steps, training steps) and the
training example gets a small dataset. The SDXL examples load a full-size SDXL checkpoint with
random weights under the file name the workflow names, built once per session on the GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from server_cases import make_photo
from tiny_models import build_sdxl

from comfy_server import REPO_ROOT, workflow_to_prompt

pytestmark = pytest.mark.gpu
WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
SDXL_NAME = "sd_xl_base_1.0.safetensors"
# The Musubi examples run musubi-tuner's scripts in its own venv, outside ComfyUI's process and
# with its own multi-GB models: their graphs are run against a fake musubi CLI on the CPU tier.
OUTSIDE_THE_SERVER = {"musubi_hunyuan_generate.json", "musubi_wan_lora_training.json"}


@pytest.fixture(scope="session")
def sdxl_checkpoint(gpu_assets) -> Path:
    from server_cases import comfyui_root_for_gpu

    return build_sdxl(comfyui_root_for_gpu(), gpu_assets / "checkpoints" / SDXL_NAME)


def short_run(dataset: Path) -> dict:
    """Inputs replaced for a test run: fewer sampling and training steps, a real dataset folder."""
    return {
        "KSampler": {"steps": 4},
        "SpeedKit_UltimateSDUpscale": {"steps": 3},
        "SpeedKit_TrainLoRA": {
            "dataset_folder": str(dataset),
            "steps": 3,
            "save_every": 2,
            # the between-steps work runs too: sample images and a validation loss
            "sample_every": 2,
            "sample_prompts": "a photo of sks person --s 2 --w 512 --h 512",
            "validation_split": 0.5,
            "validate_every": 2,
        },
    }


def make_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        Image.fromarray(make_photo(1024, 1024, seed=k)).save(folder / f"img{k}.png")
        (folder / f"img{k}.txt").write_text(f"photo of sks person, picture {k}")
    return folder


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_example_workflow_runs(gpu_server, path: Path, request, tmp_path):
    if path.name in OUTSIDE_THE_SERVER:
        pytest.skip(f"{path.name} runs musubi-tuner outside ComfyUI (covered with a fake CLI on the CPU tier)")
    workflow = json.loads(path.read_text())
    if SDXL_NAME in path.read_text():
        request.getfixturevalue("sdxl_checkpoint")
    prompt = workflow_to_prompt(workflow, gpu_server.object_info(), short_run(make_dataset(tmp_path)))
    entry = gpu_server.run_prompt(prompt, timeout=int(os.environ.get("SPEEDKIT_GPU_WORKFLOW_TIMEOUT", "900")))
    saved = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    save_nodes = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert len(saved) >= len(save_nodes), entry["outputs"]
    for img in saved:  # SaveImage writes to output/, previews (the trainer's samples) to temp/
        root = gpu_server.base / ("temp" if img.get("type") == "temp" else "output")
        file = root / img.get("subfolder", "") / img["filename"]
        assert file.is_file() and file.stat().st_size > 0
    assert gpu_server.alive()
