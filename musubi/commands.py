"""Command lines (argument lists) for every musubi-tuner script the nodes drive.

Builders are pure: they check values and combinations, not the disk (see
:func:`require_paths`). Each returns the full argv, interpreter first, so what runs is
exactly what the tests compare against musubi's documented command lines and parse with
musubi's own argparse definitions.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .arch import ARCHS, FRAMES_OUTPUT_TYPE, TRAINABLE, ArchSpec, get_arch
from .configs import MemoryConfig, OptimizerConfig, SamplingConfig, TrainingConfig, _num, check_finite
from .env import Launch, MusubiEnv, check_output_name, native_path

WAN22_TASKS = ("t2v-A14B", "i2v-A14B")
WAN_I2V_TASKS = ("i2v-14B", "flf2v-14B", "i2v-14B-FC", "i2v-A14B")
GEN_ATTENTION = ("torch", "sdpa", "flash", "sageattn", "xformers")


def extra_args(text: str, name: str = "extra_args") -> list[str]:
    """Expert escape hatch: more flags for the script, split like a shell would (never run by one)."""
    if not text.strip():
        return []
    if "\0" in text:
        raise ValueError(f"{name}: {text!r} contains a NUL character, which no command line can carry: remove it")
    try:
        items = shlex.split(text, posix=os.name != "nt")
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}; quote values with spaces") from exc
    if not items[0].startswith("--"):
        raise ValueError(f"{name} must start with a --flag, got {items[0]!r}")
    return items


def require_paths(paths: Mapping[str, str], optional: Sequence[str] = ()) -> dict[str, str]:
    """Normalise each path; raise for a required one that is empty or missing on disk."""
    out = {}
    for name, raw in paths.items():
        p = native_path(raw or "")
        if not p:
            if name in optional:
                out[name] = ""
                continue
            raise ValueError(f"{name} is empty: give the path of the model file or folder")
        if not os.path.exists(p):
            raise ValueError(f"{name} {p!r} does not exist: check the path (absolute paths are safest)")
        if os.path.isfile(p) and os.path.getsize(p) == 0:
            raise ValueError(
                f"{name}: {p!r} is empty (0 bytes), so not a model: an interrupted download or copy leaves such "
                "files; download or copy it again"
            )
        out[name] = p
    return out


def check_device(device: str, name: str = "device") -> str:
    """A torch device string (``cuda``, ``cuda:1``, ``cpu``); '' means the script's default."""
    if device and not re.fullmatch(r"[a-z]+(:\d+)?", device):
        raise ValueError(f"{name}: {device!r} is not a device: write e.g. cuda, cuda:1 or cpu, or leave it empty")
    return device


def _flag(argv: list[str], flag: str, value, skip=("", None, 0)) -> None:
    """Append ``flag`` (+ value): True = a switch; '', None, 0 and False, or no flag, = nothing."""
    if value in skip or value is False or not flag:
        return
    if value is True:
        argv.append(flag)
    else:
        argv += [flag, _num(value) if isinstance(value, float) else str(value)]


# --- caching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheOptions:
    """Options shared by both cache scripts (``cache_latents.py`` / ``cache_text_encoder_outputs.py``)."""

    batch_size: int = 0
    num_workers: int = 0
    skip_existing: bool = True
    keep_cache: bool = False
    device: str = ""
    extra: str = ""

    def args(self) -> list[str]:
        a: list[str] = []
        check_device(self.device)
        _flag(a, "--batch_size", self.batch_size)
        _flag(a, "--num_workers", self.num_workers)
        _flag(a, "--skip_existing", self.skip_existing)
        _flag(a, "--keep_cache", self.keep_cache)
        _flag(a, "--device", self.device)
        return a + extra_args(self.extra)


