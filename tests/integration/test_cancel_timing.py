"""Cancel within 2 s for every long node, measured through a real ComfyUI server (CPU).

Each case queues a job that would run for minutes, waits until the node is inside its long
loop, presses Cancel (``POST /interrupt``) and takes the time from the press to the server's
own ``execution_interrupted`` message (its millisecond timestamp, same machine clock). Every
case also checks that nothing was left under a final output name and that the server is alive.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from fake_musubi.fakeroot import FAKE_SITE, make_fake_root
from PIL import Image
from tiny_models import build_models

from comfy_server import ComfyServer, free_port, process_alive, widget_inputs

pytestmark = pytest.mark.integration

LIMIT_S = 2.0
CKPT = "cancel_tiny_sd15.safetensors"
UPSCALER = "cancel_tiny_compact_x2.safetensors"
EMBEDDED = Path(__file__).resolve().parents[2] / "upscale_cuda" / "models" / "realesr-animevideov3-x4.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own (interrupted runs leave tracebacks in its log, which the shared
    server's log checks would take for the pack's errors), with a tiny SD1.5 checkpoint,
    upscalers and an input picture."""
    from conftest import comfyui_root

    comfy = ComfyServer(root=comfyui_root(), work=tmp_path_factory.mktemp("cancel_server"), port=free_port())
    build_models(comfy.root, comfy.models_dir / "checkpoints" / CKPT, comfy.models_dir / "upscale_models" / UPSCALER)
    shutil.copyfile(EMBEDDED, comfy.models_dir / "upscale_models" / "cancel_anime_x4.safetensors")
    comfy.input_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(comfy.input_dir / "cancel_256.png")
    comfy.start()
    try:
        yield comfy
    finally:
        comfy.stop()


def _queue(server: ComfyServer, prompt: dict) -> str:
    return server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]


def _wait_running(server: ComfyServer, prompt_id: str, settle: float, ready=None, timeout: float = 180) -> None:
    """Wait until ``prompt_id`` runs (and ``ready()`` holds), then ``settle`` more seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [item[1] for item in server.get("/queue")["queue_running"]]
        if prompt_id in running and (ready is None or ready()):
            break
        assert not server.get(f"/history/{prompt_id}"), "the job ended before it could be cancelled"
        time.sleep(0.05)
    else:
        raise AssertionError("the job never started:\n" + server.log_text()[-3000:])
    time.sleep(settle)
    assert not server.get(f"/history/{prompt_id}"), "the job ended before it could be cancelled"


def cancel_seconds(server: ComfyServer, prompt_id: str, wait: float = 60) -> float:
    """Press Cancel; seconds from the press to the server's ``execution_interrupted`` stamp."""
    pressed = time.time()
    server.interrupt()
    deadline = time.monotonic() + wait
    entry = None
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.05)
    assert entry is not None, f"the job did not end within {wait} s of Cancel"
    stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
    assert "execution_interrupted" in stamps, f"not reported as interrupted: {list(stamps)}"
    assert server.alive()
    return stamps["execution_interrupted"] / 1000.0 - pressed


def _base(info: dict) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a sharp photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
    }


def test_upscaler_automatic_batch_cancels_within_2s(server):
    """30 frames in the automatic batch (the case that once took 47 s to stop)."""
    info = server.object_info()
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cancel_256.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 30}},
        "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "cancel_anime_x4.safetensors"}},
        "4": {
            "class_type": "SpeedKit_UpscaleImageCUDA",
            "inputs": widget_inputs(info, "SpeedKit_UpscaleImageCUDA", upscale_model=["3", 0], image=["2", 0]),
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "cancel_upscale"}},
    }
    pid = _queue(server, prompt)
    _wait_running(server, pid, settle=3.0)
    took = cancel_seconds(server, pid)
    assert took < LIMIT_S, f"cancel took {took:.2f} s"
    assert not list(server.output_dir.glob("cancel_upscale*"))


