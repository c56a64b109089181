"""``python -m <pack> upscale``: end to end on the embedded model, and its error messages."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pack_parent(tmp_path: Path) -> Path:
    """A folder holding the pack under an importable name, like ComfyUI's custom_nodes."""
    parent = tmp_path / "custom_nodes"
    parent.mkdir()
    (parent / "speedkit_pack").symlink_to(REPO, target_is_directory=True)
    return parent


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if os.environ.get("SPEEDKIT_TEST_DEVICE", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra or {})
    return env


def run_cli(
    parent: Path, *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """``python -m <pack> args`` from ``parent``; ``prefix`` wraps the command (see :func:`permission_prefix`)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "speedkit_pack", *args],
        cwd=parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(env),
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


# -- every bad input a clear answer: one line, exit status 2, nothing changed on disk ----------


def tree(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int, int]] | None:
    """Every path under ``root`` except ``skip`` (the output folder), with size and mtime of files;
    None when ``root`` is not a folder."""
    if not root.is_dir():
        return None
    state: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames:
            state[str((here / name).relative_to(root))] = (1, 0, 0)  # folders: presence only
        for name in filenames:
            st = (here / name).lstat()
            state[str((here / name).relative_to(root))] = (0, st.st_size, st.st_mtime_ns)
    return state


def assert_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and exactly one line on stderr holding every needle; returns that line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_refused(
    pack_parent: Path,
    tmp_path: Path,
    out: Path,
    *args: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Run ``upscale`` with ``args`` and check the disk: unchanged outside ``out``, and ``out`` as it
    was too (for a refused run nothing is written, and a folder it created is gone again)."""
    before, out_before = tree(tmp_path, out), tree(out)
    proc = run_cli(pack_parent, "upscale", *args, env=env, prefix=prefix)
    assert tree(tmp_path, out) == before
    assert tree(out) == out_before
    return proc


def test_cli_device_cuda_without_a_gpu_is_one_line(pack_parent, tmp_path):
    src, out = tmp_path / "a.png", tmp_path / "o"
    write_png(src, 8, 8)
    args = (str(src), "-o", str(out), "--device", "cuda")
    proc = run_refused(pack_parent, tmp_path, out, *args, env={"CUDA_VISIBLE_DEVICES": ""})
    line = assert_clear_error(proc, "--device cuda: no CUDA device is available", "--device cpu", "leave --device out")
    assert not out.exists(), line


@pytest.mark.parametrize("value", ["bogus", "cuda:x", "CUDA:"])
def test_cli_unknown_device_lists_the_accepted_values(pack_parent, tmp_path, value):
    src, out = tmp_path / "a.png", tmp_path / "o"
    write_png(src, 8, 8)
    proc = run_refused(pack_parent, tmp_path, out, str(src), "-o", str(out), "--device", value)
    assert_clear_error(proc, f"--device {value}: unknown device", "cpu, cuda or cuda:N")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--tile", "-5"], ["--tile -5: must be >= 0"]),
        (["--overlap", "-1"], ["--overlap -1: must be >= 0"]),
        (["--batch", "-2"], ["--batch -2: must be >= 0"]),
        (["--format", "gif"], ["--format", "gif", "png"]),
        (["--precision", "fp64"], ["--precision", "fp64"]),
        (["--tile", "abc"], ["--tile", "abc"]),
    ],
    ids=["tile-negative", "overlap-negative", "batch-negative", "format-gif", "precision-unknown", "tile-not-int"],
)
def test_cli_bad_option_values_are_one_line(pack_parent, tmp_path, args, needles):
    src, out = tmp_path / "a.png", tmp_path / "o"
    write_png(src, 8, 8)
    proc = run_refused(pack_parent, tmp_path, out, str(src), "-o", str(out), *args)
    assert_clear_error(proc, *needles)
    assert not out.exists()


@pytest.mark.gpu
def test_cli_device_index_beyond_the_gpus_is_one_line(pack_parent, tmp_path):
    src, out = tmp_path / "a.png", tmp_path / "o"
    write_png(src, 8, 8)
    count = torch.cuda.device_count()
    visible = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(count))))}
    proc = run_refused(pack_parent, tmp_path, out, str(src), "-o", str(out), "--device", f"cuda:{count}", env=visible)
    assert_clear_error(proc, f"--device cuda:{count}: this machine has {count} CUDA device(s)")
    assert not out.exists()


def test_cli_output_larger_than_the_format_allows_is_refused_before_work(pack_parent, tmp_path):
    src, out = tmp_path / "wide.png", tmp_path / "o"
    write_png(src, 1, 4100)  # x4 -> 16400 px wide, WebP stores at most 16383
    proc = run_refused(pack_parent, tmp_path, out, str(src), "-o", str(out), "--format", "webp")
    assert_clear_error(proc, "--format webp:", "16400x4", "16383", "--format png")
    assert not out.exists()