def cache_latents_argv(
    env: MusubiEnv,
    arch: str,
    dataset_config: str,
    vae: str,
    *,
    extra_model: str = "",
    i2v: bool = False,
    one_frame: bool = False,
    f1: bool = False,
    vae_tiling: bool = False,
    vae_chunk_size: int = 0,
    vae_spatial_tile_sample_min_size: int = 0,
    vae_cache_cpu: bool = False,
    vae_dtype: str = "",
    model_version: str = "",
    options: CacheOptions = CacheOptions(),
) -> list[str]:
    """``<arch>_cache_latents.py`` (HunyuanVideo: ``cache_latents.py``)."""
    spec = get_arch(arch)
    argv = env.python_cmd(spec.cache_latents) + ["--dataset_config", str(dataset_config)]
    if spec.latent_vae_required:
        if not vae:
            raise ValueError(f"vae is empty: {spec.label} latent caching needs the VAE path")
        argv += ["--vae", str(vae)]
    elif vae:
        raise ValueError(f"{spec.label} caches pixels, not latents ({spec.cache_latents}.py): clear the vae input")
    _flag(argv, "--vae_dtype", vae_dtype)
    if spec.latent_extra_model:
        if spec.latent_extra_required and not extra_model:
            raise ValueError(
                f"{spec.label} latent caching needs {spec.latent_extra_model} (image_encoder input): give the SigLIP "
                "image encoder path"
            )
        _flag(argv, spec.latent_extra_model, extra_model)
    elif extra_model:
        raise ValueError(f"{spec.label} latent caching takes no image encoder / CLIP model: clear that input")
    if i2v:
        if not spec.has_i2v_cache:
            raise ValueError(f"i2v caching is for Wan and HunyuanVideo 1.5 only, not {spec.label}: switch i2v off")
        argv.append("--i2v")
    if one_frame and "--one_frame" not in spec.latent_switches:
        raise ValueError(f"one_frame is a Wan / FramePack option, not {spec.label}: switch it off")
    # switches the script lacks (f1, vae_cache_cpu) are dropped, never passed to a parser that refuses them
    for flag, on in (("--one_frame", one_frame), ("--f1", f1)):
        if flag in spec.latent_switches:
            _flag(argv, flag, on)
    vae_opts = {
        "--vae_tiling": vae_tiling,
        "--vae_chunk_size": vae_chunk_size,
        "--vae_spatial_tile_sample_min_size": vae_spatial_tile_sample_min_size,
    }
    for flag, value in vae_opts.items():
        if flag in spec.vae_options:
            _flag(argv, flag, value)
    if "--vae_cache_cpu" in spec.latent_switches:
        _flag(argv, "--vae_cache_cpu", vae_cache_cpu)
    return argv + version_args(spec, model_version, latents=True) + options.args()


def version_args(spec: ArchSpec, model_version: str, latents: bool = False) -> list[str]:
    """The cache scripts' model version flag (Qwen-Image / FLUX.2 ``--model_version``, HiDream-O1
    ``--model_type``) for the ``model_version`` input; '' = the script's default."""
    flag = spec.version_flag or ("--model_version" if spec.has_model_version else "")
    value = model_version.strip()
    if not value:
        return []
    if not flag or (latents and not spec.latent_version):
        script = spec.cache_latents if latents else spec.cache_text_encoder
        raise ValueError(f"model_version={model_version!r}: {script}.py takes no model version: clear it")
    if spec.version_choices and value not in spec.version_choices:
        raise ValueError(
            f"model_version={model_version!r} must be one of {', '.join(spec.version_choices)} for {spec.label}"
        )
    return [flag, value]


def cache_text_encoder_argv(
    env: MusubiEnv,
    arch: str,
    dataset_config: str,
    text_encoders: Sequence[str],
    *,
    fp8: bool = False,
    text_encoder_dtype: str = "",
    model_version: str = "",
    options: CacheOptions = CacheOptions(),
) -> list[str]:
    """``<arch>_cache_text_encoder_outputs.py``; ``text_encoders`` in the script's flag order."""
    spec = get_arch(arch)
    given = [t for t in text_encoders if t]
    if len(given) < spec.te_required:
        names = " and ".join(f.lstrip("-") for f in spec.te_flags[: spec.te_required])
        raise ValueError(f"{spec.label} text encoder caching needs {names}: fill text_encoder1/text_encoder2")
    argv = env.python_cmd(spec.cache_text_encoder) + ["--dataset_config", str(dataset_config)]
    for flag, path in zip(spec.te_flags, text_encoders, strict=False):
        _flag(argv, flag, path)
    if len([t for t in text_encoders[len(spec.te_flags) :] if t]):
        raise ValueError(f"{spec.label} uses {len(spec.te_flags)} text encoder(s): clear text_encoder2")
    if fp8 and not spec.te_fp8_flag:
        raise ValueError(f"fp8: {spec.label} text encoder caching has no fp8 option: switch fp8 off")
    if fp8 and spec.key == "hidream_o1" and not text_encoders[0]:
        raise ValueError("fp8: HiDream-O1 caches fp8 text embeddings from the DiT: give its path as text_encoder1")
    _flag(argv, spec.te_fp8_flag, fp8)
    if spec.te_dtype_flag:
        _flag(argv, spec.te_dtype_flag, text_encoder_dtype)
    return argv + version_args(spec, model_version) + options.args()


# --- training --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainModels:
    """Model files of a training run; which are used depends on the architecture."""

    dit: str
    vae: str = ""
    text_encoder1: str = ""
    text_encoder2: str = ""
    image_encoder: str = ""  # FramePack SigLIP, or Wan2.1 CLIP for I2V sampling
    dit_high_noise: str = ""  # Wan2.2 A14B


