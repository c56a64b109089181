"""Every architecture musubi-tuner v0.3.4 ships, through a real ComfyUI and the fake musubi CLI:
cache + train, generate, full fine-tuning, samples shown while training, several GPUs, and the
helper tools. One parametrized test per function, over the architectures of ``musubi/arch.py``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest
from fake_musubi.fakeroot import FAKE_SITE, make_fake_workspace
from PIL import Image

from comfy_server import widget_inputs as widgets
from speedkit.musubi import arch as archs

pytestmark = pytest.mark.integration

TABLE_ARCHS = [k for k, s in archs.ARCHS.items() if s.table_driven]
TRAINERS = [(k, t.function) for k, s in archs.ARCHS.items() for t in s.trainers]


@pytest.fixture
def setup(comfy_server, tmp_path):
    return make_fake_workspace(tmp_path, ("dit.safetensors", "vae.safetensors", "te.safetensors"))


def env_node(info, root, tmp_path, extra: str = "") -> dict:
    argv_file = tmp_path / "argv.json"
    env = f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_ARGV={argv_file}\nFAKE_MUSUBI_STEPS_PER_EPOCH=1\n{extra}"
    return {"class_type": "MusubiTuner_Environment", "inputs": widgets(
        info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable, extra_env=env)}  # fmt: skip


def node_id(function: str, arch: str) -> str:
    return f"MusubiTuner_{function}_{archs.ARCHS[arch].node_name}"


@pytest.mark.parametrize("arch", TABLE_ARCHS)
def test_cache_and_train_lora(comfy_server, setup, tmp_path, arch):
    root, data, models = setup
    spec = archs.ARCHS[arch]
    info = comfy_server.object_info()
    te = {"text_encoder1": str(models / "te.safetensors")}
    if len(spec.te_flags) == 2:
        te["text_encoder2"] = str(models / "te.safetensors")
    out = tmp_path / "out"
    prompt = {
        "1": env_node(info, root, tmp_path),
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), cache_directory=str(tmp_path / "cache"),
            name=f"ds_{arch}")},
        "3": {"class_type": "MusubiTuner_CacheLatents", "inputs": widgets(
            info, "MusubiTuner_CacheLatents", musubi_env=["1", 0], dataset=["2", 0], architecture=arch,
            vae=str(models / "vae.safetensors") if spec.latent_vae_required else "")},
        "4": {"class_type": "MusubiTuner_CacheTextEncoder", "inputs": widgets(
            info, "MusubiTuner_CacheTextEncoder", musubi_env=["1", 0], dataset=["3", 0], architecture=arch, **te)},
        "5": {"class_type": "MusubiTuner_TrainingConfig", "inputs": widgets(
            info, "MusubiTuner_TrainingConfig", max_train_epochs=2)},
        "6": {"class_type": node_id("TrainLoRA", arch), "inputs": widgets(
            info, node_id("TrainLoRA", arch), musubi_env=["1", 0], dataset=["4", 0], training_config=["5", 0],
            dit=str(models / "dit.safetensors"), output_name=f"{arch}_lora", output_dir=str(out))},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=180)
    assert (out / f"{arch}_lora.safetensors").is_file()
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[0] == spec.train and argv[argv.index("--network_module") + 1] == spec.network_module
    assert argv[argv.index("--dit") + 1] == str(models / "dit.safetensors")
    logs = (comfy_server.output_dir / "musubi" / "datasets").glob(f"ds_{arch}_{arch}_*.log")
    assert {p.name.rsplit("_", 1)[1] for p in logs} == {"latents.log", "text.log"}


@pytest.mark.parametrize("arch", TABLE_ARCHS)
def test_generate(comfy_server, setup, tmp_path, arch):
    root, _, models = setup
    g = archs.ARCHS[arch].gen
    info = comfy_server.object_info()
    nid = node_id("GenerateVideo" if g.video else "GenerateImage", arch)
    required = {name: str(models / "vae.safetensors") for name in g.required}
    video = {"frames": 5} if g.video else {}
    prompt = {
        "1": env_node(info, root, tmp_path),
        "2": {"class_type": nid, "inputs": widgets(
            info, nid, musubi_env=["1", 0], prompt="a red fox", dit=str(models / "dit.safetensors"), width=64,
            height=48, seed=5, **video, **required)},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }  # fmt: skip
    entry = comfy_server.run_prompt(prompt, timeout=120)
    previews = entry["outputs"]["3"]["images"]
    assert len(previews) == (5 if g.video else 1)
    shown = Image.open(comfy_server.base / "temp" / previews[0]["subfolder"] / previews[0]["filename"])
    assert shown.size == (64, 48)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[0] == g.script and ("a red fox" in argv)


@pytest.mark.parametrize(("arch", "function"), TRAINERS)
def test_full_fine_tuning(comfy_server, setup, tmp_path, arch, function):
    root, data, models = setup
    trainer = next(t for t in archs.ARCHS[arch].trainers if t.function == function)
    info = comfy_server.object_info()
    nid = node_id(function, arch)
    out = tmp_path / "models_out"
    prompt = {
        "1": env_node(info, root, tmp_path),
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name=f"ft_{arch}")},
        "3": {"class_type": nid, "inputs": widgets(
            info, nid, musubi_env=["1", 0], dataset=["2", 0], dit=str(models / "dit.safetensors"),
            output_name=f"{arch}_ft", output_dir=str(out))},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=120)
    assert (out / f"{arch}_ft.safetensors").is_file()
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[0] == trainer.script and "--network_module" not in argv
    assert argv[argv.index("--learning_rate") + 1] == "1e-06"  # no Training Config: the fine-tuning default


def test_training_samples_show_on_the_node(comfy_server, setup, tmp_path):
    """Each sample musubi renders becomes the node's preview (a binary preview message) and a log line."""
    import aiohttp

    root, data, models = setup
    info = comfy_server.object_info()
    out = tmp_path / "o"
    prompt = {
        "1": env_node(info, root, tmp_path, "FAKE_MUSUBI_STEP_SLEEP=0.2"),
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name="samples")},
        "3": {"class_type": "MusubiTuner_TrainingConfig", "inputs": widgets(
            info, "MusubiTuner_TrainingConfig", max_train_epochs=3)},
        "4": {"class_type": "MusubiTuner_SamplingConfig", "inputs": widgets(
            info, "MusubiTuner_SamplingConfig", prompts="a fox", sample_every_n_epochs=1, sample_at_first=True)},
        "5": {"class_type": "MusubiTuner_TrainLoRA_ZImage", "inputs": widgets(
            info, "MusubiTuner_TrainLoRA_ZImage", musubi_env=["1", 0], dataset=["2", 0], training_config=["3", 0],
            sampling_config=["4", 0], dit=str(models / "dit.safetensors"), vae=str(models / "vae.safetensors"),
            text_encoder=str(models / "te.safetensors"), output_name="zs", output_dir=str(out))},
    }  # fmt: skip

    async def collect() -> tuple[list[dict], int]:
        events, previews = [], 0
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(comfy_server.url.replace("http", "ws") + "/ws?clientId=samples") as ws:
                # previews go only to the client that queued the prompt
                queued = {"prompt": comfy_server.with_defaults(prompt), "client_id": "samples"}
                prompt_id = comfy_server.post("/prompt", queued)["prompt_id"]
                job = asyncio.get_running_loop().run_in_executor(None, comfy_server.wait, prompt_id, 120)
                # The job counts as done when /history says so, which can be before the server
                # has sent the run's last websocket messages: read on until the socket is quiet.
                drain_until = None
                while drain_until is None or time.monotonic() < drain_until:
                    if drain_until is None and job.done():
                        drain_until = time.monotonic() + 10
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        if job.done():
                            break
                        continue
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        previews += 1
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        data_ = json.loads(msg.data)
                        if data_.get("type") == "speedkit.musubi.log":
                            events.append(data_["data"])
                await job
        return events, previews

    events, previews = asyncio.run(collect())
    samples = sorted((out / "sample").glob("zs_*_000.png"))
    assert len(samples) == 4  # before training and after each of 3 epochs
    shown = [line for e in events for line in e.get("lines", []) if line.startswith("sample: ")]
    assert sorted(line.removeprefix("sample: ") for line in shown) == [str(p) for p in samples]
    assert previews >= 4
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--sample_every_n_epochs") + 1] == "1" and "--sample_at_first" in argv


