"""A battery of bad and hostile inputs against every capability, through a real ComfyUI (CPU).

Each case is an API prompt with one bad value. The answer must be of class A: the prompt fails
with a message that names the input (and, where given, says what is wrong); or, for the few
cases marked ``ok``, the input is handled correctly (e.g. a tile below the minimum is raised
with a log line). Whatever the input, the server stays alive and nothing changes on disk
outside ComfyUI's output/temp folders (a "victim" folder is the target of every path-traversal
case and must stay untouched; the models and input folders are compared before and after).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_musubi.fakeroot import FAKE_SITE, make_fake_root
from PIL import Image
from tiny_models import build_models

from comfy_server import ComfyServer, PromptError, free_port, widget_inputs

pytestmark = pytest.mark.integration
NAN, INF = float("nan"), float("inf")
CKPT, UPSCALER = "battery_sd15.safetensors", "battery_compact_x2.safetensors"


@dataclass(frozen=True)
class Case:
    id: str
    build: object  # (env) -> prompt
    expect: tuple[str, ...] = ()  # substrings of the error message (the input's name first)
    ok: bool = False  # handled correctly instead of refused


@dataclass
class Env:
    info: dict
    tmp: Path
    victim: Path
    dataset: Path
    musubi_root: Path
    files: dict


_widgets = widget_inputs


# ----------------------------------------------------------------------------------------
# Graph builders
# ----------------------------------------------------------------------------------------
def _ckpt() -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}


def _image(width: int = 64, height: int = 64, batch: int = 1) -> dict:
    return {
        "img": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": 0x4080C0},
        }
    }


def _sink(src: list) -> dict:
    return {"sink": {"class_type": "PreviewImage", "inputs": {"images": src}}}


def normalize(**values):
    def build(env: Env) -> dict:
        node = {
            "class_type": "SpeedKit_ImageRangeNormalize",
            "inputs": _widgets(env.info, "SpeedKit_ImageRangeNormalize", image=["img", 0], **values),
        }
        return {**_image(), "n": node, **_sink(["n", 0])}

    return build


def upscale(image=(64, 64, 1), **values):
    def build(env: Env) -> dict:
        loader = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALER}}
        node = {
            "class_type": "SpeedKit_UpscaleImageCUDA",
            "inputs": _widgets(
                env.info, "SpeedKit_UpscaleImageCUDA", upscale_model=["u", 0], image=["img", 0], **values
            ),
        }
        return {**_image(*image), "u": loader, "n": node, **_sink(["n", 0])}

    return build


def usdu(node: str = "SpeedKit_UltimateSDUpscale", image=(64, 64, 1), **values):
    def build(env: Env) -> dict:
        g = {**_ckpt(), **_image(*image)}
        g["p"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a"}}
        g["q"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}}
        g["u"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALER}}
        links = {
            "model": ["1", 0],
            "positive": ["p", 0],
            "negative": ["q", 0],
            "vae": ["1", 2],
            "upscaled_image" if node.endswith("NoUpscale") else "image": ["img", 0],
        }
        if node == "SpeedKit_UltimateSDUpscale":
            links["upscale_model"] = ["u", 0]
        defaults = {"steps": 1, "tile_width": 64, "tile_height": 64, "upscale_by": 2.0}
        if node.endswith("NoUpscale"):
            defaults.pop("upscale_by")
        inputs = _widgets(env.info, node, **links, **defaults)
        inputs.update(values)
        g["n"] = {"class_type": node, "inputs": inputs}
        return {**g, **_sink(["n", 0])}

    return build


def fbcache(**values):
    def build(env: Env) -> dict:
        g = _ckpt()
        g["f"] = {
            "class_type": "SpeedKit_FirstBlockCache",
            "inputs": _widgets(env.info, "SpeedKit_FirstBlockCache", model=["1", 0], **values),
        }
        g["p"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a"}}
        g["e"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        g["k"] = {
            "class_type": "KSampler",
            "inputs": {
                "model": ["f", 0],
                "positive": ["p", 0],
                "negative": ["p", 0],
                "latent_image": ["e", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        }
        g["d"] = {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["1", 2]}}
        return {**g, **_sink(["d", 0])}

    return build


def train(**values):
    def build(env: Env) -> dict:
        inputs = _widgets(
            env.info,
            "SpeedKit_TrainLoRA",
            model=["1", 0],
            clip=["1", 1],
            vae=["1", 2],
            dataset_folder=str(env.dataset),
            output_name="battery",
            steps=1,
            resolution=64,
            min_bucket=64,
            max_bucket=128,
            rank=4,
        )
        inputs.update({k: (v(env) if callable(v) else v) for k, v in values.items()})
        return {**_ckpt(), "t": {"class_type": "SpeedKit_TrainLoRA", "inputs": inputs}}

    return build


def musubi(node: str, needs_env: bool = False, sink: bool = False, **values):
    """A Musubi node with ``values`` (callables get the Env), linked to an environment
    (``needs_env``) and/or with its first output previewed (``sink``: not an output node)."""

    def build(env: Env) -> dict:
        vals = {k: (v(env) if callable(v) else v) for k, v in values.items()}
        g = {}
        if needs_env:
            env_vals = {k[4:]: vals.pop(k) for k in list(vals) if k.startswith("env_")}
            g["env"] = {
                "class_type": "MusubiTuner_Environment",
                "inputs": _widgets(
                    env.info,
                    "MusubiTuner_Environment",
                    **{
                        "musubi_root": str(env.musubi_root),
                        "python": sys.executable,
                        "extra_env": f"PYTHONPATH={FAKE_SITE}",
                        **env_vals,
                    },
                ),
            }
            vals.setdefault("musubi_env", ["env", 0])
        g["m"] = {"class_type": f"MusubiTuner_{node}", "inputs": _widgets(env.info, f"MusubiTuner_{node}", **vals)}
        return {**g, **_sink(["m", 0])} if sink else g

    return build


def video_out(**values):
    def build(env: Env) -> dict:
        g = _image(16, 16, 2)
        vals = {k: (v(env) if callable(v) else v) for k, v in values.items()}
        g["o"] = {
            "class_type": "MusubiTuner_VideoOutput",
            "inputs": _widgets(env.info, "MusubiTuner_VideoOutput", frames=["img", 0], **vals),
        }
        return g

    return build


def video_in(**values):
    def build(env: Env) -> dict:
        vals = {k: (v(env) if callable(v) else v) for k, v in values.items()}
        g = {
            "i": {
                "class_type": "MusubiTuner_VideoInput",
                "inputs": _widgets(env.info, "MusubiTuner_VideoInput", **vals),
            }
        }
        return {**g, **_sink(["i", 0])}

    return build


def f(name: str):
    """A prepared file of the battery, by key."""
    return lambda env: str(env.files[name])


# ----------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------
TRAVERSALS = {
    "dotdot": "../../victim/pwned",
    "abs": "/tmp/speedkit_battery_victim/pwned",
    "slash": "sub/dir/name",
    "backslash": "..\\..\\victim\\pwned",
    "empty": "",
    "dot": ".",
    "shell": "x; rm -rf ~ #",
    "subst": "$(touch /tmp/speedkit_battery_victim/pwned)",
    "nul": "bad\x00name",
    "reserved": "CON",
}


def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(id_, build, *expect, ok=False):
        cases.append(Case(id_, build, tuple(expect), ok))

    # Normalize Image Range
    for bad in (NAN, INF, -INF):
        add(f"normalize-low-{bad}", normalize(mode="percentile", low_percentile=bad), "low_percentile")
        add(f"normalize-high-{bad}", normalize(mode="percentile", high_percentile=bad), "high_percentile")
    add(
        "normalize-low-above-high",
        normalize(mode="percentile", low_percentile=90.0, high_percentile=10.0),
        "percentile",
    )
    add("normalize-mode", normalize(mode="auto"), "mode")
    add("normalize-low-range", normalize(low_percentile=-5.0), "low_percentile")

    # Upscale Image (SpeedKit CUDA)
    add("upscale-precision", upscale(precision="int8"), "precision")
    add("upscale-tile-negative", upscale(tile_size=-8), "tile_size")
    add("upscale-overlap-negative", upscale(overlap=-1), "overlap")
    add("upscale-batch-huge", upscale(batch_size=100000), "batch_size")
    add("upscale-compile-mode", upscale(compile_mode="turbo"), "compile_mode")
    add("upscale-opt-level", upscale(optimization_level="ludicrous"), "optimization_level")
    add("upscale-autocast", upscale(use_autocast="maybe"), "use_autocast")
    add("upscale-tile-tiny", upscale(tile_size=8), ok=True)
    add("upscale-overlap-over-tile", upscale(tile_size=32, overlap=64), ok=True)  # reduced, with a log line
    add(
        "upscale-model-missing",
        lambda env: {**upscale()(env), "u": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "nope.pth"}}},
        "model_name",
    )  # noqa: E501

    # First Block Cache
    for name in ("residual_diff_threshold", "start_percent", "end_percent"):
        for bad in (NAN, INF, -1.0):
            add(f"fbcache-{name}-{bad}", fbcache(**{name: bad}), name)
    add("fbcache-start-after-end", fbcache(start_percent=0.8, end_percent=0.2), "start_percent")
    add("fbcache-hits-negative", fbcache(max_consecutive_hits=-5), "max_consecutive_hits")
    add("fbcache-mode", fbcache(cache_mode="psychic"), "cache_mode")
    add("fbcache-hit-residual", fbcache(hit_residual="maybe"), "hit_residual")
    add("fbcache-n-first-zero", fbcache(n_first=0), "n_first")
    add("fbcache-n-last-negative", fbcache(n_last=-1), "n_last")
    add("fbcache-min-steps-negative", fbcache(min_steps=-2), "min_steps")
    for bad in (NAN, INF, 0.5, 1.0, 1000.0):
        add(f"fbcache-target-speedup-{bad}", fbcache(target_speedup=bad), "target_speedup")
    for bad in (NAN, INF, -5.0, 500.0):
        add(f"fbcache-target-psnr-{bad}", fbcache(target_psnr=bad), "target_psnr")
    add("fbcache-forecast-taylor2", fbcache(hit_residual="taylor2"), ok=True)
    add("fbcache-n-last-on-unet", fbcache(n_last=2), ok=True)  # lowered to 1 on a UNet, with a log line
    add("fbcache-targets-together", fbcache(target_speedup=2.0, target_psnr=30.0), ok=True)

    # Ultimate SD Upscale
    for name in ("upscale_by", "denoise", "cfg", "seam_fix_denoise"):
        for bad in (NAN, INF):
            add(f"usdu-{name}-{bad}", usdu(**{name: bad}), name)
    add("usdu-upscale-by-zero", usdu(upscale_by=0.0), "upscale_by")
    add("usdu-upscale-by-tiny", usdu(upscale_by=0.06), "upscale_by")
    add("usdu-denoise-above-one", usdu(denoise=1.5), "denoise")
    add("usdu-tile-larger-than-canvas", usdu(tile_width=512, tile_height=512), "tile_width")
    add("usdu-tile-zero", usdu(tile_width=0), "tile_width")
    add("usdu-padding-negative", usdu(tile_padding=-8), "tile_padding")
    add("usdu-mode", usdu(mode_type="Spiral"), "mode_type")
    add("usdu-seam-mode", usdu(seam_fix_mode="Glue"), "seam_fix_mode")
    add("usdu-band-width-zero", usdu(seam_fix_mode="Band Pass", seam_fix_width=0), "seam_fix_width")
    add("usdu-normalize", usdu(normalize="auto"), "normalize")
    add("usdu-tile-seed", usdu(tile_seed="random"), "tile_seed")
    add("usdu-batching", usdu(batching="quick"), "batching")
    add("usdu-batch-negative", usdu(batch_size=-1), "batch_size")
    add("usdu-steps-zero", usdu(steps=0), "steps")
    add("usdu-seed-negative", usdu(seed=-1), "seed")
    add("usdu-sampler", usdu(sampler_name="warp"), "sampler_name")
    add("usdu-scheduler", usdu(scheduler="lunar"), "scheduler")
    add("usdu-noupscale-nan", usdu("SpeedKit_UltimateSDUpscaleNoUpscale", denoise=NAN), "denoise")
    add("usdu-noupscale-tile", usdu("SpeedKit_UltimateSDUpscaleNoUpscale", tile_width=4096), "tile_width")
    add("usdu-custom-nan", usdu("SpeedKit_UltimateSDUpscaleCustomSample", cfg=NAN), "cfg")
    add("usdu-vae-missing", lambda env: _drop(usdu()(env), "n", "vae"), "vae")

    # Train LoRA: names and paths
    for key, value in TRAVERSALS.items():
        add(f"train-output-name-{key}", train(output_name=value), "output_name")
    for key, value in (("missing", "/nonexistent/speedkit"), ("dotdot", "../../victim"), ("file", f("text"))):
        add(f"train-dataset-{key}", train(dataset_folder=value), "dataset_folder")
    add("train-dataset-empty", train(dataset_folder=lambda env: str(env.files["empty_dir"])), "dataset_folder")
    for key in ("zero_state", "truncated_state", "pickle_state", "json_garbage_state"):
        add(f"train-resume-{key}", train(resume_from=f(key)), "resume_from")
    add("train-resume-traversal", train(resume_from="../../victim/state"), "resume_from")
    add("train-resume-missing", train(resume_from="never_trained"), "resume_from")
    # Train LoRA: numbers
    for name in ("learning_rate", "alpha", "min_snr_gamma", "noise_offset", "caption_dropout", "text_encoder_lr"):
        for bad in (NAN, INF):
            add(f"train-{name}-{bad}", train(**{name: bad}), name)
    add("train-caption-dropout-above-one", train(caption_dropout=1.5), "caption_dropout")
    add("train-lr-zero", train(learning_rate=0.0), "learning_rate")
    add("train-te-lr-zero", train(train_text_encoder=True, text_encoder_lr=0.0), "text_encoder_lr")
    add("train-rank-too-big", train(rank=400), "rank")
    add("train-resolution-odd", train(resolution=68), "resolution")
    add("train-buckets-inverted", train(min_bucket=256, max_bucket=128), "min_bucket")
    add("train-bucket-step-zero", train(bucket_step=0), "bucket_step")
    add("train-optimizer", train(optimizer="Lion9000"), "optimizer")
    add("train-scheduler", train(lr_scheduler="zigzag"), "lr_scheduler")
    add("train-precision", train(precision="fp8"), "precision")
    add("train-target", train(target="everything"), "target")
    add("train-steps-zero", train(steps=0), "steps")
    add("train-warmup-negative", train(warmup_steps=-1), "warmup_steps")
    add("train-validation-nan", train(validation_split=NAN), "validation_split")
    add(
        "train-validation-all",
        train(validation_split=0.5, dataset_folder=lambda env: str(env.files["one_image"])),
        "validation_split",
    )  # noqa: E501
    add("train-sample-every-no-prompt", train(sample_every=5), "sample_prompts")
    add("train-sample-bad-size", train(sample_prompts="a cat --w 70"), "sample_prompts", "width 70")
    add("train-sample-bad-option", train(sample_prompts="a cat --zoom 2"), "sample_prompts", "--zoom")
    add("train-sample-steps", train(sample_prompts="a cat --s 100000"), "sample_prompts", "steps")
    add("train-sample-cfg", train(sample_prompts="a cat --l inf"), "sample_prompts", "CFG")
    add("train-sample-size", train(sample_size=70), "sample_size")
    add("train-save-precision", train(save_precision="int4"), "save_precision")
    add("train-name-with-suffix", train(output_name="battery ok.safetensors"), ok=True)

    # Musubi: environment and files
    add(
        "musubi-root-missing",
        musubi("ConvertLoRA", True, env_musubi_root="/nonexistent/musubi", lora=f("lora")),
        "musubi_root",
    )  # noqa: E501
    add("musubi-root-file", musubi("ConvertLoRA", True, env_musubi_root=f("text"), lora=f("lora")), "musubi_root")
    add(
        "musubi-python-missing", musubi("ConvertLoRA", True, env_python="/nonexistent/python", lora=f("lora")), "python"
    )
    add("musubi-extra-env", musubi("ConvertLoRA", True, env_extra_env="NOT A PAIR", lora=f("lora")), "extra_env")
    for key in ("zero_lora", "truncated_lora", "pickle_lora", "text"):
        add(f"musubi-convert-{key}", musubi("ConvertLoRA", True, lora=f(key)), "lora")
    add("musubi-convert-missing", musubi("ConvertLoRA", True, lora="/nonexistent/a.safetensors"), "lora")
    for key, value in TRAVERSALS.items():
        if key != "empty":  # empty = <input>_<format>, documented
            add(
                f"musubi-convert-name-{key}",
                musubi("ConvertLoRA", True, lora=f("lora"), output_name=value),
                "output_name",
            )
    add(
        "musubi-merge-output-traversal",
        musubi("MergeLoRA", True, dit=f("lora"), lora_1=f("lora"), output_path="../../victim/m.safetensors"),
        "output_path",
    )  # noqa: E501
    add(
        "musubi-merge-dit-missing",
        musubi(
            "MergeLoRA", True, dit="/nonexistent/dit.safetensors", lora_1=f("lora"), output_path="merged/a.safetensors"
        ),
        "dit",
    )  # noqa: E501
    add(
        "musubi-merge-strength-nan",
        musubi("MergeLoRA", True, dit=f("lora"), lora_1=f("lora"), strength_1=NAN),
        "strength_1",
    )  # noqa: E501
    add("musubi-ema-empty", musubi("PostHocEMA", True, checkpoints=""), "checkpoints")
    add("musubi-ema-missing", musubi("PostHocEMA", True, checkpoints="/nonexistent/a.safetensors"), "checkpoints")
    add("musubi-ema-beta-nan", musubi("PostHocEMA", True, checkpoints=f("lora"), beta=NAN), "beta")
    add("musubi-monitor-traversal", musubi("TrainingMonitor", sink=True, log_path="../../victim/x.log"), "log_path")
    add("musubi-monitor-nan", musubi("TrainingMonitor", sink=True, log_path=f("text"), width=0), "width")
    # Musubi: video in/out
    add("video-in-missing", video_in(video_path="/nonexistent/v.mp4"), "video_path")
    add("video-in-text", video_in(video_path=f("fake_mp4")), "video_path")
    add("video-in-zero", video_in(video_path=f("zero_mp4")), "video_path")
    add("video-in-dir", video_in(video_path=lambda env: str(env.tmp)), "video_path")
    add("video-in-stride-zero", video_in(video_path=f("webp"), frame_stride=0), "frame_stride")
    for bad in (NAN, INF, 0.0, -3.0):
        add(f"video-out-fps-{bad}", video_out(fps=bad), "fps")
    add("video-out-quality-nan", video_out(quality=NAN), "quality")
    add("video-out-format", video_out(format="gif89"), "format")
    for key, value in TRAVERSALS.items():
        if key not in ("slash", "empty"):  # subfolders of output/ are allowed, empty gets the default
            add(f"video-out-prefix-{key}", video_out(filename_prefix=value), "filename_prefix")
    return cases


def _drop(prompt: dict, node: str, key: str) -> dict:
    prompt[node]["inputs"].pop(key, None)
    return prompt


CASES = _cases()


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    """A server of its own: the battery fills the log with (expected) errors, which the
    session server's log checks must not see."""
    from conftest import comfyui_root

    server = ComfyServer(root=comfyui_root(), work=tmp_path_factory.mktemp("battery_server"), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def env(comfy_server, tmp_path_factory) -> Env:
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("battery")
    ckpt_dir = comfy_server.models_dir / "checkpoints"
    up_dir = comfy_server.models_dir / "upscale_models"
    for d in (ckpt_dir, up_dir):
        d.mkdir(parents=True, exist_ok=True)
    if not (ckpt_dir / CKPT).is_file():
        build_models(comfy_server.root, ckpt_dir / CKPT, up_dir / UPSCALER)
    victim = Path("/tmp/speedkit_battery_victim")
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("untouched")
    dataset = tmp / "dataset"
    dataset.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 140)).save(dataset / f"img{i}.png")
        (dataset / f"img{i}.txt").write_text(f"a square {i}")
    one = tmp / "one_image"
    one.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(one / "a.png")
    (one / "a.txt").write_text("x")
    files: dict[str, Path] = {"empty_dir": tmp / "empty", "one_image": one}
    files["empty_dir"].mkdir()
    files["text"] = tmp / "notes.txt"
    files["text"].write_text("hello\n")
    import torch

    lora = tmp / "good_lora.safetensors"
    save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4)}, str(lora)
    )  # noqa: E501
    files["lora"] = lora
    blob = lora.read_bytes()
    state_dir = comfy_server.output_dir / "speedkit_lora_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("lora", "state"):
        files[f"zero_{kind}"] = tmp / f"zero_{kind}.safetensors"
        files[f"zero_{kind}"].write_bytes(b"")
        files[f"truncated_{kind}"] = tmp / f"truncated_{kind}.safetensors"
        files[f"truncated_{kind}"].write_bytes(blob[: len(blob) // 2])
        files[f"pickle_{kind}"] = tmp / f"pickle_{kind}.safetensors"
        files[f"pickle_{kind}"].write_bytes(
            pickle.dumps({"__reduce__": "os.system('touch /tmp/speedkit_battery_victim/pwned')"})
        )  # noqa: E501
    files["json_garbage_state"] = tmp / "garbage-state.json"
    files["json_garbage_state"].write_text("{not json")
    files["fake_mp4"] = tmp / "notes.mp4"
    files["fake_mp4"].write_text("not a video\n")
    files["zero_mp4"] = tmp / "zero.mp4"
    files["zero_mp4"].write_bytes(b"")
    from speedkit.musubi import media

    files["webp"] = tmp / "frames.webp"
    import numpy as np

    media.write_video(np.zeros((2, 16, 16, 3), np.uint8), files["webp"], fps=4, fmt="webp")
    return Env(comfy_server.object_info(), tmp, victim, dataset, make_fake_root(tmp), files)


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _message(exc: PromptError) -> str:
    """What the user sees: the node error(s) of a refused prompt, or the exception message."""
    text = str(exc)
    for event, data in exc.messages or []:
        if event == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return text


@pytest.fixture(scope="module")
def guarded(comfy_server, env):
    """Snapshot of everything outside output/temp before the battery; compared after it."""
    roots = [comfy_server.models_dir, comfy_server.input_dir, env.victim, env.dataset]
    before = _snapshot(*roots)
    yield
    after = _snapshot(*roots)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    changed = {k for k in changed if "/loras/" not in k or "battery" not in k}  # the 'ok' training case writes its LoRA
    assert not changed, f"files outside the output folders changed: {sorted(changed)[:20]}"
    assert comfy_server.alive()


def test_battery_has_at_least_150_cases():
    assert len(CASES) >= 150, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gets_a_clear_answer(comfy_server, env, guarded, case: Case):
    prompt = case.build(env)
    try:
        entry = comfy_server.run_prompt(prompt, timeout=300, fill_defaults=False)
    except PromptError as exc:
        message = _message(exc)
        assert not case.ok, f"{case.id}: refused but should be handled: {message[-1500:]}"
        low = message.lower()
        for part in case.expect:
            assert part.lower() in low, f"{case.id}: {part!r} not in the answer:\n{message[-1500:]}"
        for raw in ("Traceback (most recent call last)", "SafetensorError", "JSONDecodeError", "UnpicklingError"):
            assert raw not in message, f"{case.id}: raw library error:\n{message[-1500:]}"
    else:
        assert case.ok, f"{case.id}: accepted a bad value; outputs: {json.dumps(entry.get('outputs'))[:800]}"
    assert comfy_server.alive(), comfy_server.log_text()[-3000:]
    assert not (env.victim / "pwned").exists(), f"{case.id} wrote outside the output folders"
    assert (env.victim / "keep.txt").read_text() == "untouched"