@dataclass(frozen=True)
class TrainJob:
    """Everything one ``*_train_network.py`` run needs."""

    arch: str
    models: TrainModels
    dataset_config: str
    output_dir: str
    output_name: str
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sampling: SamplingConfig | None = None
    memory: MemoryConfig | None = None
    task: str = ""  # Wan
    timestep_boundary: int = 0  # Wan2.2: 0 = musubi's default (875 t2v / 900 i2v)
    offload_inactive_dit: bool = False  # Wan2.2
    f1: bool = False  # FramePack-F1
    one_frame: bool = False  # Wan / FramePack one-frame training
    latent_window_size: int = 0  # FramePack, 0 = default 9
    gpu_ids: str = ""
    extra: str = ""
    resume: str = ""  # a state folder (<name>-state, saved with save_state) to continue from
    launch: Launch | None = None  # GPUs / machines; None = one process (on gpu_ids)
    flags: tuple[tuple[str, object], ...] = ()  # table-driven architectures: (flag, value) of their inputs
    trainer: str = ""  # "" = the LoRA trainer, else a Trainer.function of the architecture (e.g. FineTune)

    @property
    def final_path(self) -> Path:
        return Path(self.output_dir) / f"{check_output_name(self.output_name)}.safetensors"

    @property
    def prompt_file(self) -> Path:
        return Path(self.output_dir) / f"{check_output_name(self.output_name)}_sample_prompts.txt"

    @property
    def log_path(self) -> Path:
        return Path(self.output_dir) / f"{check_output_name(self.output_name)}_train.log"


def train_argv(env: MusubiEnv, job: TrainJob, prompt_file: Path | None = None) -> list[str]:
    """The full ``accelerate launch ... <arch>_train_network.py ...`` command."""
    if job.arch not in TRAINABLE:
        raise ValueError(f"LoRA training nodes exist for {', '.join(TRAINABLE)}; {job.arch!r} is not one of them")
    spec = ARCHS[job.arch]
    name = check_output_name(job.output_name)
    if not job.output_dir.strip():
        raise ValueError("output_dir is empty: give the folder for the LoRA files")
    training = job.memory.apply(job.training) if job.memory else job.training
    m = job.models
    if not m.dit:
        raise ValueError("dit is empty: give the path of the base DiT checkpoint")
    argv = env.accelerate_cmd(spec.train, training.mixed_precision, job.gpu_ids, job.launch)
    if job.arch == "wan":
        task = job.task or "t2v-14B"
        if task not in spec.tasks:
            raise ValueError(f"task={task!r} must be one of {', '.join(spec.tasks)}")
        argv += ["--task", task]
    argv += ["--dit", m.dit]
    mem = job.memory or MemoryConfig()
    if job.arch == "hunyuan_video":
        _flag(argv, "--vae", m.vae)
        _flag(argv, "--text_encoder1", m.text_encoder1)
        _flag(argv, "--text_encoder2", m.text_encoder2)
        _flag(argv, "--fp8_llm", mem.fp8_text_encoder)
        if training.fp8_scaled:
            raise ValueError("fp8_scaled is not available for HunyuanVideo training: use fp8_base only")
    elif job.arch == "wan":
        _flag(argv, "--vae", m.vae)
        _flag(argv, "--t5", m.text_encoder1)
        _flag(argv, "--clip", m.image_encoder)
        _flag(argv, "--fp8_t5", mem.fp8_text_encoder)
        _flag(argv, "--vae_cache_cpu", mem.vae_cache_cpu)
        if m.dit_high_noise or job.timestep_boundary or job.offload_inactive_dit:
            if argv[argv.index("--task") + 1] not in WAN22_TASKS:
                raise ValueError(
                    "dit_high_noise / timestep_boundary / offload_inactive_dit are Wan2.2 options: "
                    "use task t2v-A14B or i2v-A14B, or clear them"
                )
        _flag(argv, "--dit_high_noise", m.dit_high_noise)
        _flag(argv, "--timestep_boundary", job.timestep_boundary)
        _flag(argv, "--offload_inactive_dit", job.offload_inactive_dit)
        _flag(argv, "--one_frame", job.one_frame)
        if m.text_encoder2:
            raise ValueError("Wan uses one text encoder (T5): clear text_encoder2")
    else:  # framepack
        missing = [n for n in ("vae", "text_encoder1", "text_encoder2", "image_encoder") if not getattr(m, n)]
        if missing:
            raise ValueError(f"FramePack training needs {', '.join(missing)}: fill those inputs")
        argv += ["--vae", m.vae, "--text_encoder1", m.text_encoder1, "--text_encoder2", m.text_encoder2]
        argv += ["--image_encoder", m.image_encoder]
        _flag(argv, "--fp8_llm", mem.fp8_text_encoder)
        _flag(argv, "--f1", job.f1)
        _flag(argv, "--one_frame", job.one_frame)
        _flag(argv, "--latent_window_size", job.latent_window_size)
    if job.arch in ("hunyuan_video", "framepack"):
        _flag(argv, "--vae_tiling", mem.vae_tiling)
        _flag(argv, "--vae_chunk_size", mem.vae_chunk_size)
        _flag(argv, "--vae_spatial_tile_sample_min_size", mem.vae_spatial_tile_sample_min_size)
    argv += ["--dataset_config", str(job.dataset_config)]
    argv += training.args(spec.network_module)
    if training.fp8_scaled and job.arch != "hunyuan_video":
        argv.append("--fp8_scaled")
    argv += mem.extra_args(training.blocks_to_swap)
    argv += job.optimizer.args()
    if job.sampling is not None and prompt_file is not None:
        need = {"hunyuan_video": ("vae", "text_encoder1", "text_encoder2"), "wan": ("vae", "text_encoder1")}.get(
            job.arch, ()
        )
        missing = [n for n in need if not getattr(m, n)]
        if missing:
            raise ValueError(f"sampling during training needs {', '.join(missing)}: fill them or unplug sampling")
        argv += job.sampling.args(prompt_file)
    return argv + output_args(job, training, name)


