"""``SpeedKit_UpscaleImageCUDA`` inside a real ComfyUI (CPU): schema, a full prompt with the
stock model loader, and the same picture as ComfyUI's own "Upscale Image (using Model)"."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact

pytestmark = pytest.mark.integration
NODE = "SpeedKit_UpscaleImageCUDA"


def test_schema_has_tooltips_on_every_input_and_output(comfy_server):
    info = comfy_server.object_info()[NODE]
    assert info["category"] == "SpeedKit/upscaling" and info["description"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert list(inputs) == [
        "upscale_model",
        "image",
        "use_autocast",
        "precision",
        "tile_size",
        "overlap",
        "enable_compile",
        "compile_mode",
        "optimization_level",
        "batch_size",
        "keep_model_loaded",
    ]
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert all(info["output_tooltips"]), info["output_tooltips"]


def test_prompt_matches_stock_upscale_node(comfy_server):
    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=2)
    folder = comfy_server.models_dir / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "tiny_compact_x2.safetensors"
    save_file(net.state_dict(), str(model_file))
    try:
        _run_and_compare(comfy_server)
    finally:
        # Other tests check example workflows against the (then empty) model list.
        model_file.unlink()


def _run_and_compare(comfy_server):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(comfy_server.input_dir / "upscale_in.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "upscale_in.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny_compact_x2.safetensors"}},
        "3": {
            "class_type": NODE,
            "inputs": {
                "upscale_model": ["2", 0],
                "image": ["1", 0],
                "use_autocast": "enable",
                "precision": "auto",
                "tile_size": 32,
                "overlap": 24,
                "enable_compile": "enable",  # no CUDA here: falls back to eager with a log line
                "compile_mode": "regional",
                "optimization_level": "balanced",
                "batch_size": 0,
                "keep_model_loaded": False,
            },
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "speedkit_up"}},
        "5": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "stock_up"}},
    }
    entry = comfy_server.run_prompt(prompt)
    ours = entry["outputs"]["4"]["images"][0]["filename"]
    stock = entry["outputs"]["6"]["images"][0]["filename"]
    a = np.asarray(Image.open(comfy_server.output_dir / ours), dtype=np.int16)
    b = np.asarray(Image.open(comfy_server.output_dir / stock), dtype=np.int16)
    assert a.shape == b.shape == (80, 112, 3)
    # 8-bit PNGs of the same picture: at most one level of rounding apart.
    assert int(np.abs(a - b).max()) <= 1
    assert "compile unavailable" in comfy_server.log_text()


EMBEDDED = Path(__file__).resolve().parents[2] / "upscale_cuda" / "models" / "realesr-animevideov3-x4.safetensors"


def interrupt_and_time(server, prompt_id: str, wait: float) -> float:
    """Press Cancel; seconds until the prompt ended as interrupted (fails if it did not within ``wait``)."""
    server.interrupt()
    stopped = time.monotonic()
    entry = None
    while time.monotonic() - stopped < wait:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.05)
    took = time.monotonic() - stopped
    assert entry is not None, "the prompt never ended after the interrupt"
    messages = [m[0] for m in entry["status"].get("messages", [])]
    assert "execution_interrupted" in messages, messages
    return took


def test_cancel_stops_a_long_batch_quickly(comfy_server):
    folder = comfy_server.models_dir / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "speedkit_cancel_test.safetensors"
    shutil.copy(EMBEDDED, model_file)
    Image.fromarray(np.full((256, 256, 3), 100, np.uint8)).save(comfy_server.input_dir / "cancel_in.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cancel_in.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 64}},
        "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_file.name}},
        "4": {
            "class_type": NODE,
            "inputs": {
                "upscale_model": ["3", 0],
                "image": ["2", 0],
                "use_autocast": "enable",
                "precision": "auto",
                "tile_size": 64,
                "overlap": 16,
                "enable_compile": "disable",
                "compile_mode": "regional",
                "optimization_level": "balanced",
                "batch_size": 1,
                "keep_model_loaded": False,
            },
        },
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    try:
        prompt_id = comfy_server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
        time.sleep(4.0)  # well inside the minutes this batch needs on a CPU
        assert not comfy_server.get(f"/history/{prompt_id}"), "the batch finished before it could be cancelled"
        took = interrupt_and_time(comfy_server, prompt_id, wait=30)
        assert took < 3.0, f"cancel took {took:.1f} s"
    finally:
        model_file.unlink()


def test_keep_model_loaded_registers_with_comfyui_and_survives_unload(comfy_server):
    """keep_model_loaded hands our copy to ComfyUI's model management (it logs the load),
    ComfyUI's own 'Unload models' evicts it, and the next run works and gives the same picture."""
    torch.manual_seed(1)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    folder = comfy_server.models_dir / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "tiny_keep_x2.safetensors"
    save_file(net.state_dict(), str(model_file))
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(comfy_server.input_dir / "keep_in.png")

    def prompt(level: str, prefix: str) -> dict:
        return {
            "1": {"class_type": "LoadImage", "inputs": {"image": "keep_in.png"}},
            "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_file.name}},
            "3": {
                "class_type": NODE,
                "inputs": {
                    "upscale_model": ["2", 0],
                    "image": ["1", 0],
                    "use_autocast": "disable",
                    "precision": "auto",
                    "tile_size": 0,
                    "overlap": 0,
                    "enable_compile": "disable",
                    "compile_mode": "regional",
                    "optimization_level": level,  # differs per run so ComfyUI re-executes the node
                    "batch_size": 0,
                    "keep_model_loaded": True,
                },
            },
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
        }

    def picture(entry: dict) -> np.ndarray:
        name = entry["outputs"]["4"]["images"][0]["filename"]
        return np.asarray(Image.open(comfy_server.output_dir / name), dtype=np.int16)

    marker = "Requested to load ModuleList"  # ComfyUI's log line for our registered copy
    try:
        before = comfy_server.log_text().count(marker)
        first = picture(comfy_server.run_prompt(prompt("balanced", "speedkit_keep_a")))
        assert comfy_server.log_text().count(marker) == before + 1
        comfy_server.post("/free", {"unload_models": True})
        time.sleep(2.0)  # the prompt worker applies the flag between prompts
        second = picture(comfy_server.run_prompt(prompt("speed", "speedkit_keep_b")))
        assert comfy_server.log_text().count(marker) == before + 2
        assert first.shape == second.shape == (48, 64, 3)
        assert int(np.abs(first - second).max()) == 0  # fp32, whole frame both times
    finally:
        model_file.unlink()


def test_cancel_inside_one_long_automatic_batch_call(comfy_server, real_model_path):
    # RRDB on the CPU with the automatic batch: several 256 px frames share one model call of
    # tens of seconds, so the cancel has to be honoured inside the call, not after it.
    source = real_model_path("RealESRGAN_x4plus.safetensors")
    folder = comfy_server.models_dir / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "speedkit_cancel_rrdb.safetensors"
    shutil.copy(source, model_file)
    Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(comfy_server.input_dir / "cancel_rrdb.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cancel_rrdb.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 30}},
        "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_file.name}},
        "4": {"class_type": NODE, "inputs": {"upscale_model": ["3", 0], "image": ["2", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    try:
        prompt_id = comfy_server.queue_prompt(prompt)
        time.sleep(5.0)  # inside the first model call by now (one 256 px RRDB frame takes seconds on a CPU)
        assert not comfy_server.get(f"/history/{prompt_id}"), "the batch finished before it could be cancelled"
        took = interrupt_and_time(comfy_server, prompt_id, wait=60)
        assert took < 2.0, f"cancel took {took:.1f} s"
    finally:
        model_file.unlink()
