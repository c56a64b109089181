"""Cancel timing through a real ComfyUI server, shared by the integration tier (CPU) and the
GPU server tier.

A case queues a job that would run for minutes, waits until the node is inside its long loop,
presses Cancel (``POST /interrupt``) and takes the time from the press to the server's own
``execution_interrupted`` message (its millisecond timestamp, same machine clock), which must
be under :data:`LIMIT_S`. Every case also checks that nothing was left under a final output name
and that the server is alive. Each tier runs every entry of :data:`CASES` with a
:class:`CancelJobs` that sizes the jobs for its device.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fake_musubi.fakeroot import hanging_training_prompt, make_fake_workspace
from PIL import Image

from comfy_server import ComfyServer, process_alive, widget_inputs

LIMIT_S = 2.0


def queue_prompt(server: ComfyServer, prompt: dict) -> str:
    """Queue an API prompt exactly as given (no defaults filled in); return its id."""
    return server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]


def wait_running(
    server: ComfyServer,
    prompt_id: str,
    settle: float,
    ready: Callable[[], bool] | None = None,
    timeout: float = 180,
) -> None:
    """Wait until ``prompt_id`` runs (and ``ready()`` holds), then ``settle`` more seconds.

    Fails if the job ends before then (it was too short to be cancelled) or never starts.
    """
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


def check_cancel(
    server: ComfyServer,
    prompt: dict,
    settle: float,
    ready: Callable[[], bool] | None = None,
    prefix: str | None = None,
) -> None:
    """Queue ``prompt``, cancel it once it has run ``settle`` s (after ``ready()``), assert the
    server reported the interrupt within :data:`LIMIT_S` and, with ``prefix``, that no file
    under that output name was written."""
    prompt_id = queue_prompt(server, prompt)
    wait_running(server, prompt_id, settle, ready)
    took = cancel_seconds(server, prompt_id)
    assert took < LIMIT_S, f"cancel took {took:.2f} s"
    if prefix is not None:
        assert not list(server.output_dir.glob(f"{prefix}*")), f"a cancelled job saved {prefix}*"


# ---------------------------------------------------------------------------------------
# The cases: one per long node, sized by each tier
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CancelJobs:
    """How a tier sizes the long jobs: model and picture names (in the server's folders) and
    amounts of work that still run after each case's settle time on that tier's device."""

    ckpt: str  # an SD1.5 checkpoint
    upscaler: str  # the upscale model USDU runs before tiling
    batch_upscaler: str  # the model of the automatic-batch case
    picture: str  # input picture of the upscaler and USDU cases
    frames: int  # copies of the picture in the automatic batch
    usdu: dict  # USDU widget overrides (steps, tiles, ...)
    latent: tuple[int, int]  # side and batch size of the First Block Cache sampling
    sampler_steps: int  # of that sampling
    train_steps: int  # of Train LoRA, which saves a checkpoint after every step
    settle: dict[str, float] = field(default_factory=dict)  # seconds per case name, over DEFAULT_SETTLE


DEFAULT_SETTLE = {"upscaler_automatic_batch": 3.0, "usdu": 4.0, "fbcache_sampling": 4.0, "train_lora": 1.0}


def _settle(jobs: CancelJobs, case: str) -> float:
    """Seconds ``case`` runs before Cancel is pressed."""
    return jobs.settle.get(case, DEFAULT_SETTLE[case])


def sd_base(ckpt: str) -> dict:
    """Checkpoint loader (node 1) and positive/negative prompts (nodes 2, 3)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a sharp photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
    }


def save_image(source: list, prefix: str) -> dict:
    """A SaveImage node writing ``source`` under ``prefix``."""
    return {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": prefix}}


def upscaler_prompt(server: ComfyServer, jobs: CancelJobs, prefix: str) -> dict:
    """``jobs.frames`` copies of the picture through SpeedKit_UpscaleImageCUDA (its widget
    defaults: automatic batch), saved under ``prefix``."""
    info = server.object_info()
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": jobs.picture}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": jobs.frames}},
        "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": jobs.batch_upscaler}},
        "4": {
            "class_type": "SpeedKit_UpscaleImageCUDA",
            "inputs": widget_inputs(info, "SpeedKit_UpscaleImageCUDA", upscale_model=["3", 0], image=["2", 0]),
        },
        "5": save_image(["4", 0], prefix),
    }


def upscaler_automatic_batch(server: ComfyServer, tmp_path: Path, jobs: CancelJobs) -> None:
    """``jobs.frames`` copies of the picture in SpeedKit_UpscaleImageCUDA's automatic batch (the
    case that once took 47 s to stop)."""
    prompt = upscaler_prompt(server, jobs, "cancel_upscale")
    check_cancel(server, prompt, _settle(jobs, "upscaler_automatic_batch"), prefix="cancel_upscale")