def output_args(job: TrainJob, training: TrainingConfig, name: str) -> list[str]:
    """Logging, resume, output folder and name, then the expert flags: the end of every training command."""
    argv = []
    if training.log_tensorboard:
        argv += ["--logging_dir", str(Path(job.output_dir) / "logs"), "--log_with", "tensorboard"]
        argv += ["--log_prefix", f"{name}_"]
    if job.resume.strip():
        argv += ["--resume", job.resume.strip()]
    argv += ["--output_dir", str(job.output_dir), "--output_name", name]
    return argv + extra_args(job.extra)


# --- generation ------------------------------------------------------------------------


WAN_LORA_TARGETS = ("dit", "dit_high_noise", "both")
"""Which Wan DiT a LoRA is applied to. ``dit`` is Wan2.1's only DiT and Wan2.2's low-noise one;
``both`` suits a LoRA trained on both Wan2.2 DiTs in one run (``--dit_high_noise`` in training)."""


def split_wan_loras(
    loras: Sequence[tuple[str, str, float, str]],
) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]:
    """(input name, path, multiplier, target) items -> (LoRAs for ``dit``, LoRAs for ``dit_high_noise``)."""
    low, high = [], []
    for name, path, multiplier, target in loras:
        if target not in WAN_LORA_TARGETS:
            raise ValueError(f"{name}_target={target!r} must be one of {', '.join(WAN_LORA_TARGETS)}")
        if target in ("dit", "both"):
            low.append((path, multiplier))
        if target in ("dit_high_noise", "both"):
            high.append((path, multiplier))
    return tuple(low), tuple(high)


@dataclass(frozen=True)
class GenerateJob:
    """One video generation with ``<arch>_generate_video.py``."""

    arch: str
    prompt: str
    save_path: str
    dit: str
    vae: str
    text_encoder1: str = ""
    text_encoder2: str = ""
    image_encoder: str = ""  # FramePack SigLIP / Wan2.1 CLIP
    dit_high_noise: str = ""
    task: str = "t2v-14B"
    negative_prompt: str = ""
    width: int = 832
    height: int = 480
    frames: int = 81  # HV/Wan: video_length; FramePack: seconds = frames / fps
    fps: int = 0
    steps: int = 0
    seed: int = -1
    guidance_scale: float = 0.0
    flow_shift: float = 0.0
    image_path: str = ""  # I2V start image
    end_image_path: str = ""
    video_path: str = ""  # V2V (HunyuanVideo, Wan)
    strength: float = 0.8  # V2V strength (HunyuanVideo)
    control_path: str = ""  # Wan Fun-Control control video
    loras: tuple[tuple[str, float], ...] = ()  # (path, multiplier); Wan2.2: applied to the low-noise `dit`
    loras_high_noise: tuple[tuple[str, float], ...] = ()  # Wan2.2: applied to `dit_high_noise`
    lycoris: bool = False  # apply the LoRAs with the LyCORIS library (see lora_file.generate_lycoris)
    attn_mode: str = "sdpa"
    fp8: bool = False
    fp8_scaled: bool = False
    fp8_text_encoder: bool = False
    blocks_to_swap: int = 0
    vae_chunk_size: int = 0
    vae_spatial_tile_sample_min_size: int = 0
    output_type: str = FRAMES_OUTPUT_TYPE  # the one type every generate script writes PNG frames for
    extra: str = ""