def test_several_gpus_and_resume_reach_accelerate(comfy_server, setup, tmp_path):
    root, data, models = setup
    info = comfy_server.object_info()
    state = tmp_path / "o" / "wan_multi-state"
    state.mkdir(parents=True)
    prompt = {
        "1": env_node(info, root, tmp_path),
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name="multi")},
        "3": {"class_type": "MusubiTuner_TrainLoRA_Wan", "inputs": widgets(
            info, "MusubiTuner_TrainLoRA_Wan", musubi_env=["1", 0], dataset=["2", 0], task="t2v-1.3B",
            dit=str(models / "dit.safetensors"), output_name="wan_multi", output_dir=str(tmp_path / "o"),
            gpu_ids="0,1", resume=str(state))},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=120)
    command = (tmp_path / "o" / "wan_multi_train.log").read_text().splitlines()[0]
    assert "--multi_gpu --num_processes 2 --num_machines 1" in command and "--gpu_ids 0,1" in command
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("--resume") + 1] == str(state)
    prompt["3"]["inputs"].update(num_machines=2, machine_rank=1)
    with pytest.raises(RuntimeError, match="main_process_ip is empty but num_machines=2"):
        comfy_server.run_prompt(prompt, timeout=60)


def test_caption_images_and_extract_lora(comfy_server, setup, tmp_path):
    root, data, models = setup
    for txt in data.glob("*.txt"):
        txt.unlink()
    info = comfy_server.object_info()
    prompt = {
        "1": env_node(info, root, tmp_path),
        "2": {"class_type": "MusubiTuner_CaptionImages", "inputs": widgets(
            info, "MusubiTuner_CaptionImages", musubi_env=["1", 0], image_dir=str(data),
            model_path=str(models / "te.safetensors"), fp8_vl=True)},
        "3": {"class_type": "MusubiTuner_ExtractLoRA_QwenImage", "inputs": widgets(
            info, "MusubiTuner_ExtractLoRA_QwenImage", musubi_env=["1", 0], model_org=str(models / "dit.safetensors"),
            model_tuned=str(models / "vae.safetensors"), output_path=str(tmp_path / "x" / "extracted.safetensors"),
            dim=8)},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=120)
    assert sorted(p.name for p in data.glob("*.txt")) == ["img0.txt", "img1.txt"]
    assert (tmp_path / "x" / "extracted.safetensors").is_file()
    # captions exist now: a second text run refuses to overwrite them
    prompt["2"]["inputs"]["max_size"] = 512
    del prompt["3"]
    with pytest.raises(RuntimeError, match="already have a caption"):
        comfy_server.run_prompt(prompt, timeout=60)