def test_cli_model_that_is_not_rgb_is_refused_before_work(pack_parent, tmp_path):
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    model = tmp_path / "grey_x2.safetensors"
    save_file(Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2).state_dict(), str(model))
    src, out = tmp_path / "a.png", tmp_path / "o"
    write_png(src, 8, 8)
    proc = run_refused(pack_parent, tmp_path, out, str(src), "-o", str(out), "--model", str(model))
    assert_clear_error(proc, f"--model {model}: a 1-in/1-out channel model", "3-channel")
    assert not out.exists()


def _read_only(path: Path) -> None:
    path.chmod(0o555 if path.is_dir() else 0o444)


DROP_DAC = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
"""Runs a command as root without the capabilities that bypass permission bits, so root obeys
the owner bits of its own files as any user does."""


def permission_prefix(tmp_path: Path) -> tuple[str, ...] | None:
    """A command prefix under which a read-only folder refuses writes: ``()`` for an ordinary user,
    :data:`DROP_DAC` for root where setpriv exists, None when neither holds."""
    probe = tmp_path / "probe"
    probe.mkdir()
    _read_only(probe)
    write = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(probe / "f")]
    try:
        for prefix in ((), DROP_DAC):
            if prefix and shutil.which(prefix[0]) is None:
                continue
            proc = subprocess.run([*prefix, *write], capture_output=True, text=True, timeout=60)
            if proc.returncode != 0 and "PermissionError" in proc.stderr:
                return prefix
            (probe / "f").unlink(missing_ok=True)
        return None
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


@pytest.mark.parametrize(
    "case",
    [
        "existing-file",
        "parent-is-a-file",
        "target-is-a-folder",
        "would-replace-an-input",
        "empty-path",
        "under-read-only-folder",
        "read-only-target",
    ],
)
def test_cli_unusable_output_is_refused_before_any_work(pack_parent, tmp_path, case):
    prefix: tuple[str, ...] | None = ()
    if case.startswith(("under-read-only", "read-only")):
        prefix = permission_prefix(tmp_path)
        if prefix is None:
            pytest.skip("this user writes through read-only permissions (root without setpriv)")
    src = tmp_path / "a.png"
    write_png(src, 8, 8)
    out = tmp_path / "o"
    needles = ["-o/--output"]
    if case == "existing-file":
        out = tmp_path / "taken.png"
        write_png(out, 4, 4)
        needles.append("is a file, not a folder")
    elif case == "parent-is-a-file":
        out = src / "sub"
        needles.append(f"{src} is a file, not a folder")
    elif case == "target-is-a-folder":
        (out / "a.png").mkdir(parents=True)
        needles.append("a folder of that name is in the way")
    elif case == "would-replace-an-input":
        out = tmp_path
        needles.append("would replace the input")
    elif case == "empty-path":
        needles.append("empty path")
    elif case == "under-read-only-folder":
        locked = tmp_path / "locked"
        locked.mkdir()
        _read_only(locked)
        out = locked / "o"
        needles.append("no write permission")
    else:  # read-only-target
        out.mkdir()
        write_png(out / "a.png", 4, 4)
        _read_only(out / "a.png")
        needles.append("read-only")
    out_arg = "" if case == "empty-path" else str(out)
    try:
        proc = run_refused(pack_parent, tmp_path, out, str(src), "-o", out_arg, "--quiet", prefix=prefix)
    finally:
        for p in (tmp_path / "locked", out / "a.png"):
            if p.exists() and not p.is_symlink():
                p.chmod(0o755)
    assert_clear_error(proc, *needles)
    if case in ("parent-is-a-file", "empty-path", "under-read-only-folder"):
        assert not out.exists()


def _zero_size_png(path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("case", ["not-an-image", "zero-pixels", "truncated", "empty-input-path"])
def test_cli_bad_input_image_is_one_line_and_leaves_no_folder(pack_parent, tmp_path, case):
    good = tmp_path / "good.png"
    write_png(good, 16, 16)
    bad = tmp_path / "bad.png"
    needles = [str(bad)]
    if case == "not-an-image":
        bad.write_text("these are notes, not a picture\n")
    elif case == "zero-pixels":
        _zero_size_png(bad)
    elif case == "truncated":  # the header reads fine: found only while decoding, inside the run
        write_png(tmp_path / "full.png", 64, 64)
        bad.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    else:
        needles = ["inputs", "empty path"]
    bad_arg = "" if case == "empty-input-path" else str(bad)
    out = tmp_path / "o" / "nested"
    # The bad image first: the run fails before it has written anything.
    proc = run_refused(pack_parent, tmp_path, out, bad_arg, str(good), "-o", str(out), "--quiet")
    assert_clear_error(proc, *needles)
    assert not (tmp_path / "o").exists()  # no empty folder left behind, not even the parent it created


def test_cli_folder_given_as_model_is_one_line(pack_parent, tmp_path):
    src, out = tmp_path / "a.png", tmp_path / "o"
    write_png(src, 8, 8)
    folder = tmp_path / "models"
    folder.mkdir()
    proc = run_refused(pack_parent, tmp_path, out, str(src), "-o", str(out), "--model", str(folder))
    assert_clear_error(proc, f"--model {folder}: is a folder, not a model file")
    assert not out.exists()


def _flat_png(path: Path, level: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), level, np.uint8)).save(path)


