"""Merge LoRA command lines per architecture (musubi v0.3.x merge_lora.py / --save_merged_model).

What each generate script needs in merge-only mode was read from its ``main()``: the text
encoder(s) (and for some the VAE / image encoder) run before the DiT is loaded, and only the
``--lycoris`` path writes the file for Wan, FramePack, Qwen-Image, Z-Image and HunyuanVideo
1.5. The integration tier parses every argv below with musubi's own parser.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from fake_musubi.fakeroot import fake_env, make_fake_root

from speedkit.musubi import commands
from speedkit.musubi.commands import MergeJob, merge_argv, merge_lora_argv
from speedkit.musubi.env import MusubiEnv
from speedkit.musubi.runner import MusubiRunError, run_command

ROOT = Path("/opt/musubi-tuner")
ENV = MusubiEnv(root=ROOT, python=Path("/opt/venv/bin/python"))
LORAS = (("a.safetensors", 1.0), ("b.safetensors", 0.5))


@pytest.fixture(autouse=True)
def src_layout(monkeypatch):
    monkeypatch.setattr(MusubiEnv, "src_layout", property(lambda self: True))


def script(name: str) -> list[str]:
    return [str(ENV.python), str(ROOT / "src" / "musubi_tuner" / f"{name}.py")]


TAIL = ["--lora_weight", "a.safetensors", "b.safetensors", "--lora_multiplier", "1", "0.5"]

EXPECTED = {
    "hunyuan_video": (
        {},
        script("merge_lora")
        + ["--dit", "dit.pt", *TAIL, "--save_merged_model", "/m/out.safetensors", "--device", "cpu"],
    ),
    "wan": (
        {"text_encoder1": "t5.pth", "prompt_file": "/m/p.txt"},
        script("wan_generate_video")
        + ["--task", "t2v-14B", "--dit", "dit.pt", "--t5", "t5.pth", *TAIL, "--lycoris"]
        + ["--save_merged_model", "/m/out.safetensors", "--from_file", "/m/p.txt", "--save_path", "/m"]
        + ["--device", "cpu"],
    ),
    "framepack": (
        {"vae": "vae", "text_encoder1": "llava", "text_encoder2": "clip", "image_encoder": "siglip"},
        script("fpack_generate_video")
        + ["--dit", "dit.pt", "--vae", "vae", "--text_encoder1", "llava", "--text_encoder2", "clip"]
        + ["--image_encoder", "siglip", *TAIL, "--lycoris", "--save_merged_model", "/m/out.safetensors"]
        + ["--prompt", "merge", "--save_path", "/m", "--device", "cpu"],
    ),
    "flux_kontext": (
        {"vae": "ae", "text_encoder1": "t5", "text_encoder2": "clip", "prompt_file": "/m/p.txt"},
        script("flux_kontext_generate_image")
        + ["--dit", "dit.pt", "--vae", "ae", "--text_encoder1", "t5", "--text_encoder2", "clip", *TAIL]
        + ["--save_merged_model", "/m/out.safetensors", "--from_file", "/m/p.txt", "--save_path", "/m"]
        + ["--device", "cpu"],
    ),
    "qwen_image": (
        {"vae": "vae", "text_encoder1": "qwen_vl"},
        script("qwen_image_generate_image")
        + ["--dit", "dit.pt", "--vae", "vae", "--text_encoder", "qwen_vl", *TAIL, "--lycoris"]
        + ["--save_merged_model", "/m/out.safetensors", "--prompt", "merge", "--save_path", "/m", "--device", "cpu"],
    ),
    "zimage": (
        {"text_encoder1": "qwen3"},
        script("zimage_generate_image")
        + ["--dit", "dit.pt", "--text_encoder", "qwen3", *TAIL, "--lycoris"]
        + ["--save_merged_model", "/m/out.safetensors", "--prompt", "merge", "--save_path", "/m", "--device", "cpu"],
    ),
    "hunyuan_video_1_5": (
        {"text_encoder1": "qwen_vl", "text_encoder2": "byt5"},
        script("hv_1_5_generate_video")
        + ["--dit", "dit.pt", "--text_encoder", "qwen_vl", "--byt5", "byt5", *TAIL, "--lycoris"]
        + ["--save_merged_model", "/m/out.safetensors", "--prompt", "merge", "--video_length", "1"]
        + ["--save_path", "/m", "--device", "cpu"],
    ),
    "flux_2": (
        {"vae": "ae", "text_encoder1": "qwen3", "prompt_file": "/m/p.txt", "model_version": "klein-9b"},
        script("flux_2_generate_image")
        + ["--dit", "dit.pt", "--model_version", "klein-9b", "--vae", "ae", "--text_encoder", "qwen3", *TAIL]
        + ["--save_merged_model", "/m/out.safetensors", "--from_file", "/m/p.txt", "--save_path", "/m"]
        + ["--device", "cpu"],
    ),
}


def job(arch: str, **kw) -> MergeJob:
    return MergeJob(arch=arch, dit="dit.pt", loras=LORAS, output="/m/out.safetensors", **kw)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_merge_argv_per_architecture(arch):
    models, expected = EXPECTED[arch]
    assert merge_argv(ENV, job(arch, **models)) == expected


def test_every_merge_architecture_is_covered():
    assert set(EXPECTED) == set(commands.MERGE_SPECS)


def test_hunyuan_video_default_reproduces_the_old_command():
    old = merge_lora_argv(ENV, "dit.pt", list(LORAS), "/m/out.safetensors", "cuda")
    assert merge_argv(ENV, job("hunyuan_video", device="cuda")) == old


@pytest.mark.parametrize(
    ("task", "models", "flags"),
    [
        ("t2v-1.3B", {"text_encoder1": "t5"}, ["--t5"]),
        ("t2i-14B", {"text_encoder1": "t5"}, ["--t5"]),
        ("flf2v-14B", {"text_encoder1": "t5"}, ["--t5"]),  # batch mode treats flf2v as not i2v: no VAE/CLIP
        ("i2v-14B", {"text_encoder1": "t5", "vae": "v", "image_encoder": "clip"}, ["--t5", "--vae", "--clip"]),
        ("i2v-14B-FC", {"text_encoder1": "t5", "vae": "v", "image_encoder": "clip"}, ["--t5", "--vae", "--clip"]),
        ("t2v-14B-FC", {"text_encoder1": "t5", "vae": "v"}, ["--t5", "--vae"]),
        ("i2v-A14B", {"text_encoder1": "t5", "vae": "v"}, ["--t5", "--vae"]),  # Wan2.2 loads no CLIP
        ("t2v-A14B", {"text_encoder1": "t5"}, ["--t5"]),
    ],
)
def test_wan_tasks_load_what_batch_mode_loads(task, models, flags):
    argv = merge_argv(ENV, job("wan", task=task, prompt_file="p.txt", **models))
    assert argv[argv.index("--task") + 1] == task
    assert [a for a in argv if a in ("--t5", "--vae", "--clip")] == flags
    assert "--dit_high_noise" not in argv  # one DiT per run: both would be saved to the same path
    missing = dict(models)
    missing.popitem()
    with pytest.raises(ValueError, match="loads .* before it merges: fill those inputs"):
        merge_argv(ENV, job("wan", task=task, prompt_file="p.txt", **missing))


def test_patterns_are_repeated_for_every_lora():
    argv = merge_argv(ENV, job("zimage", text_encoder1="q", include_pattern=r"blocks_\d+_attn", exclude_pattern="ffn"))
    assert argv[argv.index("--include_patterns") + 1 : argv.index("--exclude_patterns")] == [r"blocks_\d+_attn"] * 2
    assert argv[argv.index("--exclude_patterns") + 1 : argv.index("--lycoris")] == ["ffn"] * 2


@pytest.mark.parametrize(
    ("arch", "kw", "message"),
    [
        ("krea2", {}, r"architecture='krea2' has no LoRA merge in musubi-tuner: choose one of hunyuan_video"),
        ("zimage", {"text_encoder1": "q", "model_version": "dev"}, "model_version is a FLUX.2 input; Z-Image has none"),
        (
            "flux_2",
            {"vae": "v", "text_encoder1": "q", "prompt_file": "p", "model_version": "klein-5b"},
            "model_version='klein-5b' must be one of dev, klein-4b",
        ),
        (
            "hunyuan_video",
            {"include_pattern": "x"},
            "include_pattern / exclude_pattern are not supported by merge_lora",
        ),
        ("hunyuan_video", {"vae": "v"}, "loads only the DiT: clear vae"),
        ("framepack", {"vae": "v"}, "loads text_encoder1, text_encoder2, image_encoder before it merges"),
        ("zimage", {"text_encoder1": "q", "vae": "v"}, "Z-Image merging does not use vae: clear those inputs"),
        ("qwen_image", {"vae": "v", "text_encoder1": "q", "task": "t2v-14B"}, "task is a Wan input"),
        ("wan", {"text_encoder1": "t5", "task": "t2v-99B", "prompt_file": "p"}, "task='t2v-99B' must be one of"),
        ("zimage", {"text_encoder1": "q", "exclude_pattern": "("}, "exclude_pattern='\\(' is not a valid regular"),
        ("wan", {"text_encoder1": "t5"}, "prompt_file is empty"),
    ],
)
def test_merge_bad_inputs_name_the_input(arch, kw, message):
    with pytest.raises(ValueError, match=message):
        merge_argv(ENV, job(arch, **kw))


def test_merge_needs_a_lora_dit_and_output():
    with pytest.raises(ValueError, match="at least one LoRA"):
        merge_argv(ENV, MergeJob(arch="hunyuan_video", dit="d", loras=(), output="o.safetensors"))
    with pytest.raises(ValueError, match="dit is empty"):
        merge_argv(ENV, MergeJob(arch="wan", dit="", loras=LORAS, output="o.safetensors"))
    with pytest.raises(ValueError, match="output_path is empty"):
        merge_argv(ENV, MergeJob(arch="wan", dit="d", loras=LORAS, output=""))


# --- the argv run against the fake musubi (which behaves like v0.3.4's merge-only modes) ----


@pytest.mark.skipif(os.name == "nt", reason="the runner tests use POSIX process groups")
@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_merge_runs_produce_the_file(arch, tmp_path):
    root = make_fake_root(tmp_path)
    env = MusubiEnv(root=root, python=Path(sys.executable))
    out = tmp_path / "merged" / "out.safetensors"
    models, _ = EXPECTED[arch]
    prompt = tmp_path / "p.txt"
    prompt.write_text("merge\n")
    models = {**models, "prompt_file": str(prompt)} if "prompt_file" in models else models
    j = MergeJob(arch=arch, dit="d", loras=LORAS, output=str(out), **models)
    spec = commands.merge_spec(arch)
    done = commands.MERGE_SAVED_LINE if spec.exits_nonzero_after_save else ""
    result = run_command(merge_argv(env, j), cwd=root, env=fake_env(), expected_outputs=[out], done_line=done)
    assert out.is_file()
    assert result.returncode == (1 if spec.exits_nonzero_after_save else 0)


@pytest.mark.skipif(os.name == "nt", reason="the runner tests use POSIX process groups")
def test_without_lycoris_wan_saves_nothing_and_the_run_fails(tmp_path):
    """Why --lycoris is passed: musubi's plain LoRA path returns before saving (PR #594)."""
    root = make_fake_root(tmp_path)
    env = MusubiEnv(root=root, python=Path(sys.executable))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an older merge")  # a stale file of the same name must not count as the result
    os.utime(out, (1_000_000, 1_000_000))
    prompt = tmp_path / "p.txt"
    prompt.write_text("merge\n")
    argv = merge_argv(env, MergeJob(arch="wan", dit="d", loras=LORAS, output=str(out), text_encoder1="t5",
                                    prompt_file=str(prompt)))  # fmt: skip
    argv.remove("--lycoris")
    with pytest.raises(MusubiRunError, match="exited with code 0 but did not write .*older than this run"):
        run_command(argv, cwd=root, env=fake_env(), expected_outputs=[out])


