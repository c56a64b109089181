"""Command lines of the table-driven architectures (every one after HunyuanVideo, Wan, FramePack)
and of the full fine-tuning scripts.

Their node inputs name the flag they fill (``flag:<--flag>`` rows of ``musubi/arch.py``), so a
builder here only adds what every script shares: the accelerate launch, the config nodes'
flags (where the script's parser has them), the output and the prompt. The integration tests
parse every command with the script's own argparse parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .arch import ARCHS, LYCORIS_TRAIN_ARCHS, ArchSpec, GenSpec, Trainer, get_arch
from .commands import (
    TrainJob,
    _check_multipliers,
    _flag,
    check_device,
    extra_args,
    output_args,
    train_argv,
)
from .configs import MemoryConfig, TrainingConfig, _num, check_finite
from .env import MusubiEnv, check_output_name

FINETUNE_LEARNING_RATE = 1e-6
"""The learning rate a full fine-tuning node uses when no Training Config is connected (musubi's docs)."""


def trainer_of(spec: ArchSpec, function: str) -> Trainer:
    """The architecture's trainer called ``function`` (e.g. FineTune), or a ValueError."""
    for trainer in spec.trainers:
        if trainer.function == function:
            return trainer
    raise ValueError(f"{spec.label} has no {function} script in musubi-tuner")


def flag_values(argv: list[str], flags: Sequence[tuple[str, object]]) -> None:
    """Append each (flag, value) of the table rows: True = switch, 0 / '' / False = not passed."""
    for flag, value in flags:
        _flag(argv, flag, value)


def build_train_argv(env: MusubiEnv, job: TrainJob, prompt_file: Path | None = None) -> list[str]:
    """The training command of ``job``: the hand-built one of the first three LoRA trainers, else from the table."""
    spec = get_arch(job.arch)
    if not job.trainer and not spec.table_driven:
        return train_argv(env, job, prompt_file)
    return table_train_argv(env, job, prompt_file)


def table_train_argv(env: MusubiEnv, job: TrainJob, prompt_file: Path | None = None) -> list[str]:
    """``accelerate launch <script>.py`` for a table-driven LoRA trainer or a full fine-tuning script."""
    spec = get_arch(job.arch)
    trainer = trainer_of(spec, job.trainer) if job.trainer else None
    script = trainer.script if trainer else spec.train
    network = trainer is None
    what = f"{spec.label} {'LoRA training' if network else trainer.function}"
    name = check_output_name(job.output_name)
    if not job.output_dir.strip():
        raise ValueError("output_dir is empty: give the folder for the output files")
    if not job.models.dit:
        raise ValueError("dit is empty: give the path of the base DiT checkpoint")
    mem = job.memory or MemoryConfig()
    training = mem.apply(job.training) if job.memory else job.training
    argv = env.accelerate_cmd(script, training.mixed_precision, job.gpu_ids, job.launch)
    argv += ["--dit", job.models.dit]
    flag_values(argv, job.flags)
    argv += ["--dataset_config", str(job.dataset_config)]
    if network and training.network_type != "lora" and job.arch not in LYCORIS_TRAIN_ARCHS:
        raise ValueError(
            f"network_type={training.network_type!r}: musubi's LoHa / LoKr modules do not recognise {spec.label} "
            "(networks/network_arch.py): use network_type lora"
        )
    argv += training.args(spec.network_module) if network else finetune_args(training)
    argv += memory_args(spec, training, mem, trainer)
    argv += job.optimizer.args()
    if job.sampling is not None and prompt_file is not None:
        needs = trainer.sample_needs if trainer else spec.train_sample_needs
        given = {flag for flag, value in job.flags if value}
        rows = {row.name: row.field for row in (trainer.inputs if trainer else spec.train_inputs)}
        missing = [n for n in needs if rows[n] not in given]
        if missing:
            raise ValueError(f"sampling during {what} needs {', '.join(missing)}: fill them or unplug sampling_config")
        argv += job.sampling.args(prompt_file)
    argv += output_args(job, training, name)
    if trainer is not None:
        refuse_lacking(argv, trainer, what)
    return argv


def finetune_args(cfg: TrainingConfig) -> list[str]:
    """The training config's flags without the network ones (a full fine-tune has no LoRA)."""
    argv = cfg.args("networks.unused")
    start = argv.index("--network_module")
    end = argv.index("--learning_rate")
    return argv[:start] + argv[end:]


def memory_args(spec: ArchSpec, training: TrainingConfig, mem: MemoryConfig, trainer: Trainer | None) -> list[str]:
    """The Memory Optimizer's flags that this architecture's training script takes.

    fp8 for the text encoder and fp8_scaled exist only in some scripts: they are passed where the
    script has them (and, like VAE tiling, left out elsewhere, so a suggested setup works for every
    architecture). HiDream-O1 and Krea 2 load an fp8 DiT only scaled: fp8_base brings --fp8_scaled.
    """
    argv = []
    _flag(argv, spec.train_te_fp8_flag, mem.fp8_text_encoder)
    scaled = training.fp8_scaled or (training.fp8_base and spec.train_fp8_only_scaled)
    if scaled and spec.train_fp8_scaled:
        if not training.fp8_base:
            argv.append("--fp8_base")  # musubi's --fp8_scaled works on an fp8 base
        argv.append("--fp8_scaled")
    if trainer is not None:
        for flag, value in (
            ("--vae_tiling", mem.vae_tiling),
            ("--vae_chunk_size", mem.vae_chunk_size),
            ("--vae_spatial_tile_sample_min_size", mem.vae_spatial_tile_sample_min_size),
        ):
            if flag in spec.train_vae_options:
                _flag(argv, flag, value)
    if spec.max_blocks_to_swap and training.blocks_to_swap > spec.max_blocks_to_swap:
        raise ValueError(
            f"blocks_to_swap={training.blocks_to_swap}: {spec.label} swaps at most {spec.max_blocks_to_swap} blocks"
        )
    return argv + mem.extra_args(training.blocks_to_swap)


def refuse_lacking(argv: list[str], trainer: Trainer, what: str) -> None:
    """A config node set something the full fine-tuning script's parser does not define: say which input."""
    bad = [a for a in argv if a in trainer.lacks]
    if bad:
        names = ", ".join(a.lstrip("-") for a in bad)
        raise ValueError(
            f"{names}: not available for {what} ({trainer.script}.py has no such option): switch it off in the "
            "Training Config / Memory Optimizer"
        )


# --- generation ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageJob:
    """One run of a table-driven generate script (image or video); ``flags`` from its table rows."""

    arch: str
    prompt: str
    run_dir: str  # a fresh folder for this run: outputs and input images
    dit: str
    flags: tuple[tuple[str, object], ...] = ()
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    frames: int = 1
    fps: int = 0
    steps: int = 0
    seed: int = -1
    guidance_scale: float = 0.0
    flow_shift: float = 0.0
    images: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (flag, PNG paths)
    loras: tuple[tuple[str, float], ...] = ()
    lycoris: bool = False
    attention: str = ""
    fp8: tuple[str, ...] = ()  # names of the fp8 inputs switched on (fp8, fp8_scaled, fp8_text_encoder)
    blocks_to_swap: int = 0
    device: str = ""
    extra: str = ""


def gen_spec(arch: str) -> GenSpec:
    spec = get_arch(arch)
    if spec.gen is None:
        raise ValueError(f"{spec.label} is generated by its own node (hand-built command), not from the table")
    return spec.gen


def output_path(job: ImageJob) -> Path:
    """Where the script writes: the run folder, or the one file the script takes."""
    g = gen_spec(job.arch)
    run = Path(job.run_dir)
    if g.output == "file":
        return run / f"{job.arch}.png"
    if g.output == "output":
        return run / (f"{job.arch}.mp4" if job.frames > 1 else f"{job.arch}.png")
    return run


def image_argv(env: MusubiEnv, job: ImageJob) -> list[str]:
    """The generate script's command for ``job``; every value checked first."""
    spec = ARCHS[job.arch]
    g = gen_spec(job.arch)
    if not job.prompt.strip():
        raise ValueError("prompt is empty: describe what to generate")
    if not job.dit:
        raise ValueError("dit is empty: give the path of the DiT checkpoint")
    check_finite({"guidance_scale": job.guidance_scale, "flow_shift": job.flow_shift},
                 {"guidance_scale": "0 (musubi's default)", "flow_shift": "0 (musubi's default)"})  # fmt: skip
    _check_multipliers(job.loras)
    check_device(job.device)
    if job.width % 16 or job.height % 16 or job.width <= 0 or job.height <= 0:
        raise ValueError(f"width x height {job.width}x{job.height} must be positive multiples of 16")
    if g.video and g.frames_rule == "4n+1" and (job.frames < 1 or (job.frames - 1) % 4):
        raise ValueError(f"frames={job.frames} must be 4*N+1 (e.g. 1, 21, 49) for {spec.label}")
    attention = dict(g.attention)
    if attention and job.attention not in attention:
        raise ValueError(f"attn_mode={job.attention!r} must be one of {', '.join(attention)}")
    fp8 = dict(g.fp8)
    if unknown := [n for n in job.fp8 if n not in fp8]:
        raise ValueError(f"{', '.join(unknown)}: {spec.label} generation has no such option: switch it off")
    if job.lycoris and not g.lycoris:
        raise ValueError(
            f"{spec.label} generation has no LyCORIS path (--lycoris): LoHa / LoKr files cannot be applied here"
        )
    argv = env.python_cmd(g.script) + ["--dit", job.dit]
    flag_values(argv, job.flags)
    if g.prompt_flag:
        argv += [g.prompt_flag, job.prompt]
    if job.negative_prompt.strip():
        if not g.negative_flag:
            raise ValueError(f"{spec.label} takes no negative prompt: clear negative_prompt")
        argv += [g.negative_flag, job.negative_prompt]
    if g.size_flag:
        argv += [g.size_flag, str(job.height), str(job.width)]
    else:
        argv += ["--width", str(job.width), "--height", str(job.height)]
    if g.frames_flag:
        argv += [g.frames_flag, str(job.frames)]
    if g.fps_flag:
        argv += [g.fps_flag, str(job.fps or g.fps)]
    unsupported = [
        name
        for name, value, flag in (
            ("steps", job.steps, g.steps_flag),
            ("guidance_scale", job.guidance_scale, g.guidance_flag),
            ("flow_shift", job.flow_shift, g.flow_shift_flag),
        )
        if value and not flag
    ]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: {spec.label} generation has no such option: set it to 0")
    _flag(argv, g.steps_flag, job.steps)
    if job.seed >= 0:
        argv += ["--seed", str(job.seed)]
    _flag(argv, g.guidance_flag, float(job.guidance_scale) if job.guidance_scale else 0)
    _flag(argv, g.flow_shift_flag, float(job.flow_shift) if job.flow_shift else 0)
    for flag, paths in job.images:
        if paths:
            argv += [flag, *paths]
    if job.loras:
        argv += ["--lora_weight", *[p for p, _ in job.loras]]
        argv += ["--lora_multiplier", *[_num(m) for _, m in job.loras]]
    if job.lycoris:
        argv.append("--lycoris")
    argv += list(attention.get(job.attention, ()))
    for name in job.fp8:
        argv.append(fp8[name])
    if job.blocks_to_swap:
        if not g.blocks_to_swap:
            raise ValueError(f"{spec.label} generation has no block swap: set blocks_to_swap to 0")
        if spec.max_blocks_to_swap and job.blocks_to_swap > spec.max_blocks_to_swap:
            raise ValueError(
                f"blocks_to_swap={job.blocks_to_swap}: {spec.label} swaps at most {spec.max_blocks_to_swap}"
            )
        argv += ["--blocks_to_swap", str(job.blocks_to_swap)]
    _flag(argv, "--device", job.device)
    out = output_path(job)
    argv += ["--output" if g.output == "output" else "--save_path", str(out)]
    if g.output_type:
        argv += ["--output_type", "images"]
    argv += extra_args(job.extra)
    if not g.prompt_flag:
        argv += ["--", job.prompt]  # a positional prompt: after "--" so a leading "-" is not read as a flag
    return argv
