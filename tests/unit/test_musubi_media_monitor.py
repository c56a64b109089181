"""Video frames in/out without ffmpeg, LoRA key detection, loss plots, nvidia-smi handling."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from speedkit.musubi import configs, lora_file, media, monitor


def frames(n=5, h=32, w=48) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (1, h, w, 3), dtype=np.uint8)
    return np.concatenate([np.clip(base.astype(int) + 40 * i, 0, 255).astype(np.uint8) for i in range(n)])


@pytest.mark.parametrize("fmt", ["webp", "gif"])
def test_animated_round_trip_without_ffmpeg(tmp_path, fmt):
    src = frames()
    path = media.write_video(src, tmp_path / "clip", fps=10, fmt=fmt, quality=100)
    assert path.suffix == f".{fmt}"
    back, fps = media.read_video(path)
    assert back.shape == src.shape and fps == pytest.approx(10, rel=0.05)
    if fmt == "webp":  # lossless at quality 100
        np.testing.assert_array_equal(back, src)
    strided, _ = media.read_video(path, stride=2, max_frames=2)
    assert strided.shape[0] == 2


@pytest.mark.skipif(not media.has_pyav(), reason="PyAV not installed")
def test_mp4_round_trip_with_pyav(tmp_path):
    path = media.write_video(frames(9, 64, 64), tmp_path / "clip", fps=16, fmt="mp4")
    back, fps = media.read_video(path)
    assert back.shape == (9, 64, 64, 3) and fps == pytest.approx(16)


def test_video_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        media.read_video(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="format='avi'"):
        media.write_video(frames(), tmp_path / "x", 10, "avi")
    with pytest.raises(ValueError, match="uint8"):
        media.write_video(frames().astype(np.float32), tmp_path / "x", 10, "gif")


def write_st(path, keys):
    header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}
    blob = json.dumps({"__metadata__": {"a": "b"}, **header}).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4 * len(keys))


def test_lora_format_detection(tmp_path):
    write_st(
        tmp_path / "m.safetensors", ["lora_unet_blocks_0_q.lora_down.weight", "lora_unet_blocks_0_q.lora_up.weight"]
    )
    keys, meta = lora_file.read_safetensors_keys(tmp_path / "m.safetensors")
    assert lora_file.detect_lora_format(keys) == "default" and meta == {"a": "b"}
    write_st(
        tmp_path / "o.safetensors",
        ["diffusion_model.blocks.0.q.lora_A.weight", "diffusion_model.blocks.0.q.lora_B.weight"],
    )
    assert lora_file.detect_lora_format(lora_file.read_safetensors_keys(tmp_path / "o.safetensors")[0]) == "other"
    write_st(tmp_path / "ckpt.safetensors", ["blocks.0.q.weight"])
    with pytest.raises(ValueError, match="lora_1 is not a LoRA: none of its 1 tensors"):
        lora_file.detect_lora_format(lora_file.read_safetensors_keys(tmp_path / "ckpt.safetensors")[0], "lora_1")
    (tmp_path / "junk.safetensors").write_bytes(b"hello")
    with pytest.raises(ValueError, match="is not a .safetensors file"):
        lora_file.read_safetensors_keys(tmp_path / "junk.safetensors")


def test_loss_from_log_and_plot(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "epoch 1/1\n"
        + "".join(f"steps:  {i}0%|#| {i}/4 [00:01<00:01,  1.00it/s, avr_loss={1 / i:.3f}]\n" for i in range(1, 5))
        + "model saved.\n"
    )
    hist = monitor.loss_from_log(log)
    assert [s for s, _ in hist] == [1, 2, 3, 4] and hist[0][1] == 1.0
    img = monitor.plot_series({"avr_loss": hist}, 320, 160)
    assert img.shape == (160, 320, 3) and img.dtype == np.uint8
    assert (img != img[0, 0]).any(axis=-1).sum() > 300  # the curve and labels were drawn
    with pytest.raises(ValueError, match="log_path .* does not exist"):
        monitor.loss_from_log(tmp_path / "none.log")


def test_nvidia_smi_missing_is_a_clear_message():
    with pytest.raises(ValueError, match="nvidia-smi was not found: it comes with the NVIDIA driver"):
        monitor.nvidia_smi(executable="nvidia-smi-that-does-not-exist")


def test_nvidia_smi_output_is_parsed(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\ncase "$1" in\n'
        "  --query-gpu*) echo '0, NVIDIA H100, 1024, 81559, 37, 41';;\n"
        "  *) echo 'GPU-x, 4242, python, 1000';;\nesac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    gpus, procs = monitor.nvidia_smi()
    assert gpus[0].name == "NVIDIA H100" and gpus[0].memory_total_mib == 81559 and procs[0]["pid"] == "4242"
    assert "GPU 0 NVIDIA H100: 1024/81559 MiB, 37% busy" in monitor.format_status(gpus, procs)


def test_memory_suggestions_scale_with_vram():
    big = configs.suggest_memory("wan", 80.0)
    mid = configs.suggest_memory("wan", 16.0)
    small = configs.suggest_memory("wan", 12.0)
    assert big.blocks_to_swap == 0 and not big.fp8_base
    assert mid.fp8_base and mid.fp8_scaled and 0 < mid.blocks_to_swap < small.blocks_to_swap <= 39
    assert small.vae_cache_cpu and small.split_attn
    assert configs.suggest_memory("hunyuan_video", 12.0).fp8_scaled is False  # not an HV option
    assert configs.suggest_memory("wan", 12.0, "1.3B").blocks_to_swap == 0
    with pytest.raises(ValueError, match="free VRAM 0"):
        configs.suggest_memory("wan", 0)