def generate_argv(env: MusubiEnv, job: GenerateJob) -> list[str]:
    """``hv_generate_video.py`` / ``wan_generate_video.py`` / ``fpack_generate_video.py`` command."""
    if job.arch not in TRAINABLE:
        raise ValueError(f"video generation nodes exist for {', '.join(TRAINABLE)}, not {job.arch!r}")
    spec = ARCHS[job.arch]
    if not job.prompt.strip():
        raise ValueError("prompt is empty: describe the video to generate")
    check_finite(
        {"guidance_scale": job.guidance_scale, "flow_shift": job.flow_shift, "strength": job.strength},
        {"guidance_scale": "0 (musubi's default) or 5.0", "flow_shift": "0 (musubi's default) or 3.0", "strength": 0.8},
    )
    _check_multipliers(job.loras + job.loras_high_noise)
    if job.width % 16 or job.height % 16 or job.width <= 0 or job.height <= 0:
        raise ValueError(f"width x height {job.width}x{job.height} must be positive multiples of 16")
    if job.attn_mode not in GEN_ATTENTION:
        raise ValueError(f"attn_mode={job.attn_mode!r} must be one of {GEN_ATTENTION}")
    if job.output_type not in spec.output_types:
        raise ValueError(f"output_type={job.output_type!r} must be one of {', '.join(spec.output_types)}")
    argv = env.python_cmd(spec.generate) + ["--dit", job.dit, "--vae", job.vae]
    if job.arch == "wan":
        if job.task not in spec.tasks:
            raise ValueError(f"task={job.task!r} must be one of {', '.join(spec.tasks)}")
        argv[2:2] = ["--task", job.task]
        _flag(argv, "--t5", job.text_encoder1)
        _flag(argv, "--clip", job.image_encoder)
        if job.dit_high_noise and job.task not in WAN22_TASKS:
            raise ValueError("dit_high_noise is for Wan2.2 (task t2v-A14B / i2v-A14B): clear it or change task")
        _flag(argv, "--dit_high_noise", job.dit_high_noise)
        if job.task in WAN_I2V_TASKS and not job.image_path:
            raise ValueError(f"task {job.task} is image-to-video: connect a start image")
        _flag(argv, "--fp8_t5", job.fp8_text_encoder)
    else:
        missing = [n for n in ("text_encoder1", "text_encoder2") if not getattr(job, n)]
        if job.arch == "framepack" and not job.image_encoder:
            missing.append("image_encoder")
        if missing:
            raise ValueError(f"{spec.label} generation needs {', '.join(missing)}: fill those inputs")
        argv += ["--text_encoder1", job.text_encoder1, "--text_encoder2", job.text_encoder2]
        if job.arch == "framepack":
            argv += ["--image_encoder", job.image_encoder]
        _flag(argv, "--fp8_llm", job.fp8_text_encoder)
    argv += ["--prompt", job.prompt]
    _flag(argv, "--negative_prompt", job.negative_prompt)
    argv += ["--video_size", str(job.height), str(job.width)]
    fps = job.fps or spec.fps
    if job.arch == "framepack":
        argv += ["--video_seconds", _num(round(job.frames / fps, 3))]
    else:
        if job.frames < 1 or (job.frames - 1) % 4:
            raise ValueError(f"frames={job.frames} must be 4*N+1 (e.g. 1, 25, 49, 81) for {spec.label}")
        argv += ["--video_length", str(job.frames)]
    argv += ["--fps", str(fps)]
    _flag(argv, "--infer_steps", job.steps)
    if job.seed >= 0:
        argv += ["--seed", str(job.seed)]
    _flag(argv, "--guidance_scale", float(job.guidance_scale) if job.guidance_scale else 0)
    _flag(argv, "--flow_shift", float(job.flow_shift) if job.flow_shift else 0)
    _flag(argv, "--image_path", job.image_path)
    if job.end_image_path:
        if job.arch == "hunyuan_video":
            raise ValueError("end_image is not supported by HunyuanVideo generation: unplug it")
        argv += ["--end_image_path", job.end_image_path]
    if job.video_path:
        if job.arch == "framepack":
            raise ValueError("video-to-video is for HunyuanVideo and Wan; FramePack takes no input video")
        argv += ["--video_path", job.video_path]
        if job.arch == "hunyuan_video":
            argv += ["--strength", _num(job.strength)]
    if job.control_path:
        if job.arch != "wan" or not job.task.endswith("-FC"):
            raise ValueError("control_video is for Wan Fun-Control tasks (*-FC): change task or unplug it")
        argv += ["--control_path", job.control_path]
    if job.loras:
        argv += ["--lora_weight", *[p for p, _ in job.loras]]
        argv += ["--lora_multiplier", *[_num(m) for _, m in job.loras]]
    if job.loras_high_noise:
        # wan_generate_video.py loads --lora_weight into --dit only and these into --dit_high_noise only
        if job.arch != "wan" or not job.dit_high_noise:
            raise ValueError(
                "a LoRA targets dit_high_noise, but dit_high_noise is empty (it is a Wan2.2 A14B input): give the "
                "high-noise DiT or set that LoRA's target to dit"
            )
        argv += ["--lora_weight_high_noise", *[p for p, _ in job.loras_high_noise]]
        argv += ["--lora_multiplier_high_noise", *[_num(m) for _, m in job.loras_high_noise]]
    if job.lycoris:
        if not (job.loras or job.loras_high_noise):
            raise ValueError("lycoris applies LoRA files: connect one or switch it off")
        argv.append("--lycoris")
    argv += ["--attn_mode", job.attn_mode]
    _flag(argv, "--fp8", job.fp8)
    if job.fp8_scaled:
        if job.arch == "hunyuan_video":
            raise ValueError("fp8_scaled is not available for HunyuanVideo generation: use fp8")
        argv.append("--fp8_scaled")
    _flag(argv, "--blocks_to_swap", job.blocks_to_swap)
    _flag(argv, "--vae_chunk_size", job.vae_chunk_size if job.arch != "wan" else 0)
    _flag(argv, "--vae_spatial_tile_sample_min_size", job.vae_spatial_tile_sample_min_size if job.arch != "wan" else 0)
    argv += ["--save_path", str(job.save_path), "--output_type", job.output_type]
    return argv + extra_args(job.extra)


