"""``python -m <pack> upscale``: end to end on the embedded model, and its error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pack_parent(tmp_path: Path) -> Path:
    """A folder holding the pack under an importable name, like ComfyUI's custom_nodes."""
    parent = tmp_path / "custom_nodes"
    parent.mkdir()
    (parent / "speedkit_pack").symlink_to(REPO, target_is_directory=True)
    return parent


def run_cli(parent: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if os.environ.get("SPEEDKIT_TEST_DEVICE", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, "-m", "speedkit_pack", *args],
        cwd=parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def write_png(path: Path, h: int, w: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


def test_cli_upscales_files_and_folders_with_the_embedded_model(pack_parent, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        write_png(frames / f"f{i:03d}.png", 24, 32, seed=i)
    single = tmp_path / "single.jpg"
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(single)
    out = tmp_path / "out"
    proc = run_cli(pack_parent, "upscale", str(frames), str(single), "-o", str(out), "--tile", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["f000.png", "f001.png", "f002.png", "single.png"]
    with Image.open(out / "f001.png") as im:
        assert im.size == (128, 96)
    with Image.open(out / "single.png") as im:
        flat = np.asarray(im, dtype=np.float32)
    # A flat grey input stays a flat grey of the same level (no rescaling of values).
    assert abs(float(flat.mean()) - 128) < 6 and float(flat.std()) < 3


def test_cli_scale_option_resizes_the_result(pack_parent, tmp_path):
    src = tmp_path / "a.png"
    write_png(src, 30, 40)
    proc = run_cli(pack_parent, "upscale", str(src), "-o", str(tmp_path / "o"), "--scale", "2", "--format", "jpg")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "o" / "a.jpg") as im:
        assert im.size == (80, 60)


def test_cli_corrupt_model_file_is_a_clear_error(pack_parent, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    src = tmp_path / "a.png"
    write_png(src, 8, 8)
    proc = run_cli(pack_parent, "upscale", str(src), "-o", str(tmp_path / "o"), "--model", str(bad))
    assert proc.returncode == 2
    assert f"--model {bad}: cannot load it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_input_and_bad_arguments(pack_parent, tmp_path):
    proc = run_cli(pack_parent, "upscale", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    proc = run_cli(pack_parent, "upscale", str(tmp_path), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "holds no" in proc.stderr
    src = tmp_path / "a.png"
    write_png(src, 8, 8)
    proc = run_cli(pack_parent, "upscale", str(src), "-o", str(tmp_path / "o"), "--scale", "0")
    assert proc.returncode == 2 and "--scale 0.0: must be in (0, 16]" in proc.stderr


def test_embedded_model_and_licence_are_shipped():
    models = REPO / "upscale_cuda" / "models"
    weights = models / "realesr-animevideov3-x4.safetensors"
    assert weights.is_file() and weights.stat().st_size < 2 * 1024**2
    licence = (models / "LICENSE-realesr-animevideov3.txt").read_text()
    assert "BSD 3-Clause" in licence and "Xintao Wang" in licence
