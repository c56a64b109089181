"""SpeedKit_UpscaleImageCUDA inside a live ComfyUI on the GPU, under every server setting.

Batches come from other nodes (RepeatImageBatch, ImageBatch, a VAE decode) exactly as users
build them; results are read back in float through the probe sink and compared with
ComfyUI's own ``ImageUpscaleWithModel`` run in the same prompt.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from server_cases import TINY_CKPT, TINY_UPSCALER

from comfy_server import ComfyServer

pytestmark = pytest.mark.gpu
ANIME = "realesr-animevideov3-x4.safetensors"


def sink(source: list, name: str) -> dict:
    return {"class_type": "SpeedKitProbe_ImageSink", "inputs": {"image": source, "save_name": name}}


def ours(model: list, image: list, **options) -> dict:
    return {"class_type": "SpeedKit_UpscaleImageCUDA", "inputs": {"upscale_model": model, "image": image, **options}}


def stock(model: list, image: list) -> dict:
    return {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": model, "image": image}}


def loader(name: str) -> dict:
    return {"class_type": "UpscaleModelLoader", "inputs": {"model_name": name}}


def load_image(name: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def saved(server: ComfyServer, entry: dict, node: str) -> torch.Tensor:
    info = entry["outputs"][node]["probe"][0]
    return load_file(info["path"])["image"]


def check_close_to_stock(ours_out: torch.Tensor, stock_out: torch.Tensor) -> None:
    assert ours_out.shape == stock_out.shape and ours_out.dtype == torch.float32
    assert torch.isfinite(ours_out).all() and float(ours_out.min()) >= 0.0 and float(ours_out.max()) <= 1.0
    diff = (ours_out - stock_out).abs()
    # fp16 against stock's fp32 tiles: small everywhere, never a different picture.
    assert float(diff.mean()) < 2e-3, float(diff.mean())
    assert float(diff.max()) < 0.1, float(diff.max())


def test_batch_from_repeat_image_batch(gpu_server):
    # 12 x 540p -> 4K is 1.2 GB of output: the size at which every batch from another node
    # used to fail inside ComfyUI (a worker thread writing an inference tensor).
    prompt = {
        "1": load_image("photo_540p.png"),
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 12}},
        "3": loader(ANIME),
        "4": ours(["3", 0], ["2", 0]),
        "5": sink(["4", 0], f"repeat_ours_{gpu_server.setting}"),
        "6": stock(["3", 0], ["1", 0]),
        "7": sink(["6", 0], f"repeat_stock_{gpu_server.setting}"),
    }
    entry = gpu_server.run_prompt(prompt)
    out, ref = saved(gpu_server, entry, "5"), saved(gpu_server, entry, "7")
    assert out.shape == (12, 2160, 3840, 3)
    assert entry["outputs"]["5"]["probe"][0]["device"] == "cpu"
    for k in range(1, 12):  # every frame of the batch is the same picture
        assert torch.equal(out[k], out[0])
    check_close_to_stock(out[:1], ref)
    assert gpu_server.alive()


def test_batch_from_image_batch_matches_single_frames(gpu_server):
    prompt = {
        "1": load_image("photo_540p.png"),
        "2": load_image("photo_540p_b.png"),
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": loader(ANIME),
        "5": ours(["4", 0], ["3", 0]),
        "6": sink(["5", 0], f"batch_ours_{gpu_server.setting}"),
        "7": ours(["4", 0], ["2", 0], batch_size=1),
        "8": sink(["7", 0], f"single_ours_{gpu_server.setting}"),
        "9": stock(["4", 0], ["3", 0]),
        "10": sink(["9", 0], f"batch_stock_{gpu_server.setting}"),
    }
    entry = gpu_server.run_prompt(prompt)
    batch, single = saved(gpu_server, entry, "6"), saved(gpu_server, entry, "8")
    assert batch.shape == (2, 2160, 3840, 3)
    assert not torch.equal(batch[0], batch[1])
    # The same frame alone or in a batch: the same convolution, up to cuDNN's algorithm choice.
    assert float((batch[1] - single[0]).abs().max()) < 2e-3
    check_close_to_stock(batch, saved(gpu_server, entry, "10"))


def test_batch_decoded_by_a_vae(gpu_server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 3}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": loader(TINY_UPSCALER),
        "5": ours(["4", 0], ["3", 0]),
        "6": sink(["5", 0], f"vae_ours_{gpu_server.setting}"),
        "7": stock(["4", 0], ["3", 0]),
        "8": sink(["7", 0], f"vae_stock_{gpu_server.setting}"),
    }
    entry = gpu_server.run_prompt(prompt)
    out = saved(gpu_server, entry, "6")
    assert out.shape == (3, 384, 512, 3)
    check_close_to_stock(out, saved(gpu_server, entry, "8"))


def test_compiled_batch_and_kept_model(gpu_server):
    # The GPU fast paths (torch.compile, a copy kept on the GPU and registered with ComfyUI's
    # model management) under each allocator/VRAM setting; then another model loads.
    prompt = {
        "1": load_image("photo_540p.png"),
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 3}},
        "3": loader(ANIME),
        "4": ours(["3", 0], ["2", 0], enable_compile="enable", keep_model_loaded=True),
        "5": sink(["4", 0], f"compiled_{gpu_server.setting}"),
        "6": ours(["3", 0], ["2", 0]),
        "7": sink(["6", 0], f"eager_{gpu_server.setting}"),
    }
    entry = gpu_server.run_prompt(prompt, timeout=900)
    compiled, eager = saved(gpu_server, entry, "5"), saved(gpu_server, entry, "7")
    assert float((compiled - eager).abs().max()) < 0.02
    # Another model through ComfyUI's loader: our kept copy must give way, not crash.
    follow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": sink(["3", 0], ""),
    }
    gpu_server.run_prompt(follow)
    gpu_server.free(unload_models=True, free_memory=True)
    gpu_server.run_prompt(follow | {"2": {**follow["2"], "inputs": {**follow["2"]["inputs"], "width": 72}}})
    assert gpu_server.alive()


@pytest.mark.parametrize("model", ["RealESRGAN_x4plus.safetensors"])
def test_real_weights_single_frame_matches_stock(gpu_server, model):
    if not (gpu_server.models_dir / "upscale_models" / model).exists():
        pytest.skip(f"{model} not found: set SPEEDKIT_TEST_MODELS to the folder holding it")
    prompt = {
        "1": load_image("example.png"),
        "2": loader(model),
        "3": ours(["2", 0], ["1", 0]),
        "4": sink(["3", 0], f"real_ours_{gpu_server.setting}"),
        "5": stock(["2", 0], ["1", 0]),
        "6": sink(["5", 0], f"real_stock_{gpu_server.setting}"),
    }
    entry = gpu_server.run_prompt(prompt)
    check_close_to_stock(saved(gpu_server, entry, "4"), saved(gpu_server, entry, "6"))
