"""What the generate scripts write, from musubi-tuner's own save code, against the fake CLI.

Needs ``MUSUBI_TUNER_ROOT`` (a kohya-ss/musubi-tuner checkout, v0.3.x layout). The probe
(tests/fake_musubi/musubi_probe.py) runs each script's real save code (``save_output``, or
the end of hv_generate_video's ``main()``) on a stand-in decoded video, so every file name,
folder and format is musubi's. Then:

- the fake CLI must write the same files for every ``--output_type`` the real parser offers,
  so the node tests that drive the fake see what a real run leaves behind;
- the command the Generate Video nodes build must make the real save code write PNG frames
  (``--output_type both`` does not: it writes a latent and an MP4).

The probe runs in ``MUSUBI_TUNER_PYTHON`` when set, else in this interpreter with musubi's
other imports stubbed; it needs torch, torchvision, einops, PyAV, safetensors and Pillow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fake_musubi.fake_cli import OUTPUT_TYPES, framepack_frames
from fake_musubi.fakeroot import make_fake_root

from speedkit.musubi import arch as archs
from speedkit.musubi.commands import GenerateJob, generate_argv
from speedkit.musubi.env import MusubiEnv

ROOT = os.environ.get("MUSUBI_TUNER_ROOT", "")
PYTHON = os.environ.get("MUSUBI_TUNER_PYTHON", "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ROOT, reason="set MUSUBI_TUNER_ROOT to a kohya-ss/musubi-tuner checkout to run these"),
]
PROBE = Path(__file__).resolve().parents[1] / "fake_musubi" / "musubi_probe.py"
SAVE_MODULES = ("torch", "torchvision", "einops", "av", "safetensors", "PIL", "numpy")
TIME_FLAG = re.compile(r"\d{8}-\d{6}-\d{3}")
SCRIPTS = {"hunyuan_video": "hv_generate_video", "wan": "wan_generate_video", "framepack": "fpack_generate_video"}
MODELS = {
    "hv_generate_video": ["--dit", "d", "--vae", "v", "--text_encoder1", "llm", "--text_encoder2", "clip"],
    "wan_generate_video": ["--task", "t2v-1.3B", "--dit", "d", "--vae", "v", "--t5", "t5"],
    "fpack_generate_video": ["--dit", "d", "--vae", "v", "--text_encoder1", "llm", "--text_encoder2", "clip",
                             "--image_encoder", "siglip"],
}  # fmt: skip
CASES = {
    "hv": ("hv_generate_video", ["--video_length", "5"]),
    "wan": ("wan_generate_video", ["--video_length", "5"]),
    "wan one frame": ("wan_generate_video", ["--video_length", "1"]),
    "fpack": ("fpack_generate_video", ["--video_seconds", "0.5", "--latent_window_size", "2"]),
    "fpack one frame": ("fpack_generate_video", ["--one_frame_inference", "target_index=1"]),
    "kontext": ("flux_kontext_generate_image", []),
    "flux2": ("flux_2_generate_image", []),
    "qwen": ("qwen_image_generate_image", []),
    "zimage": ("zimage_generate_image", []),
    "hv1.5": ("hv_1_5_generate_video", ["--video_length", "5"]),
    "hv1.5 one frame": ("hv_1_5_generate_video", ["--video_length", "1"]),
    "ideogram4": ("ideogram4_generate_image", []),
    "krea2": ("krea2_generate_image", ["--num-images", "2"]),
}
"""Generation settings whose files are compared, each under every --output_type of its script (scripts
without --output_type once)."""

MODELS.update({
    "flux_kontext_generate_image": ["--dit", "d", "--vae", "v", "--text_encoder1", "t5", "--text_encoder2", "clip"],
    "flux_2_generate_image": ["--dit", "d", "--vae", "v", "--text_encoder", "te"],
    "qwen_image_generate_image": ["--dit", "d", "--vae", "v", "--text_encoder", "te"],
    "zimage_generate_image": ["--dit", "d", "--vae", "v", "--text_encoder", "te"],
    "hv_1_5_generate_video": ["--dit", "d", "--vae", "v", "--text_encoder", "te", "--byt5", "b"],
    "ideogram4_generate_image": ["--dit", "d", "--vae", "v", "--text_encoder", "te"],
    "krea2_generate_image": ["--dit", "d", "--vae", "v", "--text_encoder", "te"],
})  # fmt: skip
SIZE = {
    "hv_generate_video": ["--video_size", "48", "64"], "wan_generate_video": ["--video_size", "48", "64"],
    "fpack_generate_video": ["--video_size", "48", "64"], "hv_1_5_generate_video": ["--video_size", "48", "64"],
    "krea2_generate_image": ["--width", "64", "--height", "48"],
}  # fmt: skip
"""Size flags per script (the image scripts take --image_size H W)."""
STEPS = {"krea2_generate_image": ["--steps", "2"], "ideogram4_generate_image": []}


def output_types(script: str) -> tuple[str | None, ...]:
    return OUTPUT_TYPES.get(script, (None,))


def frames_of(argv: list[str]) -> int:
    """How many frames the fake writes for ``argv`` (the real decoder is given as many)."""

    def value(flag: str, default: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv else default

    script = Path(argv[0]).stem
    if script == "fpack_generate_video":
        one_frame = "--one_frame_inference" in argv
        return framepack_frames(
            float(value("--video_seconds", "5")), int(value("--latent_window_size", "9")), one_frame
        )
    return int(value("--video_length", "0"))


def case_argv(script: str, settings: list[str], output_type: str | None, save_path: Path) -> list[str]:
    prompt = [] if script == "krea2_generate_image" else ["--prompt", "a cat"]
    common = [*prompt, *SIZE.get(script, ["--image_size", "48", "64"]), "--seed", "42"]
    common += STEPS.get(script, ["--infer_steps", "2"])
    kind = ["--output_type", output_type] if output_type else []
    tail = ["--", "a cat"] if script == "krea2_generate_image" else []
    return [f"{script}.py", *MODELS[script], *common, *settings, "--save_path", str(save_path), *kind, *tail]


def listing(folder: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(relative path with the time flag masked, tensor names of a .safetensors file), sorted."""
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            tensors: tuple[str, ...] = ()
            if path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
                tensors = tuple(sorted(k for k in header if k != "__metadata__"))
            out.append((TIME_FLAG.sub("<time>", path.relative_to(folder).as_posix()), tensors))
    return sorted(out)