# --- utilities -------------------------------------------------------------------------


def convert_lora_argv(env: MusubiEnv, src: str, dst: str, target: str, diffusers_prefix: str = "") -> list[str]:
    """``convert_lora.py``: ``target`` "other" (diffusers/ComfyUI style) or "default" (musubi)."""
    if target not in ("other", "default"):
        raise ValueError(f"target={target!r} must be 'other' (for ComfyUI and others) or 'default' (musubi)")
    argv = env.python_cmd("convert_lora") + ["--input", str(src), "--output", str(dst), "--target", target]
    _flag(argv, "--diffusers_prefix", diffusers_prefix)
    return argv


def _check_multipliers(loras: Sequence[tuple[str, float]]) -> None:
    """A NaN multiplier would merge or apply a NaN LoRA: name the strength input it came from."""
    for i, (path, multiplier) in enumerate(loras, 1):
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not math.isfinite(multiplier):
            raise ValueError(
                f"strength of LoRA {i} ({Path(path).name}): {multiplier!r} is not a finite number; set it to a "
                "number such as 1.0"
            )


def merge_lora_argv(
    env: MusubiEnv, dit: str, loras: Sequence[tuple[str, float]], output: str, device: str = "cpu"
) -> list[str]:
    """``merge_lora.py`` (musubi's merge script loads a HunyuanVideo DiT)."""
    if not loras:
        raise ValueError("connect at least one LoRA (lora_1) to merge")
    _check_multipliers(loras)
    argv = env.python_cmd("merge_lora") + ["--dit", str(dit)]
    argv += ["--lora_weight", *[str(p) for p, _ in loras], "--lora_multiplier", *[_num(m) for _, m in loras]]
    argv += ["--save_merged_model", str(output)]
    _flag(argv, "--device", device)
    return argv


MERGE_MODELS = ("vae", "text_encoder1", "text_encoder2", "image_encoder")
"""MergeJob fields for the models a generate script loads before it merges (node input names)."""


@dataclass(frozen=True)
class MergeSpec:
    """How one architecture's script merges LoRAs into its DiT and saves it (musubi v0.3.x).

    Apart from HunyuanVideo (``merge_lora.py``) the merge is the generate script's
    ``--save_merged_model`` mode, read from its ``main()``: it still loads and runs the text
    encoders (and some the VAE / image encoder) before the DiT, so those paths are required.
    """

    script: str
    flags: Mapping[str, str]  # MergeJob model field -> the script's flag, for models it loads first
    lycoris: bool = False  # only the script's --lycoris path writes the file (kohya-ss/musubi-tuner PR #594)
    prompt_file: bool = False  # batch mode (--from_file): needs no input image, exits cleanly after saving
    exits_nonzero_after_save: bool = False  # main() goes on into generation with no model and crashes
    fixed: tuple[str, ...] = ()  # flags main() needs before the merge, with harmless values


MERGE_SAVED_LINE = "Merged model saved"
"""musubi's log line once the merged file is fully written (``merge_lora_weights``)."""

