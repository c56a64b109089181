"""Hostile and mistaken uses of ``python -m <pack> upscale``, each answered cleanly.

Every refused case: exit status 2, exactly one line on stderr that names the option (or the
file) and the value, no traceback, and not one file or folder changed anywhere under the
test's folder (a refused run creates no output folder). The cases run the CLI's ``main`` in
this process (seconds for the whole battery); a sample of them also runs as a real
``python -m`` subprocess to show both give the same answer. Models are random-weight real
architectures saved to files (spandrel's Compact, the embedded model's architecture).
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from test_upscale_cli import cli_env, pack_parent, permission_prefix, run_cli, tree  # noqa: F401 - fixture

from speedkit.upscale_cuda import cli

REPO = Path(__file__).resolve().parents[2]


# -- fixtures and helpers ------------------------------------------------------------------------


def write_png(path: Path, h: int = 12, w: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def flat_png(path: Path, level: int, h: int = 12, w: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), level, np.uint8)).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` and whose data is empty."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def compact_file(path: Path, channels: int = 3, scale: int = 2) -> Path:
    torch.manual_seed(0)
    net = Compact(num_in_ch=channels, num_out_ch=channels, num_feat=8, num_conv=2, upscale=scale)
    save_file(net.state_dict(), str(path))
    return path


class Evil:
    """Unpickling this runs a shell command: a hostile ``.pth`` must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Result:
    code: int
    stderr: str
    stdout: str = ""


