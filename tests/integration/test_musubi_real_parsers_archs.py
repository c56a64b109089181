"""Every architecture after the first three, the full fine-tuning scripts, the helper tools and the
training features (multi-GPU launch, resume, memory flags) checked by musubi-tuner's own parsers.

Like test_musubi_real_parsers.py: needs ``MUSUBI_TUNER_ROOT`` (v0.3.x layout); every command
the nodes build is parsed by the script's real argparse parser (and, for generate scripts, their
checks after parsing), the accelerate flags by accelerate's launch parser. The jobs are built the
way the nodes build them: each table row of ``musubi/arch.py`` fills its flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speedkit.musubi import arch as archs
from speedkit.musubi import table_commands, tool_commands
from speedkit.musubi.commands import CacheOptions, TrainJob, TrainModels, cache_latents_argv, cache_text_encoder_argv
from speedkit.musubi.configs import MemoryConfig, OptimizerConfig, SamplingConfig, TrainingConfig
from speedkit.musubi.env import Launch, MusubiEnv

ROOT = os.environ.get("MUSUBI_TUNER_ROOT", "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ROOT, reason="set MUSUBI_TUNER_ROOT to a kohya-ss/musubi-tuner checkout to run these"),
]
PROBE = Path(__file__).resolve().parents[1] / "fake_musubi" / "musubi_probe.py"
TABLE_ARCHS = [k for k, s in archs.ARCHS.items() if s.table_driven]
TRAINERS = [(k, t.function) for k, s in archs.ARCHS.items() for t in s.trainers]


@pytest.fixture(scope="module")
def env() -> MusubiEnv:
    return MusubiEnv(root=Path(ROOT), python=Path(os.environ.get("MUSUBI_TUNER_PYTHON", sys.executable)))


def probe(env: MusubiEnv, request: dict) -> dict:
    request = {"root": str(env.root), "stub_all": not os.environ.get("MUSUBI_TUNER_PYTHON"), **request}
    proc = subprocess.run(
        [str(env.python), str(PROBE)], input=json.dumps(request), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def flags_of(rows: tuple[archs.NodeInput, ...], filled: bool = True, **values) -> tuple[tuple[str, object], ...]:
    """(flag, value) of each table row as the node passes it: paths filled in, switches on, choices as given."""
    out = []
    for row in rows:
        if row.role != "flag":
            continue
        if row.name in values:
            value = values[row.name]
        elif row.kind == "path":
            value = f"{row.name}.safetensors" if filled else ""
        elif row.kind == "bool":
            value = filled
        elif row.kind in ("int", "float"):
            value = (row.low + row.high) / 2 if filled and row.kind == "float" else row.default
        else:
            value = row.default
        out.append((row.field, value))
    return tuple(out)


def check(env: MusubiEnv, cmds: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """Parse each command with its script's parser (and its accelerate flags); fail listing every refusal."""
    checks, launches = [], []
    for _, argv in cmds:
        i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        assert Path(argv[i]).is_file(), f"{argv[i]} is not in the checkout"
        checks.append({"script": Path(argv[i]).stem, "argv": argv[i + 1 :]})
        if argv[1:3] == ["-m", "accelerate.commands.launch"]:
            launches.append(argv[3 : i + 1])
    answer = probe(env, {"argv_checks": checks})
    bad = [f"{name}: {res.get('error')}" for (name, _), res in zip(cmds, answer["argv"], strict=True) if not res["ok"]]
    assert not bad, "musubi rejected:\n" + "\n".join(bad)
    for flags in launches:
        accelerate_parse(flags)
    return {name: res["namespace"] for (name, _), res in zip(cmds, answer["argv"], strict=True)}


def accelerate_parse(flags: list[str]):
    """accelerate's own ``accelerate launch`` parser on our launch flags (this interpreter's accelerate)."""
    launch = pytest.importorskip("accelerate.commands.launch")
    try:
        return launch.launch_command_parser().parse_args(flags)
    except SystemExit:
        pytest.fail(f"accelerate launch rejected {flags}")


def test_cache_commands_of_every_architecture(env, tmp_path):
    t = str(tmp_path / "d.toml")
    opts = CacheOptions(batch_size=2, num_workers=1, skip_existing=True, device="cuda")
    cmds = []
    for key, spec in archs.ARCHS.items():
        vae = "vae.safetensors" if spec.latent_vae_required else ""
        version = spec.version_choices[-1] if spec.version_choices else ""
        extra = "siglip.safetensors" if spec.latent_extra_required else ""
        latent_version = version if spec.latent_version else ""
        cmds.append((f"{key} latents", cache_latents_argv(env, key, t, vae, extra_model=extra,
                                                          model_version=latent_version, options=opts)))  # fmt: skip
        tes = [f"te{i}.safetensors" for i in range(1, len(spec.te_flags) + 1)]
        cmds.append((f"{key} te", cache_text_encoder_argv(env, key, t, tes, fp8=bool(spec.te_fp8_flag),
                                                           model_version=version, options=opts)))  # fmt: skip
    parsed = check(env, cmds)
    assert parsed["flux_2 latents"]["model_version"] == "klein-base-9b"
    assert parsed["hidream_o1 te"]["model_type"] == "dev" and parsed["hidream_o1 te"]["fp8_te"] is True
    assert parsed["kandinsky5 te"]["text_encoder_clip"] == "te2.safetensors"