MERGE_SPECS: dict[str, MergeSpec] = {
    "hunyuan_video": MergeSpec("merge_lora", {}),
    # T5 always; VAE (+ CLIP for Wan2.1) for i2v tasks and VAE for Fun-Control: see merge_models()
    "wan": MergeSpec("wan_generate_video", {"text_encoder1": "--t5", "vae": "--vae", "image_encoder": "--clip"},
                     lycoris=True, prompt_file=True),
    "framepack": MergeSpec(
        "fpack_generate_video",
        {"vae": "--vae", "text_encoder1": "--text_encoder1", "text_encoder2": "--text_encoder2",
         "image_encoder": "--image_encoder"},
        lycoris=True,
    ),
    "flux_kontext": MergeSpec(
        "flux_kontext_generate_image", {"vae": "--vae", "text_encoder1": "--text_encoder1",
                                        "text_encoder2": "--text_encoder2"}, prompt_file=True,
    ),
    "qwen_image": MergeSpec("qwen_image_generate_image", {"vae": "--vae", "text_encoder1": "--text_encoder"},
                            lycoris=True, exits_nonzero_after_save=True),
    "zimage": MergeSpec("zimage_generate_image", {"text_encoder1": "--text_encoder"}, lycoris=True,
                        exits_nonzero_after_save=True),
    # the DiT is built as t2v (no --image_path): i2v checkpoints have the same parameters
    "hunyuan_video_1_5": MergeSpec("hv_1_5_generate_video", {"text_encoder1": "--text_encoder", "text_encoder2": "--byt5"},
                                   lycoris=True, fixed=("--video_length", "1")),
    # the same batch-mode merge as FLUX.1 Kontext (flux_2_generate_image.py main: "Merged DiT model saved")
    "flux_2": MergeSpec("flux_2_generate_image", {"vae": "--vae", "text_encoder1": "--text_encoder"}, prompt_file=True),
}  # fmt: skip
"""Architectures whose LoRAs the Merge LoRA node can merge, and how."""


@dataclass(frozen=True)
class MergeJob:
    """Merge ``loras`` (path, multiplier) into ``dit`` and save the result as ``output``."""

    arch: str
    dit: str
    loras: tuple[tuple[str, float], ...]
    output: str
    device: str = "cpu"
    task: str = ""  # Wan: the DiT's task; Wan2.2 A14B: one run per DiT (low- and high-noise)
    vae: str = ""
    text_encoder1: str = ""
    text_encoder2: str = ""
    image_encoder: str = ""
    include_pattern: str = ""  # regex; kept LoRA modules must match (applied to every LoRA)
    exclude_pattern: str = ""  # regex; LoRA modules matching it are dropped (every LoRA)
    prompt_file: str = ""  # one-line prompt file for scripts run in batch mode (see MergeSpec.prompt_file)
    lycoris: bool = False  # --lycoris also where the script saves without it (LoHa/LoKr: lora_file.merge_lycoris)
    model_version: str = ""  # FLUX.2: which model the DiT is ('' = dev)


def merge_spec(arch: str) -> MergeSpec:
    """The merge recipe of ``arch`` or a ValueError that names the ``architecture`` input."""
    try:
        return MERGE_SPECS[arch]
    except KeyError:
        raise ValueError(
            f"architecture={arch!r} has no LoRA merge in musubi-tuner: choose one of {', '.join(MERGE_SPECS)}"
        ) from None


def merge_models(job: MergeJob) -> tuple[str, ...]:
    """MergeJob model fields the script loads (and so requires) before merging, for ``job``'s arch/task."""
    spec = merge_spec(job.arch)
    if job.arch != "wan":
        return tuple(spec.flags)
    # wan_generate_video.py batch mode: T5 always; "i2v" tasks load the VAE and (Wan2.1) CLIP;
    # Fun-Control t2v tasks load the VAE.
    task = job.task or "t2v-14B"
    need = ["text_encoder1"]
    if "i2v" in task or task.endswith("-FC"):
        need.append("vae")
    if "i2v" in task and task not in WAN22_TASKS:
        need.append("image_encoder")
    return tuple(need)