def run_main(*argv: str, capsys) -> Result:
    """``main(argv)`` in this process; an exception escaping it (a traceback) fails the test."""
    try:
        code = cli.main(["upscale", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return Result(code, captured.err, captured.out)


def assert_one_line(result: Result, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ERROR "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- the battery: (name, setup) where setup(tmp) -> (argv, needles) --------------------------------
# In every setup ``tmp/a.png`` is a good image and ``tmp/out`` the (not yet existing) output folder.

Setup = Callable[[Path], tuple[list[str], list[str]]]


def _opt(*extra: str, needles: list[str]) -> Setup:
    def setup(tmp: Path) -> tuple[list[str], list[str]]:
        return [str(tmp / "a.png"), "-o", str(tmp / "out"), *extra], needles

    return setup


def _model(make: Callable[[Path], Path], *needles: str) -> Setup:
    def setup(tmp: Path) -> tuple[list[str], list[str]]:
        model = make(tmp)
        return [str(tmp / "a.png"), "-o", str(tmp / "out"), "--model", str(model)], [f"--model {model}", *needles]

    return setup


def _inputs(make: Callable[[Path], list[Path | str]], *needles: str) -> Setup:
    def setup(tmp: Path) -> tuple[list[str], list[str]]:
        items = make(tmp)
        return [*map(str, items), "-o", str(tmp / "out")], [n.format(tmp=tmp) for n in needles]

    return setup


def _output(make: Callable[[Path], Path | str], *needles: str) -> Setup:
    def setup(tmp: Path) -> tuple[list[str], list[str]]:
        out = make(tmp)
        return [str(tmp / "a.png"), "-o", str(out)], ["-o/--output", *needles]

    return setup


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _half_safetensors(tmp: Path) -> Path:
    full = compact_file(tmp / "full.safetensors")
    data = full.read_bytes()
    full.unlink()
    (tmp / "half.safetensors").write_bytes(data[: len(data) // 2])
    return tmp / "half.safetensors"


def _evil_pth(tmp: Path) -> Path:
    with open(tmp / "evil.pth", "wb") as f:
        pickle.dump({"params": Evil(tmp / "PWNED")}, f)
    return tmp / "evil.pth"


def _unknown_arch(tmp: Path) -> Path:
    torch.save({"encoder.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, tmp / "unknown.pth")
    return tmp / "unknown.pth"


def _broken_link(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).symlink_to(tmp / "nowhere" / name)
        return tmp / name

    return make


def _existing_file_as_output(tmp: Path) -> Path:
    return write_png(tmp / "taken.png", 4, 4)


def _target_is_a_folder(tmp: Path) -> Path:
    (tmp / "out" / "a.png").mkdir(parents=True)
    return tmp / "out"


def _folder(*names: str) -> Callable[[Path], list[Path]]:
    def make(tmp: Path) -> list[Path]:
        folder = tmp / "frames"
        folder.mkdir()
        for name in names:
            (folder / name).write_text("x")
        return [folder]

    return make


def _truncated_png(tmp: Path) -> list[Path]:
    full = write_png(tmp / "full.png", 64, 64)
    (tmp / "bad.png").write_bytes(full.read_bytes()[:200])
    full.unlink()
    return [tmp / "bad.png", tmp / "a.png"]


def _zero_pixels(tmp: Path) -> list[Path]:
    return [png_header_only(tmp / "bad.png", 0, 0)]


BATTERY: dict[str, Setup] = {
    # -- --device
    "device-cuda-without-gpu": _opt("--device", "cuda", needles=["--device cuda", "no CUDA device", "--device cpu"]),
    "device-cuda-index-without-gpu": _opt("--device", "cuda:3", needles=["--device cuda:3", "no CUDA device"]),
    "device-bogus": _opt("--device", "bogus", needles=["--device bogus", "unknown device", "cpu, cuda or cuda:N"]),
    "device-cuda-x": _opt("--device", "cuda:x", needles=["--device cuda:x", "unknown device"]),
    "device-cuda-negative": _opt("--device", "cuda:-1", needles=["--device cuda:-1", "unknown device"]),
    "device-cpu-index": _opt("--device", "cpu:0", needles=["--device cpu:0", "unknown device"]),
    "device-empty": _opt("--device", "", needles=["--device", "unknown device", "cpu, cuda"]),
    "device-mps": _opt("--device", "mps", needles=["--device mps", "unknown device"]),
    # -- numbers
    "tile-negative": _opt("--tile", "-5", needles=["--tile -5", ">= 0", "0 = automatic"]),
    "tile-text": _opt("--tile", "abc", needles=["--tile", "'abc'", "whole number", "tile size"]),
    "tile-nan": _opt("--tile", "nan", needles=["--tile", "'nan'", "whole number"]),
    "tile-fraction": _opt("--tile", "1.5", needles=["--tile", "'1.5'", "whole number"]),
    "overlap-negative": _opt("--overlap", "-3", needles=["--overlap -3", ">= 0"]),
    "overlap-text": _opt("--overlap", "x", needles=["--overlap", "'x'", "whole number"]),
    "batch-negative": _opt("--batch", "-2", needles=["--batch -2", ">= 0"]),
    "batch-fraction": _opt("--batch", "2.5", needles=["--batch", "'2.5'", "whole number"]),
    "batch-inf": _opt("--batch", "inf", needles=["--batch", "'inf'", "whole number"]),
    "scale-zero": _opt("--scale", "0", needles=["--scale 0.0", "(0, 16]"]),
    "scale-negative": _opt("--scale", "-2", needles=["--scale -2.0", "(0, 16]"]),
    "scale-nan": _opt("--scale", "nan", needles=["--scale", "'nan'", "finite number"]),
    "scale-inf": _opt("--scale", "inf", needles=["--scale", "'inf'", "finite number"]),
    "scale-too-large": _opt("--scale", "17", needles=["--scale 17.0", "(0, 16]"]),
    "scale-text": _opt("--scale", "two", needles=["--scale", "'two'", "not a number"]),
    "chunk-zero": _opt("--chunk", "0", needles=["--chunk 0", ">= 1"]),
    "chunk-negative": _opt("--chunk", "-1", needles=["--chunk -1", ">= 1"]),
    # -- choices and unknown options
    "precision-fp64": _opt("--precision", "fp64", needles=["--precision", "'fp64'", "auto, fp16, bf16, fp32"]),
    "dtype-int8": _opt("--dtype", "int8", needles=["--dtype", "'int8'", "auto, fp16, bf16, fp32"]),
    "format-gif": _opt("--format", "gif", needles=["--format", "'gif'", "png, jpg, webp"]),
    "level-turbo": _opt("--level", "turbo", needles=["--level", "'turbo'", "balanced"]),
    "unknown-tile-size": _opt("--tile-size", "128", needles=["--tile-size", "did you mean --tile"]),
    "unknown-fp16-flag": _opt("--fp16", needles=["--fp16", "did you mean --precision fp16"]),
    "unknown-typo": _opt("--modle", "x.pth", needles=["--modle", "did you mean --model"]),
    "output-missing": lambda tmp: ([str(tmp / "a.png")], ["-o/--output", "required"]),
    "inputs-missing": lambda tmp: (["-o", str(tmp / "out")], ["inputs", "required"]),
    # -- output folder
    "output-empty-path": _output(lambda tmp: "", "empty path"),
    "output-is-a-file": _output(_existing_file_as_output, "is a file, not a folder"),
    "output-under-a-file": _output(lambda tmp: tmp / "a.png" / "sub", "is a file, not a folder"),
    "output-broken-symlink": _output(_broken_link("out-link"), "symbolic link to nothing"),
    "output-target-is-a-folder": _output(_target_is_a_folder, "a folder of that name is in the way"),
    "output-would-replace-input": _output(lambda tmp: tmp, "would replace the input"),
    # -- model file
    "model-missing": _model(lambda tmp: tmp / "nope.pth", "no such file", "RealESRGAN_x4plus"),
    "model-folder": _model(lambda tmp: (tmp / "models").mkdir() or tmp / "models", "is a folder"),
    "model-zero-byte-safetensors": _model(_bytes("empty.safetensors", b""), "empty (0 bytes", "download it again"),
    "model-zero-byte-pth": _model(_bytes("empty.pth", b""), "empty (0 bytes"),
    "model-garbage-safetensors": _model(_bytes("junk.safetensors", b"\x00garbage" * 50), "cannot load it"),
    "model-truncated-safetensors": _model(_half_safetensors, "cannot load it"),
    "model-hostile-pickle": _model(_evil_pth, "cannot load it", "forbidden"),
    "model-unknown-architecture": _model(_unknown_arch, "cannot load it", "architecture"),
    "model-text-extension": _model(_bytes("notes.txt", b"not a model"), "cannot load it", "extension"),
    "model-url": lambda tmp: (
        [str(tmp / "a.png"), "-o", str(tmp / "out"), "--model", "https://example.com/RealESRGAN_x4plus.pth"],
        ["--model https:/", "example.com", "web address", "download"],
    ),
    "model-one-channel": _model(lambda tmp: compact_file(tmp / "grey.safetensors", channels=1), "3-channel"),
    "model-broken-symlink": _model(_broken_link("link.pth"), "symbolic link to nothing"),
    # -- inputs
    "input-missing": _inputs(lambda tmp: [tmp / "nope.png"], "{tmp}/nope.png", "no such file or folder"),
    "input-text-named-png": _inputs(
        lambda tmp: [(tmp / "t.png").write_text("notes") and tmp / "t.png"], "{tmp}/t.png", "not a readable image"
    ),
    "input-zero-byte-png": _inputs(lambda tmp: [_bytes("z.png", b"")(tmp)], "{tmp}/z.png", "not a readable image"),
    "input-zero-pixels": _inputs(_zero_pixels, "{tmp}/bad.png", "image"),
    "input-truncated-png": _inputs(_truncated_png, "{tmp}/bad.png", "cannot read the image"),
    "input-unsupported-suffix": _inputs(
        lambda tmp: [(tmp / "n.txt").write_text("x") and tmp / "n.txt"], "{tmp}/n.txt", "not a supported image"
    ),
    "input-empty-folder": _inputs(_folder(), "{tmp}/frames", "holds no"),
    "input-folder-hidden-and-text-only": _inputs(_folder(".x.png", "notes.txt"), "{tmp}/frames", "holds no"),
    "input-device-file": _inputs(lambda tmp: [os.devnull], os.devnull, "not a file or folder"),
    "input-broken-symlink": _inputs(lambda tmp: [_broken_link("l.png")(tmp)], "{tmp}/l.png", "symbolic link"),
    "input-empty-path": _inputs(lambda tmp: ["", tmp / "a.png"], "inputs", "empty path"),
    "input-decompression-bomb": _inputs(lambda tmp: [png_header_only(tmp / "bomb.png", 20000, 20000)], "bomb.png"),
    "input-too-large-for-memory": _inputs(lambda tmp: [png_header_only(tmp / "huge.png", 12000, 12000)], "huge.png"),
}

# Unwritable folders and unreadable files cannot be made for root (which ignores permissions).
PERMISSION_CASES: dict[str, Setup] = {
    "output-unwritable-folder": _output(
        lambda tmp: ((tmp / "locked").mkdir(), (tmp / "locked").chmod(0o555), tmp / "locked" / "out")[-1],
        "no write permission",
    ),
    "output-read-only-target": _output(
        lambda tmp: (write_png(tmp / "out" / "a.png", 4, 4).chmod(0o444), tmp / "out")[-1], "read-only"
    ),
    "model-unreadable": _model(
        lambda tmp: (compact_file(tmp / "m.safetensors").chmod(0o000), tmp / "m.safetensors")[-1], "permission"
    ),
}


def _restore_permissions(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(0o755)


@pytest.fixture
def no_gpu(monkeypatch):
    """This process sees no CUDA device, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("case", sorted(BATTERY))
def test_bad_use_is_one_clear_line_and_changes_nothing(case, tmp_path, capsys, no_gpu):
    write_png(tmp_path / "a.png")
    argv, needles = BATTERY[case](tmp_path)
    before = tree(tmp_path)
    result = run_main(*argv, "--quiet", capsys=capsys)
    assert_one_line(result, *needles)
    assert tree(tmp_path) == before, "a refused run changed the disk"
    assert not (tmp_path / "PWNED").exists()  # the hostile pickle never ran


@pytest.mark.parametrize("case", sorted(PERMISSION_CASES))
def test_permission_problems_are_one_clear_line(case, tmp_path, capsys, pack_parent):  # noqa: F811
    prefix = permission_prefix(tmp_path)
    if prefix is None:
        pytest.skip("this user writes through read-only permissions (root without setpriv)")
    write_png(tmp_path / "a.png")
    try:
        argv, needles = PERMISSION_CASES[case](tmp_path)
        before = tree(tmp_path)
        if prefix:  # root: the CLI runs in a process that obeys permission bits
            proc = run_cli(pack_parent, "upscale", *argv, "--quiet", prefix=prefix)
            result = Result(proc.returncode, proc.stderr, proc.stdout)
        else:
            result = run_main(*argv, "--quiet", capsys=capsys)
        after = tree(tmp_path)
    finally:
        _restore_permissions(tmp_path)
    assert_one_line(result, *needles)
    assert after == before


def test_battery_is_large_enough():
    assert len(BATTERY) + len(PERMISSION_CASES) >= 40


@pytest.mark.parametrize(
    "case", ["device-cuda-without-gpu", "tile-nan", "unknown-tile-size", "model-hostile-pickle", "input-truncated-png"]
)
def test_a_real_subprocess_gives_the_same_answer(case, tmp_path):
    parent = tmp_path / "custom_nodes"
    parent.mkdir()
    (parent / "speedkit_pack").symlink_to(REPO, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    write_png(work / "a.png")
    argv, needles = BATTERY[case](work)
    before = tree(work)
    proc = subprocess.run(
        [sys.executable, "-m", "speedkit_pack", "upscale", *argv, "--quiet"],
        cwd=parent,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env({"CUDA_VISIBLE_DEVICES": ""}),
    )
    assert_one_line(Result(proc.returncode, proc.stderr), *needles)
    assert tree(work) == before
    assert not (work / "PWNED").exists()


# -- cases the command handles (exit 0) without overwriting or hiding anything -------------------


def _level(path: Path) -> float:
    with Image.open(path) as im:
        return float(np.asarray(im, dtype=np.float32).mean())


def test_same_names_from_two_folders_are_both_kept_and_the_log_says_so(tmp_path, capsys):
    flat_png(tmp_path / "a" / "x.png", 40)
    flat_png(tmp_path / "b" / "x.png", 200)
    out = tmp_path / "out"
    result = run_main(str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "-o", str(out), capsys=capsys)
    assert result.code == 0, result.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/x.png", "b/x.png"]
    assert abs(_level(out / "a" / "x.png") - 40) < 8 and abs(_level(out / "b" / "x.png") - 200) < 8
    assert "2 input(s) share a file name with another input" in result.stderr
    assert f"done: 2 image(s) written to {out}" in result.stderr


def test_existing_outputs_replaced_are_counted_in_the_final_line(tmp_path, capsys):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"old")
    result = run_main(str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out), capsys=capsys)
    assert result.code == 0, result.stderr
    assert f"done: 2 image(s) written to {out}, 1 existing file(s) replaced" in result.stderr
    with Image.open(out / "a.png") as im:
        assert im.size == (64, 48)


def test_an_output_name_that_is_a_link_is_replaced_not_followed(tmp_path, capsys):
    write_png(tmp_path / "a.png")
    precious = tmp_path / "elsewhere" / "precious.png"
    flat_png(precious, 7)
    before = precious.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").symlink_to(precious)
    result = run_main(str(tmp_path / "a.png"), "-o", str(out), "--quiet", capsys=capsys)
    assert result.code == 0, result.stderr
    assert precious.read_bytes() == before  # the file outside the output folder is untouched
    assert not (out / "a.png").is_symlink()


def test_tile_below_the_smallest_is_raised_with_a_warning(tmp_path, capsys, caplog):
    write_png(tmp_path / "a.png", 100, 130)
    with caplog.at_level(logging.INFO, logger="speedkit"):
        result = run_main(str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--tile", "4", capsys=capsys)
    assert result.code == 0, result.stderr
    assert "WARNING --tile 4: below the smallest tile for this" in result.stderr
    assert "(64 px); using --tile 64" in result.stderr
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("upscale: Compact"))
    assert "tiles 12 of 64x64" in report  # not 850 tiles of 4 px


def test_upper_case_choices_are_accepted(tmp_path, capsys):
    write_png(tmp_path / "a.png")
    result = run_main(
        str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--format", "JPG", "--dtype", "FP32", capsys=capsys
    )
    assert result.code == 0, result.stderr
    assert (tmp_path / "out" / "a.jpg").is_file()


def test_default_model_points_photos_to_a_photographic_model(tmp_path, capsys):
    write_png(tmp_path / "a.png")
    result = run_main(str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), capsys=capsys)
    assert result.code == 0, result.stderr
    assert "made for anime and cartoons; for photos use a photographic model: --model RealESRGAN_x4plus" in (
        result.stderr
    )


def test_help_shows_examples_for_anime_and_for_photos(capsys):
    result = run_main("--help", capsys=capsys)
    assert result.code == 0
    for needle in ("examples:", "anime", "photographs", "--model RealESRGAN_x4plus.pth", "--scale 2"):
        assert needle in result.stdout, needle


def test_progress_lines_stand_alone_between_log_lines(tmp_path, capsys):
    frames = tmp_path / "frames"
    for i in range(3):
        write_png(frames / f"f{i}.png", seed=i)
    write_png(tmp_path / "wide.png", 12, 30)  # another size: another chunk, another log line
    result = run_main(str(frames), str(tmp_path / "wide.png"), "-o", str(tmp_path / "out"), capsys=capsys)
    assert result.code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr  # not a terminal: whole lines, no redraws
    progress = [line for line in lines if line.startswith("progress:")]
    assert progress and progress[-1].startswith("progress: 4/4 image(s) upscaled")
    for line in lines:
        assert line.startswith(("INFO ", "WARNING ", "progress: ")), line
        assert line.count("progress:") <= 1 and not (line.startswith("INFO") and "progress:" in line), line


def test_console_on_a_terminal_wipes_and_redraws_the_progress_line():
    import io

    from speedkit.upscale_cuda.console import Console

    stream = io.StringIO()
    console = Console(stream, interactive=True)
    console.progress("progress: 1/3")
    console.line("INFO a log line")
    console.progress("progress: 3/3", final=True)
    screen = stream.getvalue()
    # The log line starts at the left margin on a fresh line and the bar is drawn again below it.
    assert "\r" + " " * len("progress: 1/3") + "\rINFO a log line\nprogress: 1/3" in screen
    assert screen.endswith("\rprogress: 3/3\n")


def test_a_chunk_that_cannot_fit_in_host_memory_is_reduced_with_a_log_line(tmp_path, capsys, monkeypatch):
    frames = tmp_path / "frames"
    for i in range(6):
        write_png(frames / f"f{i}.png", 32, 32, seed=i)
    per_frame, once = cli.frame_bytes((32, 32), 4, None, on_cpu=True)
    # Room for two chunks of two frames at the balanced share, not for two of six.
    monkeypatch.setattr(cli, "host_available_bytes", lambda: int((4 * per_frame + once) / 0.7) + 1)
    result = run_main(str(frames), "-o", str(tmp_path / "out"), "--chunk", "6", "--device", "cpu", capsys=capsys)
    assert result.code == 0, result.stderr
    assert "WARNING --chunk 6: 6 frames of 32x32 need about" in result.stderr
    assert "using --chunk 2" in result.stderr
    assert len(list((tmp_path / "out").iterdir())) == 6


def test_an_explicit_batch_that_cannot_fit_is_reduced_with_a_log_line_naming_the_flag(tmp_path, capsys, monkeypatch):
    from speedkit.upscale_cuda import engine

    frames = tmp_path / "frames"
    for i in range(8):
        write_png(frames / f"f{i}.png", 32, 32, seed=i)
    monkeypatch.setattr(engine, "free_memory_bytes", lambda device: 48 * 1024**2)
    result = run_main(str(frames), "-o", str(tmp_path / "out"), "--batch", "8", "--device", "cpu", capsys=capsys)
    assert result.code == 0, result.stderr
    assert "WARNING upscale: --batch 8 does not fit in the free cpu memory" in result.stderr
    assert len(list((tmp_path / "out").iterdir())) == 8


def test_a_failure_after_some_images_keeps_only_complete_ones(tmp_path, capsys):
    frames = tmp_path / "frames"
    write_png(frames / "f0.png", 16, 16)
    write_png(frames / "f1.png", 16, 16, seed=1)
    full = write_png(tmp_path / "full.png", 16, 16)
    (frames / "f2.png").write_bytes(full.read_bytes()[:120])  # header fine, data cut
    out = tmp_path / "out"
    result = run_main(str(frames), "-o", str(out), "--chunk", "1", "--quiet", capsys=capsys)
    assert_one_line(result, f"{frames / 'f2.png'}", "cannot read the image")
    names = sorted(p.name for p in out.iterdir())
    # The images finished before the failure are kept (f1 may be decoded but not yet upscaled
    # when f2 fails), and no temporary file is left.
    assert "f0.png" in names and set(names) <= {"f0.png", "f1.png"}
    for name in names:
        with Image.open(out / name) as im:
            im.load()


def test_a_bare_model_name_is_found_in_comfyuis_upscale_models(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "custom_nodes" / "speedkit_pack").symlink_to(REPO, target_is_directory=True)
    (comfy / "models" / "upscale_models").mkdir(parents=True)
    compact_file(comfy / "models" / "upscale_models" / "tiny_x2.safetensors")
    src = write_png(tmp_path / "a.png")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "speedkit_pack", "upscale", str(src), "-o", str(out), "--model", "tiny_x2"],
        cwd=comfy / "custom_nodes",
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env({"CUDA_VISIBLE_DEVICES": ""}),
    )
    assert proc.returncode == 0, proc.stderr
    assert "--model tiny_x2: using" in proc.stderr
    with Image.open(out / "a.png") as im:
        assert im.size == (32, 24)  # the x2 model, not the embedded x4
