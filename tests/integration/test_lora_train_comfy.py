"""SpeedKit_TrainLoRA inside a real ComfyUI: tiny random SD1.5- and SDXL-shaped checkpoints.

The checkpoints are built by ComfyUI itself from its own model configs (so ComfyUI detects them
as SD15 / SDXL): real layer names and the full-size CLIP text encoders (their architecture is
fixed by ComfyUI's JSON configs), a UNet shrunk in depth/width where detection allows, random
weights. Each is trained for 20 steps through the HTTP API; then the LoRA must load with ComfyUI's
LoraLoader without a single "lora key not loaded", patch exactly one weight per lora_down tensor,
give the base model's output at strength 0 and a different one at strength 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration

BUILD = textwrap.dedent(
    """
    import math, sys, torch
    from comfy.cli_args import args
    args.cpu = True
    import comfy.sd, comfy.supported_models as sm, comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    def fill(module, gen):
        with torch.no_grad():
            for name, t in module.state_dict(keep_vars=True).items():
                if not t.is_floating_point():
                    continue
                if t.ndim == 0:
                    t.fill_(1.0)
                elif t.ndim == 1:
                    t.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(max(1, t[0].numel())))

    gen = torch.Generator().manual_seed(0)
    base = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                use_spatial_transformer=True, legacy=False, use_temporal_resblock=False,
                use_temporal_attention=False, transformer_depth_middle=1)
    configs = {
        "sd15": (sm.SD15, dict(base, adm_in_channels=None, num_res_blocks=[1, 1], channel_mult=[1, 1],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                 use_linear_in_transformer=False, context_dim=768)),
        # SDXL detection requires transformer_depth [0,0,2,2,10,10]: keep it, but at 320 channels
        "sdxl": (sm.SDXL, dict(base, adm_in_channels=2816, num_classes="sequential", num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], use_linear_in_transformer=True,
                 context_dim=2048)),
        "sd2": (sm.SD20, dict(base, adm_in_channels=None, num_res_blocks=[1], channel_mult=[1],
                transformer_depth=[1], transformer_depth_output=[1, 1], use_linear_in_transformer=True,
                context_dim=1024)),
    }
    vae = AutoencoderKL(ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                  "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                  "attn_resolutions": [], "dropout": 0.0}, embed_dim=4)
    fill(vae, gen)
    for family, path in zip(sys.argv[1::2], sys.argv[2::2]):
        cls, cfg = configs[family]
        model_config = cls(cfg)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({})
        fill(model.diffusion_model, gen)
        if family == "sd2":  # UNet only, for UNETLoader
            sd = model.diffusion_model.state_dict()
        else:
            clip = comfy.sd.CLIP(model_config.clip_target(), embedding_directory=None)
            fill(clip.cond_stage_model, gen)
            sd = model.state_dict_for_saving(model.diffusion_model.state_dict(), clip.get_sd(), vae.state_dict())
        comfy.utils.save_torch_file({k: v.half().contiguous() for k, v in sd.items()}, path)
    """
)

CHECK_KEYS = textwrap.dedent(
    """
    import json, logging, sys, torch
    from comfy.cli_args import args
    args.cpu = True
    import comfy.lora, comfy.sd, comfy.utils

    class Count(logging.Handler):
        lines = []
        def emit(self, record):
            if "lora key not loaded" in record.getMessage():
                Count.lines.append(record.getMessage())

    logging.getLogger().addHandler(Count())
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[1], output_vae=False, output_clip=True)
    lora = comfy.utils.load_torch_file(sys.argv[2], safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(lora, key_map)

    def patched(strength):
        m, c = model.clone(), clip.patcher.clone()
        keys = set(m.add_patches(patches, strength)) | set(c.add_patches(patches, strength))
        out = {}
        for p in (m, c):
            p.patch_model()
            out.update({k: v.detach().clone() for k, v in p.model.state_dict().items()})
            p.unpatch_model()
        return keys, out

    base = {}
    for p in (model, clip.patcher):
        base.update({k: v.detach().clone() for k, v in p.model.state_dict().items()})
    keys0, zero = patched(0.0)
    keys1, one = patched(1.0)
    print(json.dumps({
        "patches": len(patches), "applied": len(keys1), "downs": sum(k.endswith(".lora_down.weight") for k in lora),
        "not_loaded": Count.lines,
        "zero_changed": sum(not torch.equal(zero[k], base[k]) for k in base),
        "one_changed": sum(not torch.equal(one[k], base[k]) for k in base),
    }))
    """
)


def _comfy_python(server) -> tuple[str, dict]:
    env = dict(os.environ, PYTHONPATH=str(server.root), OMP_NUM_THREADS="2")
    return os.environ.get("COMFYUI_PYTHON", sys.executable), env


@pytest.fixture(scope="module")
def checkpoints(comfy_server):
    ckpt_dir = comfy_server.models_dir / "checkpoints"
    unet_dir = comfy_server.models_dir / "diffusion_models"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    unet_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "sd15": ckpt_dir / "speedkit_tiny_sd15.safetensors",
        "sdxl": ckpt_dir / "speedkit_tiny_sdxl.safetensors",
        "sd2": unet_dir / "speedkit_tiny_sd2_unet.safetensors",
    }
    python, env = _comfy_python(comfy_server)
    args = [x for family, path in paths.items() for x in (family, str(path))]
    proc = subprocess.run(
        [python, "-c", BUILD, *args], cwd=comfy_server.root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    yield paths
    # the server is shared by the whole session: leave no checkpoint or LoRA behind, or other
    # tests' combo lists (ckpt_name, lora_name) would suddenly contain our files
    for path in paths.values():
        path.unlink(missing_ok=True)
    for path in (comfy_server.models_dir / "loras").glob("speedkit_test_*.safetensors"):
        path.unlink()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora_dataset")
    colors = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40)]
    for i, color in enumerate(colors):
        img = Image.new("RGB", (64 + 16 * (i % 2), 64), color)
        img.paste((255, 255, 255), (8, 8, 24, 24))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks square, color {i}, white corner")
    return folder


def train_prompt(ckpt: str, dataset: Path, name: str, **overrides) -> dict:
    inputs = {
        "model": ["1", 0],
        "clip": ["1", 1],
        "vae": ["1", 2],
        "dataset_folder": str(dataset),
        "output_name": name,
        "steps": 20,
        "learning_rate": 1e-3,
        "rank": 4,
        "alpha": 4.0,
        "resolution": 64,
        "batch_size": 2,
        "target": "attention+mlp",
        "train_text_encoder": False,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "min_bucket": 64,
        "max_bucket": 128,
        "seed": 3,
        # the API needs every input, advanced ones included
        "text_encoder_lr": 1e-4,
        "optimizer": "AdamW",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "grad_accumulation": 1,
        "min_snr_gamma": 0.0,
        "noise_offset": 0.0,
        "caption_dropout": 0.0,
        "shuffle_captions": False,
        "keep_tokens": 0,
        "default_caption": "",
        "bucket_step": 64,
        "bucket_no_upscale": False,
        "save_every": 0,
        "keep_last": 0,
        "save_precision": "fp16",
        "resume_from": "",
        "cache_latents_to_disk": False,
    }
    inputs.update(overrides)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "SpeedKit_TrainLoRA", "inputs": inputs},
    }


def sample_prompt(ckpt: str, lora: str | None, strength: float, prefix: str) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "sks square, color 1", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "seed": 7,
                "steps": 2,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if lora is None:
        for node, key in (("3", "clip"), ("4", "clip"), ("6", "model")):
            prompt[node]["inputs"][key] = ["1", 1 if key == "clip" else 0]
    else:
        prompt["2"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": lora,
                "strength_model": strength,
                "strength_clip": strength,
            },
        }
    return prompt


def _latent(server, entry: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    info = entry["outputs"]["7"]["latents"][0]
    return load_file(str(server.output_dir / info["subfolder"] / info["filename"]))["latent_tensor"]


@pytest.mark.parametrize("family,train_te", [("sd15", True), ("sdxl", False)])
def test_train_20_steps_and_load_with_lora_loader(comfy_server, checkpoints, dataset, family, train_te):
    ckpt = checkpoints[family].name
    name = f"speedkit_test_{family}"
    log_start = len(comfy_server.log_text())
    entry = comfy_server.run_prompt(
        # text-encoder training runs CLIP-L forward+backward every step: batch 1 keeps CPU CI fast
        train_prompt(ckpt, dataset, name, train_text_encoder=train_te, save_every=10, batch_size=1 if train_te else 2),
        timeout=1200,
    )
    lora_path = comfy_server.models_dir / "loras" / f"{name}.safetensors"
    assert lora_path.is_file()
    assert (comfy_server.models_dir / "loras" / f"{name}-step000010.safetensors").is_file()
    assert (comfy_server.output_dir / "speedkit_lora_state" / f"{name}-state.json").is_file()
    assert "2" in entry["outputs"] or entry["status"]["completed"]

    from safetensors import safe_open

    with safe_open(str(lora_path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    prefixes = ("lora_unet_", "lora_te_") if family == "sd15" else ("lora_unet_", "lora_te1_", "lora_te2_")
    assert all(k.startswith(prefixes) for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    if family == "sd15":
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in keys), "SD1.5: diffusers paths"
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
        assert meta["ss_base_model_version"] == "sd_v1"
    else:
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_") for k in keys), "SDXL: LDM paths"
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_steps"] == "20" and meta["ss_network_dim"] == "4"

    python, env = _comfy_python(comfy_server)
    proc = subprocess.run(
        [python, "-c", CHECK_KEYS, str(checkpoints[family]), str(lora_path)],
        cwd=comfy_server.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["not_loaded"] == []
    assert report["patches"] == report["applied"] == report["downs"] > 0
    assert report["zero_changed"] == 0, "strength 0 must leave every weight exactly as in the base model"
    assert report["one_changed"] > 0

    lora_name = lora_path.name
    base = _latent(comfy_server, comfy_server.run_prompt(sample_prompt(ckpt, None, 0, f"{family}_base")))
    zero = _latent(comfy_server, comfy_server.run_prompt(sample_prompt(ckpt, lora_name, 0.0, f"{family}_s0")))
    one = _latent(comfy_server, comfy_server.run_prompt(sample_prompt(ckpt, lora_name, 1.0, f"{family}_s1")))
    assert torch.equal(zero, base), "strength 0 must give the base model's output exactly"
    assert not torch.allclose(one, base, atol=1e-4), "strength 1 must change the output"
    assert "lora key not loaded" not in comfy_server.log_text()[log_start:]


def _error_of(server, prompt) -> str:
    with pytest.raises(RuntimeError) as info:
        server.run_prompt(prompt, timeout=600)
    return str(info.value)


def test_bad_inputs_fail_clearly(comfy_server, checkpoints, dataset, tmp_path):
    sd15, sdxl = checkpoints["sd15"].name, checkpoints["sdxl"].name
    empty = tmp_path / "empty"
    empty.mkdir()
    no_caption = tmp_path / "no_caption"
    no_caption.mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(no_caption / "a.png")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(tiny / "a.png")
    (tiny / "a.txt").write_text("x")
    single = tmp_path / "single"
    single.mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(single / "a.png")
    (single / "a.txt").write_text("x")

    cases = [
        (train_prompt(sd15, empty, "e1"), "holds no image"),
        (train_prompt(sd15, no_caption, "e2"), "no .txt caption"),
        (train_prompt(sd15, tiny, "e3"), "at least 32"),
        (train_prompt(sd15, dataset, "e4", rank=400), "rank=400 does not fit layer"),
        (train_prompt(sdxl, dataset, "e5", resolution=96), "resolution=96 must be a positive multiple of 64"),
        (train_prompt(sd15, dataset, "e6", resolution=68), "resolution=68 must be a positive multiple of 8"),
        (train_prompt(sd15, dataset, "../escape"), "output_name="),
        (train_prompt(sd15, dataset, "e8", optimizer="AdamW8bit"), "bitsandbytes"),
        (train_prompt(sd15, dataset, "e10", sample_every=5), "sample_prompts: sample_every is set but there is no"),
        (train_prompt(sd15, dataset, "e11", sample_prompts="a cat --w 70"), "sample_prompts line 1: width 70"),
        (train_prompt(sd15, dataset, "e12", sample_prompts="a cat --x 1"), "unknown option --x"),
        (train_prompt(sd15, single, "e13", validation_split=0.5), "leaves none to train on"),
        # ComfyUI's own list check is replaced by the node's (saved workflows carry true/false)
        (train_prompt(sd15, dataset, "e14", gradient_checkpointing="sometimes"), "choose one of auto, on, off"),
    ]
    for prompt, expected in cases:
        if expected == "bitsandbytes" and _has_module("bitsandbytes"):
            continue
        assert expected in _error_of(comfy_server, prompt), expected

    sd2 = train_prompt(sd15, dataset, "e9")
    sd2["9"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": checkpoints["sd2"].name, "weight_dtype": "default"},
    }
    sd2["2"]["inputs"]["model"] = ["9", 0]
    assert "supports SD1.5 and SDXL only" in _error_of(comfy_server, sd2)
    assert not (comfy_server.models_dir / "loras" / "e4.safetensors").exists()


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_cancel_saves_and_resume_continues(comfy_server, checkpoints, dataset):
    import time
    import uuid

    name = "speedkit_test_cancel"
    ckpt = checkpoints["sd15"].name
    state_file = comfy_server.output_dir / "speedkit_lora_state" / f"{name}-state.json"
    prompt = train_prompt(ckpt, dataset, name, steps=5000, save_every=1, keep_last=1)
    answer = comfy_server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    deadline = time.monotonic() + 600
    while not state_file.is_file():  # written after the first step: training is under way
        assert time.monotonic() < deadline, "training never started:\n" + comfy_server.log_text()[-3000:]
        time.sleep(0.2)
    comfy_server.interrupt()
    while True:
        entry = comfy_server.get(f"/history/{answer['prompt_id']}").get(answer["prompt_id"])
        if entry and entry.get("status", {}).get("status_str") in ("error", "success"):
            break
        assert time.monotonic() < deadline, "the interrupted prompt never finished"
        time.sleep(0.5)
    assert entry["status"]["status_str"] == "error", "an interrupted run must not report success"
    messages = json.dumps(entry["status"].get("messages"))
    assert "execution_interrupted" in messages, messages[-2000:]
    state = json.loads(state_file.read_text())
    assert 0 < state["step"] < 5000
    final = comfy_server.models_dir / "loras" / f"{name}.safetensors"
    from safetensors import safe_open

    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_steps"] == str(state["step"]), "the cancelled LoRA is the state's step"
    assert len(list((comfy_server.models_dir / "loras").glob(f"{name}-step*.safetensors"))) == 1, "keep_last=1"

    comfy_server.run_prompt(train_prompt(ckpt, dataset, name, steps=state["step"] + 2, resume_from=name))
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_steps"] == str(state["step"] + 2)


def test_disk_cache_reuses_text_encoder_outputs(comfy_server, checkpoints, dataset, tmp_path):
    """cache_latents_to_disk with a frozen text encoder: the second run loads the SDXL CLIP outputs
    from <dataset>/_latent_cache/text_encoder instead of encoding, trains the identical LoRA, and a
    corrupt entry is re-encoded."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = tmp_path / "data"
    shutil.copytree(dataset, folder)  # its own cache folder
    ckpt = checkpoints["sdxl"].name

    def run(name: str) -> str:
        start = len(comfy_server.log_text())
        prompt = train_prompt(ckpt, folder, name, steps=2, cache_latents_to_disk=True)
        comfy_server.run_prompt(prompt, timeout=1200)
        return comfy_server.log_text()[start:]

    first = run("speedkit_test_tecache_a")
    assert "0 loaded, 4 encoded" in first, first[-2000:]
    files = sorted((folder / "_latent_cache" / "text_encoder").glob("te-*.safetensors"))
    assert len(files) == 4  # one per distinct caption
    with safe_open(str(files[0]), "pt") as f:
        assert list(f.get_slice("cond").get_shape()) == [1, 77, 2048]
        assert list(f.get_slice("pooled").get_shape()) == [1, 1280]
        assert f.metadata()["layout"] == "sdxl|cond:2048|pooled:1280"
    stamps = [f.stat().st_mtime_ns for f in files]

    second = run("speedkit_test_tecache_b")
    assert "4 loaded, 0 encoded" in second, second[-2000:]
    assert [f.stat().st_mtime_ns for f in files] == stamps, "a valid entry must not be rewritten"
    loras = comfy_server.models_dir / "loras"
    a = load_file(str(loras / "speedkit_test_tecache_a.safetensors"))
    b = load_file(str(loras / "speedkit_test_tecache_b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "cached outputs must train the same"

    files[0].write_bytes(b"not a safetensors file")
    third = run("speedkit_test_tecache_c")
    assert "3 loaded, 1 encoded" in third, third[-2000:]
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["format"].startswith("speedkit-lora-te-cache")


def test_sample_images_and_validation_loss(comfy_server, checkpoints, dataset):
    """Sample images every 5 steps (and after the last), shown on the node and saved beside the
    LoRA with their settings; a validation loss on held-out images in the log and the chart."""
    from PIL import Image as PILImage

    name = "speedkit_samples"
    start = len(comfy_server.log_text())
    entry = comfy_server.run_prompt(
        train_prompt(
            checkpoints["sd15"].name,
            dataset,
            name,
            steps=12,
            batch_size=1,
            sample_every=5,
            sample_prompts="sks square, color 1 --s 2 --d 9\n# comment\nsks square --w 64 --h 128 --s 2",
            sample_size=64,
            validation_split=0.25,
            validate_every=4,
            gradient_checkpointing="auto",
        ),
        timeout=1200,
    )
    folder = comfy_server.models_dir / "loras" / f"{name}_samples"
    files = sorted(p.name for p in folder.glob("*.png"))
    assert files == [f"{name}_{s:06d}_{k:02d}.png" for s in (5, 10, 12) for k in (0, 1)]
    assert not list(folder.glob("*.partial"))
    first = PILImage.open(folder / f"{name}_000005_00.png")
    assert first.size == (64, 64) and PILImage.open(folder / f"{name}_000005_01.png").size == (64, 128)
    info = json.loads(first.text["speedkit_sample"])
    assert info["prompt"] == "sks square, color 1" and info["seed"] == 9 and info["steps"] == 2
    second = json.loads(PILImage.open(folder / f"{name}_000005_01.png").text["speedkit_sample"])
    assert (second["seed"], second["width"], second["height"]) == (1, 64, 128)  # sample_seed + 1
    shown = entry["outputs"]["2"]["images"]
    assert len(shown) == 1 and shown[0]["type"] == "temp"  # the last round's 64x64 picture(s)
    log = comfy_server.log_text()[start:]
    assert "image(s) held out for the validation loss" in log
    steps = [
        int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "validation loss" in line and "at step" in line
    ]
    assert steps == [4, 8, 12], log[-3000:]


@pytest.fixture(scope="module")
def worker_server(tmp_path_factory, checkpoints):
    """A second server whose Train LoRA runs always train in a worker process (``SPEEDKIT_TRAIN_WORKER=1``;
    on NVIDIA with ComfyUI's defaults that is automatic), with the same SDXL checkpoint."""
    from conftest import comfyui_root

    from comfy_server import ComfyServer, free_port

    server = ComfyServer(
        root=comfyui_root(),
        work=tmp_path_factory.mktemp("comfyui_worker"),
        port=free_port(),
        env={"SPEEDKIT_TRAIN_WORKER": "1"},
    )
    (server.models_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoints["sdxl"], server.models_dir / "checkpoints" / checkpoints["sdxl"].name)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_worker_process_trains_the_lora_comfyuis_own_process_trains(
    comfy_server, worker_server, checkpoints, dataset
):
    """The run ComfyUI's defaults put in a worker process on NVIDIA (forced here on the CPU): the
    UNet as ComfyUI loaded it goes to the child, which trains; sample images are rendered by the
    server from the step's LoRA; the validation loss comes back; the LoRA equals the one the
    server's own process trains."""
    from safetensors.torch import load_file

    ckpt = checkpoints["sdxl"].name
    extras = dict(
        steps=6, batch_size=1, sample_every=3, sample_prompts="sks square --s 2", sample_size=64,
        validation_split=0.25, validate_every=3,
    )  # fmt: skip
    comfy_server.run_prompt(train_prompt(ckpt, dataset, "speedkit_test_here", **extras), timeout=1200)
    start = len(worker_server.log_text())
    worker_server.run_prompt(train_prompt(ckpt, dataset, "speedkit_test_worker", **extras), timeout=1200)
    log = worker_server.log_text()[start:]
    assert "training in a separate process" in log, log[-3000:]
    assert "Train LoRA worker: Train LoRA: 6 steps in" in log, log[-3000:]
    here = load_file(str(comfy_server.models_dir / "loras" / "speedkit_test_here.safetensors"))
    there = load_file(str(worker_server.models_dir / "loras" / "speedkit_test_worker.safetensors"))
    assert sorted(here) == sorted(there)
    for key, value in here.items():
        torch.testing.assert_close(there[key].float(), value.float(), rtol=2e-3, atol=2e-4)  # fp16 files
    folder = worker_server.models_dir / "loras" / "speedkit_test_worker_samples"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"speedkit_test_worker_{s:06d}_00.png" for s in (3, 6)]
    steps = [
        int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "validation loss" in line and "at step" in line
    ]
    assert steps == [3, 6], log[-3000:]
    left = list(Path("/dev/shm").glob(f"speedkit_train_{worker_server.pid}_*"))
    assert not left, "the job folder must be removed"


OPS_ATTRIBUTES = textwrap.dedent(
    """
    import json
    from comfy.cli_args import args
    args.cpu = True
    import comfy.ops

    out = {}
    for name in ("disable_weight_init", "manual_cast"):
        ops = getattr(comfy.ops, name)
        layers = (ops.Linear(4, 4), ops.Conv2d(4, 4, 1))
        out[name] = [[m.comfy_cast_weights, list(m.weight_function), list(m.bias_function)] for m in layers]
    print(json.dumps(out))
    """
)


def test_comfyuis_layers_still_say_whether_they_cast_their_own_weights(comfy_server):
    """The worker holds Linear/Conv weights in the autocast dtype (``worker.matmul_weights_to``)
    except in layers ComfyUI casts itself on every call, which it recognises by ComfyUI's
    ``comfy_cast_weights`` / ``weight_function`` / ``bias_function``: those must keep meaning that."""
    python, env = _comfy_python(comfy_server)
    proc = subprocess.run(
        [python, "-c", OPS_ATTRIBUTES], cwd=comfy_server.root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["disable_weight_init"] == [[False, [], []], [False, [], []]]
    assert out["manual_cast"] == [[True, [], []], [True, [], []]]