def test_usdu_cancels_within_2s(server):
    info = server.object_info()
    prompt = _base(info)
    prompt["4"] = {"class_type": "LoadImage", "inputs": {"image": "cancel_256.png"}}
    prompt["5"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALER}}
    prompt["10"] = {
        "class_type": "SpeedKit_UltimateSDUpscale",
        "inputs": widget_inputs(
            info, "SpeedKit_UltimateSDUpscale", image=["4", 0], model=["1", 0], positive=["2", 0],
            negative=["3", 0], vae=["1", 2], upscale_model=["5", 0], steps=400, denoise=0.5,
            tile_width=64, tile_height=64, seed=3,
        ),
    }  # fmt: skip
    prompt["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "cancel_usdu"}}
    pid = _queue(server, prompt)
    _wait_running(server, pid, settle=4.0)
    took = cancel_seconds(server, pid)
    assert took < LIMIT_S, f"cancel took {took:.2f} s"
    assert not list(server.output_dir.glob("cancel_usdu*"))


def test_fbcache_patched_sampling_cancels_within_2s(server):
    info = server.object_info()
    prompt = _base(info)
    prompt["4"] = {
        "class_type": "SpeedKit_FirstBlockCache",
        "inputs": widget_inputs(info, "SpeedKit_FirstBlockCache", model=["1", 0]),
    }
    prompt["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 4}}
    prompt["6"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
            "seed": 1, "steps": 5000, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        },
    }  # fmt: skip
    prompt["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    prompt["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "cancel_fbcache"}}
    pid = _queue(server, prompt)
    _wait_running(server, pid, settle=4.0)
    took = cancel_seconds(server, pid)
    assert took < LIMIT_S, f"cancel took {took:.2f} s"
    assert not list(server.output_dir.glob("cancel_fbcache*"))


def test_train_lora_cancels_within_2s_and_keeps_a_checkpoint(server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 120, 200 - 40 * i)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"sks square {i}")
    info = server.object_info()
    name = f"cancel_lora_{uuid.uuid4().hex[:6]}"
    prompt = _base(info)
    prompt["4"] = {
        "class_type": "SpeedKit_TrainLoRA",
        "inputs": widget_inputs(
            info, "SpeedKit_TrainLoRA", model=["1", 0], clip=["1", 1], vae=["1", 2], dataset_folder=str(data),
            output_name=name, steps=100000, rank=4, alpha=4.0, resolution=64, batch_size=2, min_bucket=64,
            max_bucket=128, save_every=1, keep_last=1,
        ),
    }  # fmt: skip
    loras = server.models_dir / "loras"
    state = server.output_dir / "speedkit_lora_state" / f"{name}-state.json"
    pid = _queue(server, prompt)
    try:
        _wait_running(server, pid, settle=1.0, ready=state.is_file)  # written after the first step
        took = cancel_seconds(server, pid)
        assert took < LIMIT_S, f"cancel took {took:.2f} s"
        kept = sorted(p.name for p in loras.glob(f"{name}*"))
        assert f"{name}.safetensors" in kept, f"a cancelled training kept no LoRA: {kept}"
        assert not [k for k in kept if k.endswith((".partial", ".tmp"))], kept
    finally:
        for path in [*loras.glob(f"{name}*"), *state.parent.glob(f"{name}*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_musubi_training_cancels_within_2s_and_its_tree_is_gone(server, tmp_path):
    root = make_fake_root(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (i * 100, 50, 50)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a test image {i}")
    (tmp_path / "dit.safetensors").write_bytes(b"x")
    pid_file = tmp_path / "pids"
    info = server.object_info()
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widget_inputs(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_MODE=hang\nFAKE_MUSUBI_CHILD=1\n"
                      f"FAKE_MUSUBI_PIDFILE={pid_file}")},
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widget_inputs(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name="cancel_timing")},
        "3": {"class_type": "MusubiTuner_TrainLoRA_HunyuanVideo", "inputs": widget_inputs(
            info, "MusubiTuner_TrainLoRA_HunyuanVideo", musubi_env=["1", 0], dataset=["2", 0],
            dit=str(tmp_path / "dit.safetensors"), output_name="cancel_lora", output_dir=str(tmp_path / "out"))},
    }  # fmt: skip
    pid = _queue(server, prompt)

    def both_processes_up() -> bool:
        return pid_file.exists() and len(pid_file.read_text().split()) >= 2

    _wait_running(server, pid, settle=0.5, ready=both_processes_up)
    pids = [int(p) for p in pid_file.read_text().split()]
    took = cancel_seconds(server, pid)
    assert took < LIMIT_S, f"cancel took {took:.2f} s"
    assert not [p for p in pids if process_alive(p)], "musubi processes survived Cancel"
    assert not list((tmp_path / "out").glob("cancel_lora*.safetensors"))