def masked(files: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((TIME_FLAG.sub("<time>", f["path"]), tuple(f.get("tensors", ()))) for f in files)


def node_commands(tmp: Path) -> dict[str, list[str]]:
    """What each Generate Video node runs (its GenerateJob leaves output_type at the default)."""
    env = MusubiEnv(root=Path(ROOT), python=Path(sys.executable))
    models = {
        "hunyuan_video": dict(text_encoder1="llm", text_encoder2="clip", frames=5),
        "wan": dict(task="t2v-1.3B", text_encoder1="t5", frames=5),
        "framepack": dict(text_encoder1="llm", text_encoder2="clip", image_encoder="siglip", frames=25),
    }
    out = {}
    for arch, kw in models.items():
        job = GenerateJob(arch=arch, prompt="a cat", save_path=str(tmp / "node" / arch), dit="d", vae="v", width=64,
                          height=48, seed=42, steps=2, **kw)  # fmt: skip
        argv = generate_argv(env, job)
        i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        out[arch] = [Path(argv[i]).name, *argv[i + 1 :]]
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """One probe run: the real save code for every case and output type, and for the nodes' commands."""
    python = PYTHON or sys.executable
    if not PYTHON:
        missing = [m for m in SAVE_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            pytest.skip(f"the save check needs {', '.join(missing)} in this interpreter (or set MUSUBI_TUNER_PYTHON)")
    tmp = tmp_path_factory.mktemp("real_saves")
    checks, keys = [], []
    for name, (script, settings) in CASES.items():
        for output_type in output_types(script):
            argv = case_argv(script, settings, output_type, tmp / name.replace(" ", "_") / str(output_type))
            checks.append({"script": script, "argv": argv[1:], "frames": frames_of(argv)})
            keys.append((name, output_type))
    for arch, argv in node_commands(tmp).items():
        checks.append({"script": SCRIPTS[arch], "argv": argv[1:], "frames": frames_of(argv)})
        keys.append(("node", arch))
    request = {"root": ROOT, "stub_all": not PYTHON, "keep_real": list(SAVE_MODULES), "save_checks": checks}
    proc = subprocess.run([python, str(PROBE)], input=json.dumps(request), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout)["saves"]
    bad = [f"{key}: {res.get('error')}" for key, res in zip(keys, answer, strict=True) if not res["ok"]]
    assert not bad, "the real save code could not be run:\n" + "\n".join(bad)
    return dict(zip(keys, answer, strict=True))


@pytest.mark.parametrize("arch", list(SCRIPTS))
def test_output_types_are_the_real_parsers_choices(real, arch):
    script = SCRIPTS[arch]
    name = next(n for n, (s, _) in CASES.items() if s == script)
    choices = tuple(real[(name, OUTPUT_TYPES[script][0])]["output_types"])
    assert OUTPUT_TYPES[script] == choices, f"fake_cli.OUTPUT_TYPES[{script!r}] != the parser's {choices}"
    assert archs.ARCHS[arch].output_types == choices, f"musubi/arch.py {arch}.output_types != the parser's {choices}"
    assert archs.FRAMES_OUTPUT_TYPE in choices


@pytest.mark.parametrize("script", sorted({s for s, _ in CASES.values()} - set(SCRIPTS.values())))
def test_other_scripts_output_types_are_the_real_parsers(real, script):
    """The table-driven nodes pass --output_type images where the script has the option, and only there."""
    name = next(n for n, (s, _) in CASES.items() if s == script)
    choices = tuple(real[(name, output_types(script)[0])]["output_types"])
    assert OUTPUT_TYPES.get(script, ()) == choices, f"fake_cli.OUTPUT_TYPES[{script!r}] != the parser's {choices}"
    gen = next(spec.gen for spec in archs.ARCHS.values() if spec.gen and spec.gen.script == script)
    assert gen.output_type == bool(choices) and (not choices or archs.FRAMES_OUTPUT_TYPE in choices)


@pytest.mark.parametrize(
    ("case", "output_type"), [(name, t) for name, (script, _) in CASES.items() for t in output_types(script)]
)
def test_fake_writes_the_files_the_real_save_code_writes(real, tmp_path, case, output_type):
    script, settings = CASES[case]
    root = make_fake_root(tmp_path)
    save = tmp_path / "fake"
    argv = case_argv(script, settings, output_type, save)
    proc = subprocess.run([sys.executable, str(root / "src" / "musubi_tuner" / argv[0]), *argv[1:]],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = masked(real[(case, output_type)]["files"])
    assert expected, f"the real {script} wrote nothing for --output_type {output_type}"
    assert listing(save) == expected, f"{script} --output_type {output_type}: the fake's files differ from musubi's"


@pytest.mark.parametrize("arch", list(SCRIPTS))
def test_the_generate_nodes_command_makes_musubi_write_frames(real, arch):
    """The bug this guards: with --output_type both the real scripts write no PNG frames at all."""
    files = masked(real[("node", arch)]["files"])
    frames = [p for p, _ in files if p.endswith(".png")]
    assert frames, f"{SCRIPTS[arch]} writes no PNG frames for the node's command: {files}"
    assert len({str(Path(p).parent) for p in frames}) == 1 and frames == sorted(frames)


def test_fake_training_samples_are_named_like_musubis():
    """fake_cli.write_sample follows trainer_base.sample_image_inference's folder and file names."""
    source = (Path(ROOT) / "src" / "musubi_tuner" / "training" / "trainer_base.py").read_text(encoding="utf-8")
    assert 'save_dir = os.path.join(args.output_dir, "sample")' in source
    assert "{num_suffix}_{prompt_idx:02d}_{ts_str}{seed_suffix}" in source
    assert 'num_suffix = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"' in source
    assert "save_images_grid(video, save_dir, save_path, n_rows=video.shape[0], create_subdir=False)" in source
    assert 'video_path = os.path.join(save_dir, save_path) + ".mp4"' in source
