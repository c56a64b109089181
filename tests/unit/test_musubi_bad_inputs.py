"""Musubi Tuner nodes: every bad input gets a clear error (input name, value, fix) before musubi starts.

The nodes run against a stand-in ``comfy_api`` / ``folder_paths`` / ``comfy`` and a fake
musubi-tuner checkout (tests/fake_musubi). Where a case must be refused *before* any musubi
process starts, the adapter's ``run_command`` is replaced by a tripwire. The runner cases
(partial outputs, cancel, no shell) drive real subprocesses: small ``python -c`` scripts or the
fake musubi CLI.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_musubi.fake_cli import LORA_KEYS, write_safetensors
from fake_musubi.fakeroot import FAKE_SITE, make_fake_root
from PIL import Image

from speedkit.musubi import commands, configs, env, lora_file, media, runner
from speedkit.musubi import dataset as mdataset
from speedkit.musubi.runner import MusubiCancelled, MusubiRunError, run_command

ADAPTER = "speedkit.nodes.musubi"
MUSUBI_STARTED = "a musubi process was started"
POSIX = pytest.mark.skipif(os.name == "nt", reason="uses POSIX process groups and /proc")


# --- stand-ins for ComfyUI ------------------------------------------------------------------


class _Socket:
    """Stands in for io.String, io.Custom("X") ...: only what define_schema() calls."""

    def __init__(self, kind: str = "") -> None:
        self.kind = kind

    def Input(self, id_: str, **kw):  # noqa: N802 - ComfyUI's name
        return SimpleNamespace(id=id_, **kw)

    def Output(self, **kw):  # noqa: N802
        return SimpleNamespace(**kw)


def _fake_comfy(monkeypatch, tmp_path: Path, interrupted=lambda: False) -> None:
    io = types.ModuleType("comfy_api.latest.io")
    for kind in ("String", "Int", "Float", "Boolean", "Combo", "Image"):
        setattr(io, kind, _Socket(kind))
    io.Custom = _Socket
    io.Schema = lambda **kw: SimpleNamespace(**kw)
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = lambda *a, **kw: (a, kw)
    io.Hidden = SimpleNamespace(unique_id="UNIQUE_ID")
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    folder_paths.get_user_directory = lambda: str(tmp_path / "user")
    folder_paths.get_folder_paths = lambda kind: [str(tmp_path / "loras")]
    folder_paths.get_full_path = lambda kind, name: None
    folder_paths.add_model_folder_path = lambda kind, path: None
    mm = types.ModuleType("comfy.model_management")
    mm.processing_interrupted = interrupted
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.intermediate_dtype = lambda: torch.float32

    class Interrupted(Exception):
        """Stands in for comfy.model_management.InterruptProcessingException."""

    def throw():
        if interrupted():
            raise Interrupted()

    mm.InterruptProcessingException = Interrupted
    mm.throw_exception_if_processing_interrupted = throw
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total, node_id=None: SimpleNamespace(update_absolute=lambda *a: None)
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils
    fakes = {
        "comfy_api": types.ModuleType("comfy_api"),
        "comfy_api.latest": latest,
        "comfy_api.latest.io": io,
        "folder_paths": folder_paths,
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.utils": utils,
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv(env.CONFIG_ENV_VAR, raising=False)


def _adapter_modules() -> list[str]:
    return [k for k in sys.modules if k == ADAPTER or k.startswith(ADAPTER + ".")]


def _import_adapter(monkeypatch):
    # the package and its submodules, imported afresh against the stand-in ComfyUI (and dropped after)
    for name in _adapter_modules():
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module(ADAPTER)
    for name in _adapter_modules():
        monkeypatch.setitem(sys.modules, name, sys.modules[name])
    for cls in module.NODES:
        cls.hidden = SimpleNamespace(unique_id="7")
    return module


@pytest.fixture
def node(monkeypatch, tmp_path):
    """The adapter module without ComfyUI; starting musubi fails the test."""
    _fake_comfy(monkeypatch, tmp_path)
    module = _import_adapter(monkeypatch)

    def tripwire(*args, **kwargs):
        raise AssertionError(MUSUBI_STARTED)

    monkeypatch.setattr(module.running, "run_command", tripwire)
    return module


@pytest.fixture
def musubi(tmp_path) -> env.MusubiEnv:
    """A fake checkout run by this interpreter (its accelerate is the fake one)."""
    return env.MusubiEnv(make_fake_root(tmp_path), Path(sys.executable), {"PYTHONPATH": str(FAKE_SITE)})


@pytest.fixture
def models(tmp_path) -> dict[str, str]:
    folder = tmp_path / "models"
    folder.mkdir()
    out = {}
    for name in ("dit", "vae", "t5"):
        (folder / f"{name}.safetensors").write_bytes(b"x")
        out[name] = str(folder / f"{name}.safetensors")
    return out


def lora(path: Path) -> Path:
    write_safetensors(str(path), LORA_KEYS)
    return path


def truncated(path: Path) -> Path:
    """A LoRA whose header is whole but whose tensor bytes were cut short (an interrupted copy)."""
    lora(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    return path


def image(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


def ok_frames(n: int = 4) -> np.ndarray:
    return np.stack([np.full((8, 8, 3), i / n, np.float32) for i in range(n)])


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def video_output(node, frames, fps=8.0, fmt="webp", prefix="musubi/video"):
    return node.VideoOutput.execute(frames=frames, fps=fps, format=fmt, quality=90, filename_prefix=prefix)


def gen_wan(node, musubi, models, **over):
    kw = dict(
        musubi_env=musubi, prompt="a fox", negative_prompt="", dit=models["dit"], vae=models["vae"], width=64,
        height=48, frames=5, fps=0, steps=2, seed=1, guidance_scale=0.0, flow_shift=0.0, image=None, end_image=None,
        lora_1="", strength_1=1.0, lora_2="", strength_2=1.0, lora_3="", strength_3=1.0, attn_mode="sdpa", fp8=False,
        fp8_text_encoder=False, blocks_to_swap=0, extra_args="",
    )  # fmt: skip
    kw.update(over)
    return node.GenerateVideoWan.execute(task="t2v-1.3B", t5=models["t5"], clip="", dit_high_noise="", fp8_scaled=False,
                                         video_path="", control_video="", **kw)  # fmt: skip


def merge(node, musubi, models, **over):
    kw = dict(dit=models["dit"], output_path="", device="cpu", lora_1="", strength_1=1.0, lora_2="", strength_2=1.0,
              lora_3="", strength_3=1.0, musubi_env=musubi)  # fmt: skip
    kw.update(over)
    return node.MergeLoRA.execute(**kw)


def ema(node, musubi, checkpoints, **over):
    kw = dict(checkpoints=checkpoints, beta=0.95, beta2=0.0, sigma_rel=0.0, no_sort=False, output_path="",
              musubi_env=musubi)  # fmt: skip
    kw.update(over)
    return node.PostHocEMA.execute(**kw)


# --- Video Output: frames that cannot be saved as meant --------------------------------------


def test_video_output_nan_frame_is_named_with_its_index(node, tmp_path):
    frames = ok_frames(5)
    frames[3, 2, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"^frames: frame 3 \(of 5\) has NaN values; .*fix it upstream"):
        video_output(node, image(frames))
    assert files_under(tmp_path / "output") == []


def test_video_output_inf_frame_is_named_with_its_index(node, tmp_path):
    frames = ok_frames(3)
    frames[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"^frames: frame 1 \(of 3\) has Inf values"):
        video_output(node, image(frames))
    assert files_under(tmp_path / "output") == []


def test_video_output_empty_batch(node, tmp_path):
    with pytest.raises(ValueError, match=r"^frames: the batch is empty \(shape \(0, 8, 8, 3\)\).*produced no frames"):
        video_output(node, image(np.zeros((0, 8, 8, 3))))


def test_video_output_wrong_channel_count(node):
    with pytest.raises(ValueError, match=r"^frames: 4 channels per pixel, need 3 \(RGB\): drop the alpha channel"):
        video_output(node, image(np.zeros((2, 8, 8, 4))))


def test_video_output_values_far_outside_0_1(node, tmp_path):
    frames = ok_frames(3) * 255.0
    with pytest.raises(ValueError, match=r"^frames: frame 1 \(of 3\) has values from 85 to 85, far outside 0\.\.1; "
                                         r"they look like 0\.\.255 values: divide them by 255"):  # fmt: skip
        video_output(node, image(frames))
    assert files_under(tmp_path / "output") == []


def test_video_output_minus_one_to_one_range(node):
    frames = ok_frames(2) * 2 - 1  # -1..1, e.g. a latent-space image decoded without the final rescale
    with pytest.raises(ValueError, match=r"^frames: frame 0 \(of 2\) has values from -1 to -1, far outside 0\.\.1; "
                                         r"they look like -1\.\.1 values: map them to 0\.\.1"):  # fmt: skip
        video_output(node, image(frames))


def test_video_output_slight_overshoot_is_still_clamped_and_saved(node, tmp_path):
    frames = ok_frames(3)
    frames[0, 0, 0] = [1.04, -0.03, 0.5]  # a resampler's ringing: not a mistake
    (path,), _ = video_output(node, image(frames))
    assert media.read_video(path)[0].shape == (3, 8, 8, 3)


def test_video_output_nan_fps(node):
    with pytest.raises(ValueError, match=r"^fps: nan is not a finite number; set it to a number such as 16\.0"):
        video_output(node, image(ok_frames()), fps=math.nan)


def test_video_output_control_character_in_prefix(node):
    with pytest.raises(ValueError, match=r"^filename_prefix='clip\\x00' contains a control character"):
        video_output(node, image(ok_frames()), prefix="clip\0")


def test_write_video_failure_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    def half_then_fail(frames, p, fps, fmt, quality):
        p.write_bytes(b"RIFF half a webp")
        raise OSError("disk full")

    monkeypatch.setattr(media, "_encode", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        media.write_video(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "clip", 8, "webp")
    assert files_under(tmp_path) == []


# --- reading videos: a file that is not one ------------------------------------------------


@pytest.fixture
def text_mp4(tmp_path) -> Path:
    if not media.has_pyav():
        pytest.skip("PyAV is not installed: .mp4 files are refused before decoding")
    path = tmp_path / "clip.mp4"
    path.write_text("this is a text file, not a video\n")
    return path


def test_video_input_text_file_named_mp4(node, text_mp4):
    import av

    with pytest.raises(ValueError, match=r"^video_path: '.*clip\.mp4' is not a readable video file \(FFmpeg: Invalid "
                                         r"data found when processing input\); .*pick another file") as info:  # fmt: skip
        node.VideoInput.execute(video_path=str(text_mp4), frame_stride=1, max_frames=0, start_frame=0)
    assert not isinstance(info.value, av.error.FFmpegError)  # a message, not PyAV's raw exception


def test_dataset_viewer_names_the_unreadable_video(node, text_mp4, tmp_path):
    text_mp4.with_suffix(".txt").write_text("a caption")
    config = {"general": {"caption_extension": ".txt"}, "datasets": [{"video_directory": str(text_mp4.parent)}]}
    (_, report), _ = node.DatasetViewer.execute({"config": config}, max_items=4, size=64)
    assert "datasets[0] file clip.mp4: " in report and "is not a readable video file" in report


def test_video_input_truncated_gif(node, tmp_path):
    path = tmp_path / "clip.gif"
    media.write_video(np.zeros((3, 16, 16, 3), np.uint8), path, 8, "gif")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"^video_path: '.*clip\.gif' is not a readable GIF/WebP/PNG/JPG file"):
        node.VideoInput.execute(video_path=str(path), frame_stride=1, max_frames=0, start_frame=0)


def test_video_input_empty_path(node):
    with pytest.raises(ValueError, match="^video_path is empty: give the path of a video file"):
        node.VideoInput.execute(video_path="  ", frame_stride=1, max_frames=0, start_frame=0)


# --- failed and cancelled runs: no partial file under a final name, the log named ---------


def _script(tmp_path: Path, code: str) -> list[str]:
    script = tmp_path / "script.py"
    script.write_text(code)
    return [sys.executable, str(script)]


@POSIX
def test_failed_run_renames_its_half_written_output_and_names_the_log(tmp_path):
    out, log = tmp_path / "out" / "merged.safetensors", tmp_path / "out" / "merged.log"
    out.parent.mkdir()
    code = f"open({str(out)!r}, 'wb').write(b'\\x10\\0\\0\\0\\0\\0\\0\\0' + b'{{\"a\"'); print('crash'); raise SystemExit(2)"
    with pytest.raises(MusubiRunError) as info:
        run_command(_script(tmp_path, code), cwd=tmp_path, log_path=log, expected_outputs=[out],
                    set_aside_partial=True)  # fmt: skip
    text = str(info.value)
    assert not out.exists() and runner.partial_name(out).is_file()
    assert f"{out} -> merged.safetensors.partial" in text and f"Full log: {log}" in text
    assert "crash" in log.read_text() and "renamed" in log.read_text()


@POSIX
def test_an_older_finished_file_is_not_renamed_when_a_new_run_fails(tmp_path):
    out = tmp_path / "lora.safetensors"
    lora(out)
    os.utime(out, (time.time() - 3600, time.time() - 3600))
    with pytest.raises(MusubiRunError) as info:
        run_command([sys.executable, "-c", "raise SystemExit(1)"], cwd=tmp_path, expected_outputs=[out],
                    set_aside_partial=True)  # fmt: skip
    assert out.is_file() and "renamed" not in str(info.value)


@POSIX
def test_cancelled_run_leaves_no_file_under_its_final_name_and_kills_its_tree(tmp_path):
    out, log, pids = tmp_path / "lora.safetensors", tmp_path / "train.log", tmp_path / "pids"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        f"open({str(out)!r}, 'wb').write(b'half a LoRA')\n"
        "print('saving', flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(MusubiCancelled) as info:
        run_command(_script(tmp_path, code), cwd=tmp_path, log_path=log, expected_outputs=[out], grace_s=1.0,
                    should_cancel=lambda: out.exists(), set_aside_partial=True)  # fmt: skip
    assert not out.exists() and runner.partial_name(out).read_bytes() == b"half a LoRA"
    text = str(info.value)
    assert "process tree was killed" in text and "lora.safetensors.partial" in text and f"Log: {log}" in text
    child = int(pids.read_text())
    while time.monotonic() - t0 < 5 and runner.pid_alive(child):
        time.sleep(0.05)
    assert not runner.pid_alive(child)


@POSIX
def test_cancel_kills_a_child_that_left_the_process_group(tmp_path):
    """A worker started with setsid escapes killpg: the tree walk must still find and kill it."""
    pids = tmp_path / "pids"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(MusubiCancelled):
        run_command(_script(tmp_path, code), cwd=tmp_path, grace_s=1.0, should_cancel=pids.exists)
    child = int(pids.read_text())
    while time.monotonic() - t0 < 5 and runner.pid_alive(child):
        time.sleep(0.05)
    alive = runner.pid_alive(child)
    if alive:
        os.kill(child, 9)
    assert not alive, "a process that left the run's process group survived Cancel"


@POSIX
def test_truncated_checkpoint_of_a_failed_run_is_set_aside_whole_ones_kept(tmp_path):
    good, cut = tmp_path / "lora-000001.safetensors", tmp_path / "lora-000002.safetensors"
    lora(tmp_path / "template.safetensors")
    data = (tmp_path / "template.safetensors").read_bytes()
    code = (
        f"open({str(good)!r}, 'wb').write({data!r}); print('saving checkpoint: {good}', flush=True)\n"
        f"open({str(cut)!r}, 'wb').write({data[:-10]!r}); print('saving checkpoint: {cut}', flush=True)\n"
        "raise SystemExit(1)\n"
    )
    with pytest.raises(MusubiRunError) as info:
        run_command(_script(tmp_path, code), cwd=tmp_path, expected_outputs=[tmp_path / "lora.safetensors"],
                    set_aside_partial=True)  # fmt: skip
    text = str(info.value)
    assert good.is_file() and not cut.exists() and runner.partial_name(cut).is_file()
    assert f"Checkpoints it saved before stopping: {good}" in text and "lora-000002.safetensors.partial" in text


@POSIX
def test_cut_short_cache_file_of_a_failed_run_is_set_aside_whole_ones_kept(tmp_path):
    """--skip_existing would reuse a cut-short cache next time; whole ones are worth keeping."""
    cache = tmp_path / "cache"
    cache.mkdir()
    lora(tmp_path / "template.safetensors")
    data = (tmp_path / "template.safetensors").read_bytes()
    whole, cut = cache / "img0_0064x0048_wan.safetensors", cache / "img1_0064x0048_wan.safetensors"
    code = f"open({str(whole)!r}, 'wb').write({data!r}); open({str(cut)!r}, 'wb').write({data[:-30]!r}); exit(1)"
    with pytest.raises(MusubiRunError) as info:
        run_command(_script(tmp_path, code), cwd=tmp_path, cache_dirs=[cache], set_aside_partial=True)
    assert whole.is_file() and not cut.exists() and runner.partial_name(cut).is_file()
    assert "img1_0064x0048_wan.safetensors.partial" in str(info.value)


@POSIX
def test_failed_generation_renames_its_run_folder_and_names_the_log(monkeypatch, tmp_path, models):
    _fake_comfy(monkeypatch, tmp_path)
    node = _import_adapter(monkeypatch)
    musubi = env.MusubiEnv(make_fake_root(tmp_path), Path(sys.executable),
                           {"PYTHONPATH": str(FAKE_SITE), "FAKE_MUSUBI_MODE": "fail"})  # fmt: skip
    with pytest.raises(MusubiRunError, match="exited with code 1") as info:
        gen_wan(node, musubi, models, image=image(ok_frames(1)))
    generated = tmp_path / "output" / "musubi" / "generated"
    (folder,) = list(generated.iterdir())
    assert folder.name.endswith(".partial")  # nothing left under the name of a finished run
    assert (folder / "generate.log").is_file() and (folder / "start_image.png").is_file()
    text = str(info.value)
    assert f"Full log: {folder / 'generate.log'}" in text and "renamed so it is not taken for a finished one" in text


# --- the musubi environment -----------------------------------------------------------------


def test_musubi_root_is_a_file(tmp_path):
    (tmp_path / "musubi").write_text("")
    with pytest.raises(ValueError, match=r"^musubi_root: '.*musubi' is a file, not a folder: give the musubi-tuner"):
        env.validate_env(env.MusubiEnv(tmp_path / "musubi", Path(sys.executable)))


def test_missing_musubi_root_via_the_environment_node(node, tmp_path):
    with pytest.raises(ValueError, match=r"^musubi_root '.*nope' is not a folder: clone it"):
        node.Environment.execute(str(tmp_path / "nope"), sys.executable, "", check_accelerate=False)


def test_venv_folder_without_python(musubi, tmp_path):
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    resolved = env.resolve_env(str(musubi.root), str(tmp_path / "venv"), config_path=None, environ={})
    with pytest.raises(ValueError, match=r"^python: '.*venv' is a folder without bin/python or Scripts\\python\.exe"):
        env.validate_env(resolved)


@POSIX
def test_venv_python_is_a_broken_link(musubi, tmp_path):
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(tmp_path / "gone" / "python3.11")
    resolved = env.resolve_env(str(musubi.root), str(tmp_path / "venv"), config_path=None, environ={})
    with pytest.raises(ValueError, match=r"^python: '.*python' is a broken link .*python -m venv --clear"):
        env.validate_env(resolved)


@POSIX
def test_venv_python_is_not_executable(musubi, tmp_path):
    py = tmp_path / "python"
    py.write_text("not a program")
    with pytest.raises(ValueError, match=r"^python: '.*python' is not executable"):
        env.validate_env(env.MusubiEnv(musubi.root, py))


def test_missing_script_is_named_before_anything_runs(node, musubi, tmp_path):
    (musubi.root / "src" / "musubi_tuner" / "convert_lora.py").unlink()
    with pytest.raises(ValueError, match=r"^script convert_lora\.py is missing from .*git pull"):
        node.ConvertLoRA.execute(lora=str(lora(tmp_path / "a.safetensors")), direction="auto", output_name="",
                                 diffusers_prefix="", musubi_env=musubi)  # fmt: skip


def test_settings_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "musubi.toml"
    path.write_bytes(b'musubi_root = "\xff\xfe"\n')
    with pytest.raises(ValueError, match=r"^musubi settings file .*musubi\.toml could not be read .*fix or delete it"):
        env.resolve_env(config_path=path, environ={})


# --- no shell, no traversal ---------------------------------------------------------------


@POSIX
def test_paths_with_shell_metacharacters_reach_the_script_verbatim(tmp_path):
    """The runner passes an argument list, never a shell string: nothing in a path is executed."""
    pwned = tmp_path / "pwned"
    nasty = [f"a; touch {pwned}", f"$(touch {pwned})", f"`touch {pwned}`", f"x | touch {pwned} &", 'it\'s "q" *']
    lines: list[str] = []
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    run_command([sys.executable, "-c", code, *nasty], cwd=tmp_path, on_line=lines.append)
    assert json.loads(lines[0]) == nasty and not pwned.exists()


def test_nul_in_a_command_line_argument_is_refused_before_starting(tmp_path):
    with pytest.raises(ValueError, match="contains a NUL character"):
        run_command([sys.executable, "-c", "pass", "a\0b"], cwd=tmp_path)


@pytest.mark.parametrize("bad", ["a\0b", "my\nlora", "tab\there"], ids=["nul", "newline", "tab"])
def test_output_name_with_a_control_character(bad):
    with pytest.raises(ValueError, match=r"^output_name='.*' contains a control character"):
        env.check_output_name(bad)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda n, m, e, t: video_output(n, image(ok_frames()), prefix="../../etc/x"),
         r"^filename_prefix='\.\./\.\./etc/x' must stay inside the output folder"),
        (lambda n, m, e, t: n.ConvertLoRA.execute(lora=str(lora(t / "a.safetensors")), direction="auto",
                                                  output_name="../evil", diffusers_prefix="", musubi_env=e),
         r"^output_name='\.\./evil' must be a plain file name"),
        (lambda n, m, e, t: n.TrainLoRAWan.execute(
            dataset={"toml": str(t / "d.toml")}, dit=m["dit"], task="t2v-1.3B", dit_high_noise="",
            timestep_boundary=0, offload_inactive_dit=False, one_frame=False, vae="", t5="", clip="",
            output_name="../../x", output_dir=str(t / "o"), gpu_ids="", extra_args="", musubi_env=e),
         r"^output_name='\.\./\.\./x' must be a plain file name"),
    ],
    ids=["video_filename_prefix", "convert_output_name", "train_output_name"],
)  # fmt: skip
def test_traversal_in_name_inputs(node, musubi, models, tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(node, models, musubi, tmp_path)
    assert not (tmp_path / "o").exists()


def test_extra_args_with_nul():
    with pytest.raises(ValueError, match=r"^extra_args: '--flag a\\x00b' contains a NUL character"):
        commands.extra_args("--flag a\0b")


def test_gpu_ids_that_are_not_gpu_numbers(node, musubi, models, tmp_path):
    with pytest.raises(ValueError, match=r"^gpu_ids: '0; rm -rf /' must be GPU numbers separated by commas"):
        node.TrainLoRAWan.execute(
            dataset={"toml": str(tmp_path / "d.toml")}, dit=models["dit"], task="t2v-1.3B", dit_high_noise="",
            timestep_boundary=0, offload_inactive_dit=False, one_frame=False, vae="", t5="", clip="",
            output_name="x", output_dir=str(tmp_path / "o"), gpu_ids="0; rm -rf /", extra_args="", musubi_env=musubi,
        )  # fmt: skip


def test_device_that_is_not_a_device(node, musubi, models, tmp_path):
    with pytest.raises(ValueError, match=r"^device: 'cuda 1' is not a device: write e\.g\. cuda, cuda:1 or cpu"):
        node.CacheLatents.execute(
            dataset={"toml": str(tmp_path / "d.toml")}, architecture="wan", vae=models["vae"], image_encoder="",
            i2v=False, vae_tiling=False, vae_chunk_size=0, vae_spatial_tile_sample_min_size=0, vae_cache_cpu=False,
            one_frame=False, f1=False, model_version="", batch_size=0, num_workers=0, skip_existing=True,
            keep_cache=False, device="cuda 1", extra_args="", musubi_env=musubi,
        )  # fmt: skip


def test_output_dir_that_is_a_file(node, musubi, models, tmp_path):
    (tmp_path / "o").write_text("a file")
    with pytest.raises(ValueError, match=r"^output_dir: could not create the folder '.*sub' \(.*\): pick a writable"):
        node.TrainLoRAWan.execute(
            dataset={"toml": str(tmp_path / "d.toml")}, dit=models["dit"], task="t2v-1.3B", dit_high_noise="",
            timestep_boundary=0, offload_inactive_dit=False, one_frame=False, vae="", t5="", clip="",
            output_name="x", output_dir=str(tmp_path / "o" / "sub"), gpu_ids="", extra_args="", musubi_env=musubi,
        )  # fmt: skip


# --- NaN / Inf in float inputs (ComfyUI's min/max checks let NaN through) -------------------


def _float_case(name, value):
    return pytest.param(name, value, id=f"{name}={value}")


@pytest.mark.parametrize(
    "name, value",
    [_float_case("guidance_scale", math.nan), _float_case("flow_shift", math.inf), _float_case("strength_1", math.nan)],
)
def test_nan_inf_in_generate_floats(node, musubi, models, tmp_path, name, value):
    over = {name: value}
    if name == "strength_1":
        over["lora_1"] = str(lora(tmp_path / "style.safetensors"))
    with pytest.raises(ValueError, match=rf"^{name}: {value!r} is not a finite number; set it to a number such as"):
        gen_wan(node, musubi, models, **over)
    assert not (tmp_path / "output" / "musubi" / "generated").exists()


def test_nan_in_merge_strength(node, musubi, models, tmp_path):
    a, b = lora(tmp_path / "a.safetensors"), lora(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"^strength_2: nan is not a finite number; set it to a number such as 1\.0"):
        merge(node, musubi, models, lora_1=str(a), lora_2=str(b), strength_2=math.nan,
              output_path=str(tmp_path / "m.safetensors"))  # fmt: skip


def test_nan_in_post_hoc_ema_sigma_rel(node, musubi, tmp_path):
    ckpts = "\n".join(str(lora(tmp_path / f"c{i}.safetensors")) for i in range(2))
    with pytest.raises(ValueError, match=r"^sigma_rel: nan is not a finite number; set it to a number such as 0\.0"):
        ema(node, musubi, ckpts, sigma_rel=math.nan, output_path=str(tmp_path / "e.safetensors"))


def test_inf_in_training_config_flow_shift(node):
    from speedkit.musubi.configs import TrainingConfig

    kw = {k: getattr(TrainingConfig(), k) for k in TrainingConfig.__dataclass_fields__}
    kw.update(discrete_flow_shift=math.inf, max_train_steps=0)
    with pytest.raises(ValueError, match=r"^discrete_flow_shift: inf is not a finite number; set it to a number such"):
        node.TrainingConfig.execute(**kw)


def test_nan_in_optimizer_scheduler_power(node):
    kw = {k: getattr(configs.OptimizerConfig(), k) for k in configs.OptimizerConfig.__dataclass_fields__}
    kw["lr_scheduler_power"] = math.nan
    with pytest.raises(ValueError, match=r"^lr_scheduler_power: nan is not a finite number; set it to a number such"):
        node.OptimizerConfig.execute(**kw)


def test_nan_in_dataset_source_fps(node, tmp_path):
    with pytest.raises(ValueError, match=r"^source_fps: nan is not a finite number; set it to a number such as 0\.0"):
        node.DatasetConfig.execute(
            kind="video", directory=str(tmp_path), jsonl_file="", cache_directory="", control_directory="", width=64,
            height=64, caption_extension=".txt", batch_size=1, num_repeats=1, enable_bucket=True,
            bucket_no_upscale=False, target_frames="1", frame_extraction="head", frame_stride=1, frame_sample=1,
            max_frames=129, source_fps=math.nan, fp_latent_window_size=0, name="d", check_files=False,
        )  # fmt: skip


def test_nan_in_memory_optimizer_vram(node):
    with pytest.raises(ValueError, match=r"^vram_gb: nan is not a finite number"):
        node.MemoryOptimizer.execute(mode="suggest", architecture="wan", model_size="14B", vram_gb=math.nan)


def test_nan_start_image_of_a_generation(node, musubi, models, tmp_path):
    frames = ok_frames(1)
    frames[0, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"^image: frame 0 \(of 1\) has NaN values"):
        gen_wan(node, musubi, models, image=image(frames))
    assert not (tmp_path / "output" / "musubi" / "generated").exists()


# --- empty prompt lists ---------------------------------------------------------------------


def test_sampling_config_without_a_prompt(node):
    with pytest.raises(
        ValueError, match=r"^prompts: '# only a comment\\n\\n' holds no prompt .*unplug sampling_config"
    ):
        node.SamplingConfig.execute(
            prompts="# only a comment\n\n", sample_every_n_epochs=1, sample_every_n_steps=0, sample_at_first=False,
            width=0, height=0, frames=0, steps=0, seed=-1,
        )  # fmt: skip


def test_batch_prompts_with_only_comments(node):
    with pytest.raises(ValueError, match="^prompts is empty: write one prompt per line"):
        node.BatchProcessor.execute(prompts="# a\n   \n# b")


def test_post_hoc_ema_with_one_checkpoint(node, musubi, tmp_path):
    with pytest.raises(ValueError, match=r"^checkpoints: 1 path\(s\) given, post-hoc EMA averages at least 2"):
        ema(node, musubi, str(lora(tmp_path / "c.safetensors")), output_path=str(tmp_path / "e.safetensors"))


# --- zero-byte and truncated LoRA / safetensors files ----------------------------------------


def test_convert_zero_byte_lora(node, musubi, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^lora: '.*empty\.safetensors' is empty \(0 bytes\), .*save or download it"):
        node.ConvertLoRA.execute(lora=str(tmp_path / "empty.safetensors"), direction="auto", output_name="",
                                 diffusers_prefix="", musubi_env=musubi)  # fmt: skip


def test_convert_empty_lora_input(node, musubi):
    with pytest.raises(ValueError, match="^lora is empty: give a LoRA .safetensors path"):
        node.ConvertLoRA.execute(lora=" ", direction="auto", output_name="", diffusers_prefix="", musubi_env=musubi)


def test_merge_truncated_lora(node, musubi, models, tmp_path):
    a, b = lora(tmp_path / "a.safetensors"), truncated(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"^lora_2: '.*b\.safetensors' is truncated: its tensors need \d+ bytes, "
                                         r"the file has \d+"):  # fmt: skip
        merge(node, musubi, models, lora_1=str(a), lora_2=str(b), output_path=str(tmp_path / "m.safetensors"))


def test_merge_truncated_header(node, musubi, models, tmp_path):
    bad = tmp_path / "a.safetensors"
    bad.write_bytes(struct.pack("<Q", 500) + b'{"lora_unet_x.lora_down.weight":')
    with pytest.raises(ValueError, match=r"^lora_1: '.*a\.safetensors' is not a \.safetensors file \(truncated: its "
                                         r"header needs 508 bytes"):  # fmt: skip
        merge(node, musubi, models, lora_1=str(bad), output_path=str(tmp_path / "m.safetensors"))


def test_merge_zero_byte_dit(node, musubi, models, tmp_path):
    Path(models["dit"]).write_bytes(b"")
    with pytest.raises(ValueError, match=r"^dit: '.*dit\.safetensors' is empty \(0 bytes\), so not a model"):
        merge(node, musubi, models, lora_1=str(lora(tmp_path / "a.safetensors")),
              output_path=str(tmp_path / "m.safetensors"))  # fmt: skip


def test_merge_output_path_is_one_of_its_inputs(node, musubi, models, tmp_path):
    a = lora(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"^output_path: '.*a\.safetensors' is the same file as lora_1; the run would"):
        merge(node, musubi, models, lora_1=str(a), output_path=str(a))


def test_post_hoc_ema_zero_byte_checkpoint(node, musubi, tmp_path):
    (tmp_path / "c1.safetensors").write_bytes(b"")
    ckpts = f"{lora(tmp_path / 'c0.safetensors')}\n{tmp_path / 'c1.safetensors'}"
    with pytest.raises(ValueError, match=r"^checkpoints line 2: '.*c1\.safetensors' is empty \(0 bytes\)"):
        ema(node, musubi, ckpts, output_path=str(tmp_path / "e.safetensors"))


def test_post_hoc_ema_missing_checkpoint(node, musubi, tmp_path):
    ckpts = f"{lora(tmp_path / 'c0.safetensors')}\n{tmp_path / 'nope.safetensors'}"
    with pytest.raises(ValueError, match=r"^checkpoints line 2: '.*nope\.safetensors' does not exist as a file"):
        ema(node, musubi, ckpts, output_path=str(tmp_path / "e.safetensors"))


def test_training_config_truncated_network_weights(node, tmp_path):
    kw = {k: getattr(configs.TrainingConfig(), k) for k in configs.TrainingConfig.__dataclass_fields__}
    kw["network_weights"] = str(truncated(tmp_path / "resume.safetensors"))
    with pytest.raises(ValueError, match=r"^network_weights: '.*resume\.safetensors' is truncated"):
        node.TrainingConfig.execute(**kw)


def test_safetensors_completeness_helper(tmp_path):
    assert lora_file.safetensors_complete(lora(tmp_path / "a.safetensors"))
    assert not lora_file.safetensors_complete(truncated(tmp_path / "b.safetensors"))
    assert not lora_file.safetensors_complete(tmp_path / "missing.safetensors")


# --- dataset inputs that gave raw tracebacks ------------------------------------------------


def test_caption_extension_without_a_dot(node, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "img0.png")
    with pytest.raises(mdataset.DatasetConfigError, match=r"datasets\[0\]\.caption_extension = 'txt' must be a file "
                                                          r"ending with its dot"):  # fmt: skip
        node.DatasetConfig.execute(
            kind="image", directory=str(tmp_path), jsonl_file="", cache_directory="", control_directory="", width=64,
            height=64, caption_extension="txt", batch_size=1, num_repeats=1, enable_bucket=True,
            bucket_no_upscale=False, target_frames="1", frame_extraction="head", frame_stride=1, frame_sample=1,
            max_frames=129, source_fps=0.0, fp_latent_window_size=0, name="d", check_files=True,
        )  # fmt: skip


def test_dataset_toml_that_is_not_utf8(node, tmp_path):
    path = tmp_path / "d.toml"
    path.write_bytes(b'[general]\ncaption_extension = "\xff"\n')
    with pytest.raises(ValueError, match=r"^dataset config '.*d\.toml' could not be read as UTF-8 text .*save it as"):
        node.DatasetConfigLoader.execute(toml_path=str(path), check_files=False)