def _check_pattern(value: str, name: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{name}={value!r} is not a valid regular expression: {exc}") from exc


def merge_argv(env: MusubiEnv, job: MergeJob) -> list[str]:
    """The command that merges ``job.loras`` into ``job.dit`` for ``job.arch`` and saves it.

    HunyuanVideo runs ``merge_lora.py``; the others their generate script with
    ``--save_merged_model`` (see :class:`MergeSpec` for what each one needs).
    """
    spec = merge_spec(job.arch)
    if not job.loras:
        raise ValueError("connect at least one LoRA (lora_1) to merge")
    _check_multipliers(job.loras)
    if not job.dit:
        raise ValueError("dit is empty: give the path of the base DiT checkpoint")
    if not job.output:
        raise ValueError("output_path is empty: give the .safetensors path for the merged DiT")
    for name in ("include_pattern", "exclude_pattern"):
        if getattr(job, name):
            _check_pattern(getattr(job, name), name)
    if job.arch == "hunyuan_video":
        if job.include_pattern or job.exclude_pattern:
            raise ValueError(
                "include_pattern / exclude_pattern are not supported by merge_lora.py (HunyuanVideo): clear them"
            )
        if job.lycoris:
            raise ValueError("merge_lora.py (HunyuanVideo) has no LyCORIS path: it merges plain LoRA only")
        given = [n for n in MERGE_MODELS if getattr(job, n)]
        if given or job.task:
            raise ValueError(
                f"HunyuanVideo merging (merge_lora.py) loads only the DiT: clear {', '.join(given or ['task'])}"
            )
        return merge_lora_argv(env, job.dit, job.loras, job.output, job.device)
    label = ARCHS[job.arch].label
    if job.task and job.arch != "wan":
        raise ValueError(f"task is a Wan input; {label} has none: clear it")
    need = merge_models(job)
    missing = [n for n in need if not getattr(job, n)]
    if missing:
        raise ValueError(
            f"{label} merging runs {spec.script}.py, which loads {', '.join(missing)} before it merges: "
            "fill those inputs"
        )
    unused = [n for n in MERGE_MODELS if getattr(job, n) and n not in need]
    if unused:
        raise ValueError(f"{label} merging does not use {', '.join(unused)}: clear those inputs")
    argv = env.python_cmd(spec.script)
    if job.arch == "wan":
        task = job.task or "t2v-14B"
        if task not in ARCHS["wan"].tasks:
            raise ValueError(f"task={task!r} must be one of {', '.join(ARCHS['wan'].tasks)}")
        argv += ["--task", task]
    argv += ["--dit", str(job.dit)]
    if job.model_version:
        versions = ARCHS["flux_2"].version_choices
        if job.arch != "flux_2":
            raise ValueError(f"model_version is a FLUX.2 input; {label} has none: clear it")
        if job.model_version not in versions:
            raise ValueError(f"model_version={job.model_version!r} must be one of {', '.join(versions)}")
        argv += ["--model_version", job.model_version]
    for name in need:
        argv += [spec.flags[name], str(getattr(job, name))]
    argv += ["--lora_weight", *[str(p) for p, _ in job.loras]]
    argv += ["--lora_multiplier", *[_num(m) for _, m in job.loras]]
    # musubi applies the i-th pattern to the i-th LoRA (merge_lora_weights): repeat it for every LoRA
    if job.include_pattern:
        argv += ["--include_patterns", *[job.include_pattern] * len(job.loras)]
    if job.exclude_pattern:
        argv += ["--exclude_patterns", *[job.exclude_pattern] * len(job.loras)]
    if spec.lycoris or job.lycoris:
        argv.append("--lycoris")
    argv += ["--save_merged_model", str(job.output)]
    if spec.prompt_file:
        if not job.prompt_file:
            raise ValueError(f"{label} merging runs in batch mode: prompt_file is empty")
        argv += ["--from_file", str(job.prompt_file)]
    else:
        argv += ["--prompt", "merge"]  # required by the script's parser checks; only encoded, never sampled
    argv += list(spec.fixed)
    # --save_path is required by the parser; merge-only runs write nothing there
    argv += ["--save_path", str(Path(job.output).parent)]
    _flag(argv, "--device", job.device)
    return argv


def post_hoc_ema_argv(
    env: MusubiEnv,
    checkpoints: Sequence[str],
    output: str,
    beta: float = 0.95,
    beta2: float = 0.0,
    sigma_rel: float = 0.0,
    no_sort: bool = False,
) -> list[str]:
    """``lora_post_hoc_ema.py``: average step/epoch checkpoints into one LoRA."""
    if len(checkpoints) < 2:
        raise ValueError(
            f"checkpoints: post-hoc EMA needs at least 2 checkpoints, got {len(checkpoints)}: give one path per line "
            "(save checkpoints more often while training)"
        )
    check_finite({"beta": beta, "beta2": beta2, "sigma_rel": sigma_rel}, {"beta": 0.95, "beta2": 0, "sigma_rel": 0.2})
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta} must be in (0, 1), e.g. 0.95")
    if beta2 and not 0 < beta2 < 1:
        raise ValueError(f"beta2={beta2} must be in (0, 1) or 0 (off)")
    if sigma_rel < 0:
        raise ValueError(f"sigma_rel={sigma_rel} must be >= 0 (0 = off, e.g. 0.2)")
    argv = env.python_cmd("lora_post_hoc_ema") + [str(c) for c in checkpoints]
    argv += ["--beta", _num(beta)]
    _flag(argv, "--beta2", float(beta2) if beta2 else 0)
    _flag(argv, "--sigma_rel", float(sigma_rel) if sigma_rel else 0)
    _flag(argv, "--no_sort", no_sort)
    return argv + ["--output_file", str(output)]