LEGACY_MODELS = {
    "hunyuan_video": TrainModels(dit="dit", vae="vae", text_encoder1="llm", text_encoder2="clip"),
    "wan": TrainModels(dit="dit", vae="vae", text_encoder1="t5"),
    "framepack": TrainModels(dit="dit", vae="vae", text_encoder1="llm", text_encoder2="clip", image_encoder="siglip"),
}
"""The hand-built LoRA trainers take their models as TrainModels fields, not table rows."""


def train_job(arch: str, tmp: Path, trainer: str = "", full: bool = False) -> TrainJob:
    spec = archs.ARCHS[arch]
    rows = archs.ARCHS[arch].train_inputs if not trainer else table_commands.trainer_of(spec, trainer).inputs
    common = dict(dataset_config=str(tmp / "d.toml"), output_dir=str(tmp / "out"), output_name="run")
    common["models"] = LEGACY_MODELS[arch] if arch in LEGACY_MODELS and not trainer else TrainModels(dit="dit")
    if not full:
        return TrainJob(arch=arch, flags=flags_of(rows, filled=False), trainer=trainer, **common)
    training = TrainingConfig(
        max_train_epochs=0, max_train_steps=100, save_every_n_steps=10, save_state=True, log_tensorboard=True,
        gradient_accumulation_steps=2, blocks_to_swap=4, network_args="loraplus_lr_ratio=4", seed=7,
        timestep_sampling="shift" if trainer else "flux2_shift",
    )  # fmt: skip
    memory = MemoryConfig(
        blocks_to_swap=4, use_pinned_memory_for_block_swap=not trainer or arch != "hunyuan_video",
        fp8_base=not trainer or arch != "hunyuan_video", fp8_scaled=arch in ("flux_2", "krea2"),
        fp8_text_encoder=True, vae_tiling=True, vae_chunk_size=16,
        block_swap_h2d_only=not (trainer and arch == "hunyuan_video"),
        gradient_checkpointing_cpu_offload=not (trainer and arch == "hunyuan_video"),
    )  # fmt: skip
    return TrainJob(
        arch=arch, flags=flags_of(rows), trainer=trainer, training=training,
        optimizer=OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="constant_with_warmup", lr_warmup_steps=10),
        sampling=SamplingConfig(prompts="a cat", sample_every_n_steps=50, sample_at_first=True), memory=memory,
        resume=str(tmp / "run-state"), launch=Launch("0,1", num_machines=2, machine_rank=1,
                                                     main_process_ip="10.0.0.2", main_process_port=29500),
        **common,
    )  # fmt: skip


def test_training_commands_of_every_architecture_and_trainer(env, tmp_path):
    pf = tmp_path / "prompts.txt"
    cmds = []
    for arch in archs.ARCHS:
        cmds.append((f"{arch} lora", table_commands.build_train_argv(env, train_job(arch, tmp_path))))
        full = train_job(arch, tmp_path, full=True)
        cmds.append((f"{arch} lora full", table_commands.build_train_argv(env, full, pf)))
    for arch, function in TRAINERS:
        cmds.append((f"{arch} {function}", table_commands.build_train_argv(env, train_job(arch, tmp_path, function))))
        full = train_job(arch, tmp_path, function, full=True)
        cmds.append((f"{arch} {function} full", table_commands.build_train_argv(env, full, pf)))
    parsed = check(env, cmds)
    for name, ns in parsed.items():
        if "full" in name:
            assert ns["resume"] == str(tmp_path / "run-state") and ns["sample_prompts"] == str(pf), name
            assert ns["blocks_to_swap"] == 4 and ns["save_state"] is True, name
        if name.endswith(" lora full"):
            assert ns["network_module"] and ns["block_swap_h2d_only"] and ns["gradient_checkpointing_cpu_offload"], name
    assert parsed["kandinsky5 lora"]["task"] == "k5-lite-t2v-5s-sd"
    assert parsed["krea2 lora full"]["fp8_scaled"] and parsed["hidream_o1 lora full"]["fp8_scaled"]
    assert parsed["flux_2 lora full"]["fp8_text_encoder"] and parsed["qwen_image lora full"]["fp8_vl"]
    assert (
        parsed["qwen_image FineTune full"]["full_bf16"] and "network_module" not in parsed["qwen_image FineTune full"]
    )