def _level(path: Path) -> float:
    with Image.open(path) as im:
        return float(np.asarray(im, dtype=np.float32).mean())


def test_cli_same_names_from_different_folders_keep_their_folders(pack_parent, tmp_path):
    src = tmp_path / "src"
    _flat_png(src / "a" / "x.png", 40)
    _flat_png(src / "b" / "x.png", 200)
    _flat_png(src / "c" / "y.png", 120)
    _flat_png(src / "d" / "z.png", 90)
    Image.fromarray(np.full((12, 12, 3), 160, np.uint8)).save(src / "d" / "z.jpg", quality=100)
    out = tmp_path / "out"
    # c/y.png is named twice (as a file and through its folder): upscaled once.
    args = [src / "a" / "x.png", src / "b" / "x.png", src / "c", src / "c" / "y.png", src / "d"]
    proc = run_cli(pack_parent, "upscale", *map(str, args), "-o", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/x.png", "b/x.png", "y.png", "z.jpg.png", "z.png.png"]
    for name, level in [("a/x.png", 40), ("b/x.png", 200), ("y.png", 120), ("z.png.png", 90), ("z.jpg.png", 160)]:
        assert abs(_level(out / name) - level) < 8, name
    help_text = " ".join(run_cli(pack_parent, "upscale", "--help").stdout.split())
    assert "a/x.png and b/x.png -> OUTDIR/a/x.png and OUTDIR/b/x.png" in help_text


def test_cli_reads_alpha_16_bit_and_exif_orientation_as_a_viewer_shows_them(pack_parent, tmp_path):
    rgba = np.full((16, 16, 4), 128, np.uint8)
    rgba[:, :8, 3], rgba[:, 8:, 3] = 0, 255  # left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "grey16.png")  # mode I;16, mid grey
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 wide x 10 high, shown rotated: 10 wide x 20 high
    Image.fromarray(np.full((10, 20, 3), 100, np.uint8)).save(tmp_path / "rot.jpg", exif=exif)
    out = tmp_path / "out"
    names = ("rgba.png", "grey16.png", "rot.jpg")
    proc = run_cli(pack_parent, "upscale", *(str(tmp_path / n) for n in names), "-o", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "rgba.png") as im:
        assert im.mode == "RGBA" and im.size == (64, 64)
        alpha = np.asarray(im)[..., 3].astype(np.float32)
    assert alpha[:, :28].max() < 10 and alpha[:, 36:].min() > 245
    assert abs(_level(out / "grey16.png") - 128) < 8  # not clipped to white
    with Image.open(out / "rot.png") as im:
        assert im.size == (40, 80)


def test_write_image_never_leaves_a_partial_file(tmp_path, monkeypatch):
    from speedkit.upscale_cuda import cli

    target = tmp_path / "x.png"
    target.write_bytes(b"the previous run's image")

    def failing_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half of it")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(cli.CliError, match=r"-o/--output .*: cannot write x\.png .*No space left on device"):
        cli.write_image(torch.zeros(4, 4, 3), None, target, "png")
    assert target.read_bytes() == b"the previous run's image"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_cli_sigterm_stops_cleanly_with_only_complete_images(pack_parent, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(60):
        write_png(frames / f"f{i:03d}.png", 48, 48, seed=i)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "speedkit_pack", "upscale", str(frames), "-o", str(out), "--chunk", "1", "--quiet"],
        cwd=pack_parent,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing an image"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted" in stderr.strip().splitlines()[-1]
    names = sorted(p.name for p in out.iterdir())
    assert names and all(n.endswith(".png") and not n.startswith(".") for n in names), names
    for name in names:
        with Image.open(out / name) as im:
            im.load()  # complete: a half-written PNG raises here
            assert im.size == (192, 192)


def test_main_module_names_a_missing_dependency_in_one_line(pack_parent, tmp_path):
    code = (
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['speedkit_pack', 'upscale', 'a.png', '-o', 'out']\n"
        "runpy.run_module('speedkit_pack', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=pack_parent, capture_output=True, text=True, timeout=120)
    assert_clear_error(proc, "torch", "not installed", "requirements.txt")