@pytest.mark.skipif(os.name == "nt", reason="the runner tests use POSIX process groups")
def test_crash_after_save_counts_only_with_the_saved_line(tmp_path):
    root = make_fake_root(tmp_path)
    env = MusubiEnv(root=root, python=Path(sys.executable))
    out = tmp_path / "out.safetensors"
    argv = merge_argv(env, MergeJob(arch="qwen_image", dit="d", loras=LORAS, output=str(out), vae="v",
                                    text_encoder1="q"))  # fmt: skip
    with pytest.raises(MusubiRunError, match="exited with code 1"):
        run_command(argv, cwd=root, env=fake_env(), expected_outputs=[out])  # no done_line: a crash is a crash
    out.unlink()
    with pytest.raises(MusubiRunError, match="exited with code 1"):  # saved line but no file: still a failure
        run_command(argv, cwd=root, env=fake_env({"FAKE_MUSUBI_MODE": "no_output"}), expected_outputs=[out],
                    done_line=commands.MERGE_SAVED_LINE)  # fmt: skip
    with pytest.raises(MusubiRunError, match="exited with code 1"):  # crash before saving
        run_command(argv, cwd=root, env=fake_env({"FAKE_MUSUBI_MODE": "fail"}), expected_outputs=[out],
                    done_line=commands.MERGE_SAVED_LINE)  # fmt: skip