def test_multi_gpu_launch_flags_are_accelerates(env, tmp_path):
    cmd = table_commands.build_train_argv(env, train_job("wan", tmp_path, full=True))
    launch = cmd[3 : next(i for i, a in enumerate(cmd) if a.endswith(".py")) + 1]
    assert launch[:5] == ["--multi_gpu", "--num_processes", "4", "--num_machines", "2"]
    ns = accelerate_parse(launch)
    assert ns.multi_gpu and ns.num_processes == 4 and ns.num_machines == 2 and ns.machine_rank == 1
    assert ns.gpu_ids == "0,1" and ns.main_process_ip == "10.0.0.2" and ns.main_process_port == 29500
    assert ns.training_script.endswith("wan_train_network.py")
    one = table_commands.build_train_argv(env, train_job("wan", tmp_path))
    ns = accelerate_parse(one[3 : next(i for i, a in enumerate(one) if a.endswith(".py")) + 1])
    assert not ns.multi_gpu and ns.num_processes == 1


def image_job(arch: str, tmp: Path, full: bool) -> table_commands.ImageJob:
    g = archs.ARCHS[arch].gen
    base = dict(arch=arch, prompt="a cat", run_dir=str(tmp / arch), dit="dit.safetensors")
    if not full:
        return table_commands.ImageJob(**base, flags=flags_of(g.inputs, filled=False,
                                       **{n: "x.safetensors" for n in g.required}),
                                       attention=g.attention[0][0] if g.attention else "")  # fmt: skip
    return table_commands.ImageJob(
        **base, flags=flags_of(g.inputs), negative_prompt="blurry" if g.negative_flag else "", width=512, height=320,
        frames=21 if g.video else 1, fps=16, steps=12 if g.steps_flag else 0, seed=3, guidance_scale=4.5 if g.guidance_flag else 0.0,
        flow_shift=3.0 if g.flow_shift_flag else 0.0,
        images=tuple((i.flag, (f"{i.name}_0.png",) * (2 if i.every_frame else 1)) for i in g.images),
        loras=(("a.safetensors", 1.0), ("b.safetensors", 0.5)), lycoris=g.lycoris,
        attention=g.attention[-1][0] if g.attention else "", fp8=tuple(n for n, _ in g.fp8),
        blocks_to_swap=8 if g.blocks_to_swap else 0, device="cuda",
    )  # fmt: skip


def test_generate_commands_of_every_architecture(env, tmp_path):
    cmds = []
    for arch in TABLE_ARCHS:
        cmds.append((f"{arch} gen", table_commands.image_argv(env, image_job(arch, tmp_path, False))))
        cmds.append((f"{arch} gen full", table_commands.image_argv(env, image_job(arch, tmp_path, True))))
    parsed = check(env, cmds)
    for arch in TABLE_ARCHS:
        ns = parsed[f"{arch} gen full"]
        assert ns["lora_weight"] == ["a.safetensors", "b.safetensors"] and ns["lora_multiplier"] == [1.0, 0.5], arch
        assert ns["prompt"] == "a cat" and ns["seed"] == 3, arch
    assert parsed["krea2 gen full"]["width"] == 512 and parsed["krea2 gen full"]["height"] == 320
    assert parsed["kandinsky5 gen full"]["output"].endswith("kandinsky5.mp4")
    assert parsed["kandinsky5 gen"]["output"].endswith("kandinsky5.png")
    assert parsed["hidream_o1 gen full"]["save_path"].endswith("hidream_o1.png")
    assert parsed["qwen_image gen full"]["control_image_path"] == ["control_image_0.png"] * 2
    assert parsed["flux_kontext gen full"]["image_size"] == [320, 512]
    assert parsed["hunyuan_video_1_5 gen full"]["output_type"] == "images"


def test_krea2_positional_prompt_may_start_with_a_dash(env, tmp_path):
    job = image_job("krea2", tmp_path, False)
    argv = table_commands.image_argv(env, table_commands.ImageJob(**{**job.__dict__, "prompt": "-a fox"}))
    assert check(env, [("krea2 dash", argv)])["krea2 dash"]["prompt"] == "-a fox"


def test_helper_tool_commands(env, tmp_path):
    cmds = [
        ("caption text", tool_commands.caption_argv(env, str(tmp_path), "qwen.safetensors", "text", fp8_vl=True,
                                                    max_size=768, max_new_tokens=256, prompt="Describe.")),
        ("caption jsonl", tool_commands.caption_argv(env, str(tmp_path), "qwen.safetensors", "jsonl",
                                                     str(tmp_path / "c.jsonl"))),
        ("extract", tool_commands.extract_lora_argv(env, "org.safetensors", "tuned.safetensors",
                                                     str(tmp_path / "l.safetensors"), 16, 0.98, "cuda", "bf16", True)),
    ]  # fmt: skip
    parsed = check(env, cmds)
    assert parsed["caption jsonl"]["output_format"] == "jsonl" and parsed["extract"]["dim"] == 16