def usdu(server: ComfyServer, tmp_path: Path, jobs: CancelJobs) -> None:
    """SpeedKit_UltimateSDUpscale on the picture with ``jobs.usdu``'s steps and tiles."""
    info = server.object_info()
    prompt = sd_base(jobs.ckpt)
    prompt["4"] = {"class_type": "LoadImage", "inputs": {"image": jobs.picture}}
    prompt["5"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": jobs.upscaler}}
    prompt["10"] = {
        "class_type": "SpeedKit_UltimateSDUpscale",
        "inputs": widget_inputs(
            info, "SpeedKit_UltimateSDUpscale", image=["4", 0], model=["1", 0], positive=["2", 0],
            negative=["3", 0], vae=["1", 2], upscale_model=["5", 0], **jobs.usdu,
        ),
    }  # fmt: skip
    prompt["11"] = save_image(["10", 0], "cancel_usdu")
    check_cancel(server, prompt, _settle(jobs, "usdu"), prefix="cancel_usdu")


def fbcache_sampling(server: ComfyServer, tmp_path: Path, jobs: CancelJobs) -> None:
    """A KSampler on a SpeedKit_FirstBlockCache-patched model, from an empty latent."""
    info = server.object_info()
    side, batch = jobs.latent
    prompt = sd_base(jobs.ckpt)
    prompt["4"] = {
        "class_type": "SpeedKit_FirstBlockCache",
        "inputs": widget_inputs(info, "SpeedKit_FirstBlockCache", model=["1", 0]),
    }
    prompt["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": batch}}
    prompt["6"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0], "seed": 1,
            "steps": jobs.sampler_steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        },
    }  # fmt: skip
    prompt["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    prompt["8"] = save_image(["7", 0], "cancel_fbcache")
    # ComfyUI does not check Cancel while it loads the model (stock code, seconds on a busy GPU):
    # press it once the sampler's progress bar has started
    bar = f"/{jobs.sampler_steps} ["
    bars = server.log_text().count(bar)
    check_cancel(
        server,
        prompt,
        _settle(jobs, "fbcache_sampling"),
        ready=lambda: server.log_text().count(bar) > bars,
        prefix="cancel_fbcache",
    )


def train_lora(server: ComfyServer, tmp_path: Path, jobs: CancelJobs) -> None:
    """SpeedKit_TrainLoRA saving after every step: Cancel keeps a LoRA under the final name and
    no ``.partial``/``.tmp`` file. Removes what the run wrote."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 120, 200 - 40 * i)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"sks square {i}")
    info = server.object_info()
    name = f"cancel_lora_{uuid.uuid4().hex[:6]}"
    prompt = sd_base(jobs.ckpt)
    prompt["4"] = {
        "class_type": "SpeedKit_TrainLoRA",
        "inputs": widget_inputs(
            info, "SpeedKit_TrainLoRA", model=["1", 0], clip=["1", 1], vae=["1", 2], dataset_folder=str(data),
            output_name=name, steps=jobs.train_steps, rank=4, alpha=4.0, resolution=64, batch_size=2,
            min_bucket=64, max_bucket=128, save_every=1, keep_last=1,
        ),
    }  # fmt: skip
    loras = server.models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    state = server.output_dir / "speedkit_lora_state" / f"{name}-state.json"
    try:  # the state is written after the first step
        check_cancel(server, prompt, _settle(jobs, "train_lora"), ready=state.is_file)
        kept = sorted(p.name for p in loras.glob(f"{name}*"))
        assert f"{name}.safetensors" in kept, f"a cancelled training kept no LoRA: {kept}"
        assert not [k for k in kept if k.endswith((".partial", ".tmp"))], kept
    finally:
        for path in [*loras.glob(f"{name}*"), *state.parent.glob(f"{name}*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def musubi_training_tree(server: ComfyServer, tmp_path: Path, jobs: CancelJobs) -> None:
    """A musubi-tuner training (the fake CLI hanging with a child process; no GPU work): both
    processes gone after Cancel, no LoRA written."""
    root, data, models = make_fake_workspace(tmp_path)
    pid_file = tmp_path / "pids"
    prompt = hanging_training_prompt(
        server.object_info(), root, data, models / "dit.safetensors", tmp_path / "out", pid_file, "cancel_timing"
    )

    def both_processes_up() -> bool:
        return pid_file.exists() and len(pid_file.read_text().split()) >= 2

    check_cancel(server, prompt, settle=0.5, ready=both_processes_up)
    pids = [int(p) for p in pid_file.read_text().split()]  # appended to only: it outlives the processes
    assert not [p for p in pids if process_alive(p)], "musubi processes survived Cancel"
    assert not list((tmp_path / "out").glob("cancel_lora*.safetensors"))


CASES: dict[str, Callable[[ComfyServer, Path, CancelJobs], None]] = {
    case.__name__: case for case in (upscaler_automatic_batch, usdu, fbcache_sampling, train_lora, musubi_training_tree)
}
