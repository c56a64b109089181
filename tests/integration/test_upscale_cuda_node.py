"""``SpeedKit_UpscaleImageCUDA`` inside a real ComfyUI (CPU): schema, a full prompt with the
stock model loader, and the same picture as ComfyUI's own "Upscale Image (using Model)"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact

from comfy_server import REPO_ROOT

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


KEPT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, weakref
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`, see the integration notes)
    import torch
    import comfy.model_management as mm
    import nodes
    from spandrel import ModelLoader
    from spandrel.architectures.Compact import Compact

    assert asyncio.run(nodes.load_custom_node(sys.argv[1]))
    node = nodes.NODE_CLASS_MAPPINGS["SpeedKit_UpscaleImageCUDA"]

    def descriptor(seed):
        torch.manual_seed(seed)
        net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
        return ModelLoader().load_from_state_dict(net.state_dict()).eval()

    def registered():
        # our registrations in ComfyUI's loaded list, read through its public accessor
        return [p for p in mm.loaded_models() if any(p is k for k in node.kept)]

    def run(model, keep):
        out = node.PREPARE_CLASS_CLONE({"hidden_inputs": {}}).execute(
            upscale_model=model, image=image, use_autocast="disable", keep_model_loaded=keep
        ).args[0]
        return out

    image = torch.rand(1, 24, 32, 3, generator=torch.Generator().manual_seed(0))
    a, b = descriptor(1), descriptor(2)
    shared = {k: (v.data_ptr(), v.dtype, v.device, v.clone()) for k, v in a.model.state_dict().items()}
    base = len(mm.loaded_models())
    result = {}
    first = run(a, True)
    patcher = registered()
    result["first"] = [len(patcher), len(mm.loaded_models()) - base]
    result["holds_kept_copies"] = [id(m) for m in patcher[0].model] == [id(m) for m in node.cache.kept_modules()]
    result["not_the_shared_model"] = all(m is not a.model for m in patcher[0].model)
    old = weakref.ref(patcher[0])
    del patcher
    again = run(a, True)
    result["again"] = [len(registered()), len(mm.loaded_models()) - base]
    result["old_freed"] = old() is None
    result["same_picture"] = bool(torch.equal(first, again))
    run(b, True)
    result["other_model"] = [len(registered()), len(mm.loaded_models()) - base]
    run(b, False)
    result["keep_off"] = [len(registered()), len(mm.loaded_models()) - base]
    run(a, True)
    mm.unload_all_models()
    result["after_unload"] = [len(registered()), len(node.kept)]
    result["after_unload_run_same"] = bool(torch.equal(run(a, True), first))
    result["after_unload_run"] = [len(registered()), len(mm.loaded_models()) - base]
    result["shared_untouched"] = all(
        v.data_ptr() == ptr and v.dtype == dtype and v.device == dev and torch.equal(v, ref)
        for k, v in a.model.state_dict().items()
        for ptr, dtype, dev, ref in [shared[k]]
    )
    print("RESULT" + json.dumps(result))
    """
)


def test_keep_model_loaded_holds_exactly_one_registration(comfy_server, tmp_path):
    """keep_model_loaded through ComfyUI's public model management, in a ComfyUI process:
    every run replaces the previous registration (the old one is freed, the loaded list
    does not grow), keep off leaves none, unload_all_models evicts it, and the shared
    UPSCALE_MODEL is never moved, cast or modified."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    pack = tmp_path / "ComfyUI-SpeedKit"
    pack.symlink_to(REPO_ROOT, target_is_directory=True)
    proc = subprocess.run(
        [python, "-c", KEPT_SCRIPT, str(pack)],
        cwd=comfy_server.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT") :])
    assert result["first"] == [1, 1]
    assert result["holds_kept_copies"] and result["not_the_shared_model"]
    assert result["again"] == [1, 1] and result["old_freed"] and result["same_picture"]
    assert result["other_model"] == [1, 1]
    assert result["keep_off"] == [0, 0]
    assert result["after_unload"] == [0, 1]  # evicted by ComfyUI; our next run re-registers
    assert result["after_unload_run"] == [1, 1] and result["after_unload_run_same"]
    assert result["shared_untouched"]


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
