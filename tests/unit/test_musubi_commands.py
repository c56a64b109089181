"""Generated command lines vs the ones in musubi-tuner's docs (docs/*.md, v0.3.x).

Each documented command is compared flag by flag (order does not matter, numbers are
compared as numbers); flags we add beyond the docs are listed explicitly per test, so an
unexpected flag fails too. The integration tier parses every argv with musubi's parser.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from speedkit.musubi.commands import (
    CacheOptions,
    GenerateJob,
    TrainJob,
    TrainModels,
    cache_latents_argv,
    cache_text_encoder_argv,
    convert_lora_argv,
    extra_args,
    generate_argv,
    merge_lora_argv,
    post_hoc_ema_argv,
    split_wan_loras,
    train_argv,
)
from speedkit.musubi.configs import MemoryConfig, OptimizerConfig, SamplingConfig, TrainingConfig
from speedkit.musubi.env import MusubiEnv

ROOT = Path("/opt/musubi-tuner")
ENV = MusubiEnv(root=ROOT, python=Path("/opt/musubi-tuner/.venv/bin/python"))


@pytest.fixture(autouse=True)
def src_layout(monkeypatch):
    monkeypatch.setattr(MusubiEnv, "src_layout", property(lambda self: True))


def flags(argv: list[str]) -> dict[str, list[str]]:
    """--flag -> values (positional leftovers under '')."""
    out: dict[str, list[str]] = {}
    key = ""
    for a in argv:
        if a.startswith("--"):
            key = a
            out.setdefault(key, [])
        else:
            out.setdefault(key, []).append(a)
    return out


def same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def split_launch(argv: list[str], script: str) -> tuple[list[str], list[str]]:
    i = next(i for i, a in enumerate(argv) if a.endswith(f"{script}.py"))
    return argv[:i], argv[i + 1 :]


def assert_matches_doc(ours: list[str], doc: str, script: str, extra_flags: set[str]) -> None:
    doc_argv = shlex.split(doc.replace("\\\n", " "))
    d_launch, d_args = split_launch(doc_argv, script)
    o_launch, o_args = split_launch(ours, script)
    assert ours[[i for i, a in enumerate(ours) if a.endswith(f"{script}.py")][0]] == str(
        ROOT / "src" / "musubi_tuner" / f"{script}.py"
    )
    for part_doc, part_ours, allowed in ((d_launch, o_launch, None), (d_args, o_args, extra_flags)):
        fd, fo = flags(part_doc), flags(part_ours)
        fd.pop("", None), fo.pop("", None)
        for flag, values in fd.items():
            assert flag in fo, f"{flag} from the docs is missing"
            assert len(values) == len(fo[flag]) and all(map(same, values, fo[flag])), (flag, values, fo[flag])
        if allowed is not None:
            assert set(fo) - set(fd) == allowed, f"unexpected extra flags {set(fo) - set(fd) - allowed}"


DOC_HV_TRAIN = """accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/hv_train_network.py
    --dit path/to/ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt
    --dataset_config path/to/toml --sdpa --mixed_precision bf16 --fp8_base
    --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing
    --max_data_loader_n_workers 2 --persistent_data_loader_workers
    --network_module networks.lora --network_dim 32
    --timestep_sampling shift --discrete_flow_shift 7.0
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42
    --output_dir path/to/output_dir --output_name name-of-lora"""

# flags we always pass beyond the documented example (explicit alpha/scheduler/clipping)
OUR_TRAIN_EXTRAS = {"--network_alpha", "--lr_scheduler", "--max_grad_norm"}


def test_hunyuan_video_training_matches_docs():
    job = TrainJob(
        arch="hunyuan_video",
        models=TrainModels(dit="path/to/ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt"),
        dataset_config="path/to/toml",
        output_dir="path/to/output_dir",
        output_name="name-of-lora",
        training=TrainingConfig(fp8_base=True, discrete_flow_shift=7.0, network_dim=32, learning_rate=2e-4),
        optimizer=OptimizerConfig(optimizer_type="AdamW8bit"),
    )
    argv = train_argv(ENV, job)
    assert argv[:3] == [str(ENV.python), "-m", "accelerate.commands.launch"]
    doc = DOC_HV_TRAIN.replace("adamw8bit", "AdamW8bit")  # musubi lower-cases the name
    assert_matches_doc(argv, doc, "hv_train_network", OUR_TRAIN_EXTRAS)
    # one process, explicit: no `accelerate config` needed
    launch = flags(split_launch(argv, "hv_train_network")[0][3:])
    assert launch["--num_processes"] == ["1"] and launch["--num_machines"] == ["1"]
    assert launch["--dynamo_backend"] == ["no"]


DOC_WAN_TRAIN = """accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/wan_train_network.py \\
    --task t2v-1.3B \\
    --dit path/to/wan2.1_xxx_bf16.safetensors \\
    --dataset_config path/to/toml --sdpa --mixed_precision bf16 --fp8_base \\
    --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing \\
    --max_data_loader_n_workers 2 --persistent_data_loader_workers \\
    --network_module networks.lora_wan --network_dim 32 \\
    --timestep_sampling shift --discrete_flow_shift 3.0 \\
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
    --output_dir path/to/output_dir --output_name name-of-lora"""


def wan_job(**kw) -> TrainJob:
    base = dict(
        arch="wan",
        task="t2v-1.3B",
        models=TrainModels(dit="path/to/wan2.1_xxx_bf16.safetensors"),
        dataset_config="path/to/toml",
        output_dir="path/to/output_dir",
        output_name="name-of-lora",
        training=TrainingConfig(fp8_base=True, discrete_flow_shift=3.0),
    )
    base.update(kw)
    return TrainJob(**base)


def test_wan_training_matches_docs():
    assert_matches_doc(
        train_argv(ENV, wan_job()),
        DOC_WAN_TRAIN.replace("adamw8bit", "AdamW8bit"),
        "wan_train_network",
        OUR_TRAIN_EXTRAS,
    )


def test_wan22_high_and_low_noise_training():
    job = wan_job(
        task="i2v-A14B",
        models=TrainModels(dit="low.safetensors", dit_high_noise="high.safetensors"),
        timestep_boundary=900,
        offload_inactive_dit=True,
    )
    f = flags(train_argv(ENV, job))
    assert f["--task"] == ["i2v-A14B"] and f["--dit"] == ["low.safetensors"]
    assert f["--dit_high_noise"] == ["high.safetensors"] and f["--timestep_boundary"] == ["900"]
    assert "--offload_inactive_dit" in f


def test_wan21_rejects_wan22_options():
    with pytest.raises(ValueError, match="Wan2.2 options"):
        train_argv(ENV, wan_job(models=TrainModels(dit="d", dit_high_noise="h")))


def test_wan_fun_control_task_and_bad_task():
    assert flags(train_argv(ENV, wan_job(task="t2v-14B-FC")))["--task"] == ["t2v-14B-FC"]
    with pytest.raises(ValueError, match="task='t2v-99B' must be one of"):
        train_argv(ENV, wan_job(task="t2v-99B"))


DOC_FPACK_TRAIN = """accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/fpack_train_network.py \\
    --dit path/to/dit_model \\
    --vae path/to/vae_model.safetensors \\
    --text_encoder1 path/to/text_encoder1 \\
    --text_encoder2 path/to/text_encoder2 \\
    --image_encoder path/to/image_encoder_model.safetensors \\
    --dataset_config path/to/toml \\
    --sdpa --mixed_precision bf16 \\
    --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing \\
    --timestep_sampling shift --weighting_scheme none --discrete_flow_shift 3.0 \\
    --max_data_loader_n_workers 2 --persistent_data_loader_workers \\
    --network_module networks.lora_framepack --network_dim 32 \\
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
    --output_dir path/to/output_dir --output_name name-of-lora"""


def test_framepack_training_matches_docs():
    job = TrainJob(
        arch="framepack",
        models=TrainModels(
            dit="path/to/dit_model",
            vae="path/to/vae_model.safetensors",
            text_encoder1="path/to/text_encoder1",
            text_encoder2="path/to/text_encoder2",
            image_encoder="path/to/image_encoder_model.safetensors",
        ),
        dataset_config="path/to/toml",
        output_dir="path/to/output_dir",
        output_name="name-of-lora",
    )
    doc = DOC_FPACK_TRAIN.replace("adamw8bit", "AdamW8bit").replace(" --weighting_scheme none", "")
    assert_matches_doc(train_argv(ENV, job), doc, "fpack_train_network", OUR_TRAIN_EXTRAS)


def test_framepack_training_needs_all_models():
    job = TrainJob(arch="framepack", models=TrainModels(dit="d"), dataset_config="t", output_dir="o", output_name="n")
    with pytest.raises(ValueError, match="FramePack training needs vae, text_encoder1, text_encoder2, image_encoder"):
        train_argv(ENV, job)


def test_full_config_flags_optimizer_sampling_memory(tmp_path):
    sampling = SamplingConfig(prompts="a cat --w 320\n# comment\n\na dog", sample_every_n_epochs=2, width=832, seed=7)
    prompt_file = sampling.write_prompt_file(tmp_path / "p.txt")
    assert prompt_file.read_text().splitlines() == ["a cat --w 320 --d 7", "a dog --w 832 --d 7"]
    job = wan_job(
        models=TrainModels(dit="d", vae="v", text_encoder1="t5"),
        training=TrainingConfig(
            max_train_epochs=0, max_train_steps=500, save_every_n_steps=100, attention="sage", network_type="lokr",
            network_args="factor=4", log_tensorboard=True, save_precision="bf16",
        ),
        optimizer=OptimizerConfig(
            optimizer_type="custom", custom_optimizer="prodigyopt.Prodigy", optimizer_args="decouple=True d_coef=2",
            lr_scheduler="cosine_with_restarts", lr_warmup_steps=0.05, lr_scheduler_num_cycles=3, max_grad_norm=0.0,
        ),
        sampling=sampling,
        memory=MemoryConfig(blocks_to_swap=20, use_pinned_memory_for_block_swap=True, fp8_scaled=True,
                            fp8_text_encoder=True, vae_cache_cpu=True),
    )  # fmt: skip
    f = flags(train_argv(ENV, job, prompt_file))
    assert f["--max_train_steps"] == ["500"] and "--max_train_epochs" not in f
    assert f["--save_every_n_steps"] == ["100"] and "--sage_attn" in f and "--sdpa" not in f
    assert f["--network_module"] == ["networks.lokr"] and f["--network_args"] == ["factor=4"]
    assert f["--optimizer_type"] == ["prodigyopt.Prodigy"] and f["--optimizer_args"] == ["decouple=True", "d_coef=2"]
    assert f["--lr_scheduler_num_cycles"] == ["3"] and f["--lr_warmup_steps"] == ["0.05"]
    assert f["--max_grad_norm"] == ["0"]
    assert f["--sample_prompts"] == [str(prompt_file)] and f["--sample_every_n_epochs"] == ["2"]
    assert f["--blocks_to_swap"] == ["20"] and "--use_pinned_memory_for_block_swap" in f
    assert "--fp8_scaled" in f and "--fp8_base" in f and "--fp8_t5" in f and "--vae_cache_cpu" in f
    assert f["--log_with"] == ["tensorboard"] and f["--logging_dir"] == [str(Path("path/to/output_dir/logs"))]
    assert f["--save_precision"] == ["bf16"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(output_name="../evil"), "must be a plain file name"),
        (dict(output_name="sub/dir"), "must be a plain file name"),
        (dict(output_name=""), "output_name=.. is empty"),
        (
            dict(training=TrainingConfig(max_train_epochs=0, max_train_steps=0)),
            "set max_train_epochs or max_train_steps",
        ),
        (dict(training=TrainingConfig(network_dim=0)), "network_dim=0 must be >= 1"),
        (dict(training=TrainingConfig(attention="magic")), "attention='magic'"),
        (dict(training=TrainingConfig(network_args="noequals")), "is not key=value"),
        (dict(optimizer=OptimizerConfig(optimizer_type="custom")), "full class path"),
        (dict(sampling=SamplingConfig(prompts="x")), "never used"),
    ],
)
def test_bad_training_inputs_are_named(kwargs, message, tmp_path):
    sampling = kwargs.get("sampling")
    pf = sampling.write_prompt_file(tmp_path / "p.txt") if sampling else None
    if sampling:
        kwargs["models"] = TrainModels(dit="d", vae="v", text_encoder1="t")
    with pytest.raises(ValueError, match=message):
        train_argv(ENV, wan_job(**kwargs), pf)


def test_hunyuan_rejects_fp8_scaled():
    job = TrainJob(
        arch="hunyuan_video", models=TrainModels(dit="d"), dataset_config="t", output_dir="o", output_name="n",
        memory=MemoryConfig(fp8_scaled=True),
    )  # fmt: skip
    with pytest.raises(ValueError, match="fp8_scaled is not available for HunyuanVideo"):
        train_argv(ENV, job)


# --- caching ---------------------------------------------------------------------------

DOC_HV_CACHE = "python src/musubi_tuner/cache_latents.py --dataset_config path/to/toml --vae path/to/ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt --vae_chunk_size 32 --vae_tiling"
DOC_HV_TE = "python src/musubi_tuner/cache_text_encoder_outputs.py --dataset_config path/to/toml  --text_encoder1 path/to/ckpts/text_encoder --text_encoder2 path/to/ckpts/text_encoder_2 --batch_size 16"
DOC_WAN_CACHE = (
    "python src/musubi_tuner/wan_cache_latents.py --dataset_config path/to/toml --vae path/to/wan_vae.safetensors"
)
DOC_WAN_TE = "python src/musubi_tuner/wan_cache_text_encoder_outputs.py --dataset_config path/to/toml  --t5 path/to/models_t5_umt5-xxl-enc-bf16.pth --batch_size 16"
DOC_FP_CACHE = "python src/musubi_tuner/fpack_cache_latents.py --dataset_config path/to/toml --vae path/to/vae_model.safetensors --image_encoder path/to/image_encoder_model.safetensors --vae_chunk_size 32"
DOC_FP_TE = "python src/musubi_tuner/fpack_cache_text_encoder_outputs.py --dataset_config path/to/toml --text_encoder1 path/to/text_encoder1 --text_encoder2 path/to/text_encoder2 --batch_size 16"

NO_SKIP = CacheOptions(skip_existing=False)


def test_cache_commands_match_docs():
    hv = cache_latents_argv(
        ENV, "hunyuan_video", "path/to/toml", "path/to/ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt",
        vae_chunk_size=32, vae_tiling=True, options=NO_SKIP,
    )  # fmt: skip
    assert_matches_doc(hv, DOC_HV_CACHE, "cache_latents", set())
    te = cache_text_encoder_argv(
        ENV, "hunyuan_video", "path/to/toml", ["path/to/ckpts/text_encoder", "path/to/ckpts/text_encoder_2"],
        options=CacheOptions(batch_size=16, skip_existing=False),
    )  # fmt: skip
    assert_matches_doc(te, DOC_HV_TE, "cache_text_encoder_outputs", set())
    wan = cache_latents_argv(ENV, "wan", "path/to/toml", "path/to/wan_vae.safetensors", options=NO_SKIP)
    assert_matches_doc(wan, DOC_WAN_CACHE, "wan_cache_latents", set())
    wte = cache_text_encoder_argv(
        ENV, "wan", "path/to/toml", ["path/to/models_t5_umt5-xxl-enc-bf16.pth"], options=CacheOptions(batch_size=16)
    )
    assert_matches_doc(wte, DOC_WAN_TE, "wan_cache_text_encoder_outputs", {"--skip_existing"})
    fp = cache_latents_argv(
        ENV, "framepack", "path/to/toml", "path/to/vae_model.safetensors",
        extra_model="path/to/image_encoder_model.safetensors", vae_chunk_size=32, options=NO_SKIP,
    )  # fmt: skip
    assert_matches_doc(fp, DOC_FP_CACHE, "fpack_cache_latents", set())
    fte = cache_text_encoder_argv(
        ENV, "framepack", "path/to/toml", ["path/to/text_encoder1", "path/to/text_encoder2"],
        options=CacheOptions(batch_size=16, skip_existing=False),
    )  # fmt: skip
    assert_matches_doc(fte, DOC_FP_TE, "fpack_cache_text_encoder_outputs", set())


def test_cache_arch_specific_flags():
    wan = flags(cache_latents_argv(ENV, "wan", "t", "v", extra_model="clip.pth", i2v=True, vae_cache_cpu=True))
    assert wan["--clip"] == ["clip.pth"] and "--i2v" in wan and "--vae_cache_cpu" in wan and "--skip_existing" in wan
    assert "--vae_tiling" not in flags(cache_latents_argv(ENV, "wan", "t", "v", vae_tiling=True))
    assert flags(cache_text_encoder_argv(ENV, "wan", "t", ["t5"], fp8=True)).keys() >= {"--fp8_t5"}
    assert "--fp8_llm" in flags(cache_text_encoder_argv(ENV, "hunyuan_video", "t", ["a", "b"], fp8=True))
    q = flags(cache_text_encoder_argv(ENV, "qwen_image", "t", ["vl"], fp8=True, model_version="edit-2509"))
    assert q["--text_encoder"] == ["vl"] and "--fp8_vl" in q and q["--model_version"] == ["edit-2509"]
    k = flags(cache_text_encoder_argv(ENV, "flux_kontext", "t", ["t5", "clip"], fp8=True))
    assert k["--text_encoder1"] == ["t5"] and k["--text_encoder2"] == ["clip"] and "--fp8_t5" in k
    h15 = flags(cache_text_encoder_argv(ENV, "hunyuan_video_1_5", "t", ["qwen", "byt5"]))
    assert h15["--text_encoder"] == ["qwen"] and h15["--byt5"] == ["byt5"]
    z = flags(cache_latents_argv(ENV, "zimage", "t", "v"))
    assert z["--vae"] == ["v"] and ENV.script("zimage_cache_latents") == Path(
        cache_latents_argv(ENV, "zimage", "t", "v")[1]
    )


def test_cache_bad_inputs():
    with pytest.raises(ValueError, match="needs --image_encoder"):
        cache_latents_argv(ENV, "framepack", "t", "v")
    with pytest.raises(ValueError, match="i2v caching is for Wan"):
        cache_latents_argv(ENV, "hunyuan_video", "t", "v", i2v=True)
    with pytest.raises(ValueError, match="needs text_encoder1 and text_encoder2"):
        cache_text_encoder_argv(ENV, "hunyuan_video", "t", ["a", ""])
    with pytest.raises(ValueError, match="clear text_encoder2"):
        cache_text_encoder_argv(ENV, "wan", "t", ["a", "b"])
    with pytest.raises(ValueError, match="architecture 'sd15' is not supported"):
        cache_latents_argv(ENV, "sd15", "t", "v")


# --- generation ------------------------------------------------------------------------

DOC_HV_GEN = """python src/musubi_tuner/hv_generate_video.py --fp8 --video_size 544 960 --video_length 5 --infer_steps 30
    --prompt "A cat walks on the grass, realistic style."  --save_path path/to/save/dir --output_type both
    --dit path/to/ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt --attn_mode sdpa --split_attn
    --vae path/to/ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt
    --vae_chunk_size 32 --vae_spatial_tile_sample_min_size 128
    --text_encoder1 path/to/ckpts/text_encoder
    --text_encoder2 path/to/ckpts/text_encoder_2
    --seed 1234 --lora_multiplier 1.0 --lora_weight path/to/lora.safetensors"""


def test_hunyuan_generate_matches_docs():
    job = GenerateJob(
        arch="hunyuan_video", prompt="A cat walks on the grass, realistic style.", save_path="path/to/save/dir",
        dit="path/to/ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt",
        vae="path/to/ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt",
        text_encoder1="path/to/ckpts/text_encoder", text_encoder2="path/to/ckpts/text_encoder_2",
        width=960, height=544, frames=5, steps=30, seed=1234, loras=(("path/to/lora.safetensors", 1.0),),
        fp8=True, vae_chunk_size=32, vae_spatial_tile_sample_min_size=128, output_type="both",
        extra="--split_attn",
    )  # fmt: skip
    assert_matches_doc(generate_argv(ENV, job), DOC_HV_GEN, "hv_generate_video", {"--fps"})


DOC_WAN_GEN = """python src/musubi_tuner/wan_generate_video.py --fp8 --task i2v-14B --video_size 832 480 --video_length 81 --infer_steps 20 \\
--prompt "prompt for the video" --save_path path/to/save.mp4 --output_type both \\
--dit path/to/wan2.1_i2v_480p_14B_bf16_etc.safetensors --vae path/to/wan_2.1_vae.safetensors \\
--t5 path/to/models_t5_umt5-xxl-enc-bf16.pth --clip path/to/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth \\
--attn_mode torch --image_path path/to/image.jpg"""


def test_wan_i2v_generate_matches_docs():
    job = GenerateJob(
        arch="wan", task="i2v-14B", prompt="prompt for the video", save_path="path/to/save.mp4",
        dit="path/to/wan2.1_i2v_480p_14B_bf16_etc.safetensors", vae="path/to/wan_2.1_vae.safetensors",
        text_encoder1="path/to/models_t5_umt5-xxl-enc-bf16.pth",
        image_encoder="path/to/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        width=480, height=832, frames=81, steps=20, fp8=True, attn_mode="torch", image_path="path/to/image.jpg",
        output_type="both",
    )  # fmt: skip
    assert_matches_doc(generate_argv(ENV, job), DOC_WAN_GEN, "wan_generate_video", {"--fps"})


DOC_FP_GEN = """python src/musubi_tuner/fpack_generate_video.py \\
    --dit path/to/dit_model \\
    --vae path/to/vae_model.safetensors \\
    --text_encoder1 path/to/text_encoder1 \\
    --text_encoder2 path/to/text_encoder2 \\
    --image_encoder path/to/image_encoder_model.safetensors \\
    --image_path path/to/start_image.jpg \\
    --prompt "A cat walks on the grass, realistic style." \\
    --video_size 512 768 --video_seconds 5 --fps 30 --infer_steps 25 \\
    --attn_mode sdpa --fp8_scaled \\
    --vae_chunk_size 32 \\
    --save_path path/to/save/dir --output_type both \\
    --seed 1234 --lora_multiplier 1.0 --lora_weight path/to/lora.safetensors"""


def test_framepack_generate_matches_docs():
    job = GenerateJob(
        arch="framepack", prompt="A cat walks on the grass, realistic style.", save_path="path/to/save/dir",
        dit="path/to/dit_model", vae="path/to/vae_model.safetensors", text_encoder1="path/to/text_encoder1",
        text_encoder2="path/to/text_encoder2", image_encoder="path/to/image_encoder_model.safetensors",
        image_path="path/to/start_image.jpg", width=768, height=512, frames=150, fps=30, steps=25,
        attn_mode="sdpa", fp8_scaled=True, vae_chunk_size=32, output_type="both", seed=1234,
        loras=(("path/to/lora.safetensors", 1.0),),
    )  # fmt: skip
    assert_matches_doc(generate_argv(ENV, job), DOC_FP_GEN, "fpack_generate_video", set())


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(width=500), "multiples of 16"),
        (dict(frames=80), "must be 4\\*N\\+1"),
        (dict(prompt=" "), "prompt is empty"),
        (dict(task="i2v-14B"), "connect a start image"),
        (dict(dit_high_noise="h"), "dit_high_noise is for Wan2.2"),
        (dict(control_path="c.mp4"), "control_video is for Wan Fun-Control tasks"),
        (dict(attn_mode="fast"), "attn_mode='fast'"),
    ],
)
def test_generate_bad_inputs(kw, message):
    base = dict(arch="wan", prompt="p", save_path="s", dit="d", vae="v", text_encoder1="t", task="t2v-1.3B")
    with pytest.raises(ValueError, match=message):
        generate_argv(ENV, GenerateJob(**{**base, **kw}))


WAN22 = dict(arch="wan", task="t2v-A14B", prompt="p", save_path="s", dit="low.safetensors", vae="v",
             text_encoder1="t5", dit_high_noise="high.safetensors")  # fmt: skip


def test_wan22_loras_go_to_the_dit_they_target():
    """wan_generate_video.py loads --lora_weight into --dit and --lora_weight_high_noise into --dit_high_noise."""
    low, high = split_wan_loras(
        [("lora_1", "style.safetensors", 0.8, "both"), ("lora_2", "motion.safetensors", 1.0, "dit_high_noise"),
         ("lora_3", "detail.safetensors", 0.5, "dit")]
    )  # fmt: skip
    assert low == (("style.safetensors", 0.8), ("detail.safetensors", 0.5))
    assert high == (("style.safetensors", 0.8), ("motion.safetensors", 1.0))
    f = flags(generate_argv(ENV, GenerateJob(loras=low, loras_high_noise=high, **WAN22)))
    assert f["--dit"] == ["low.safetensors"] and f["--dit_high_noise"] == ["high.safetensors"]
    assert f["--lora_weight"] == ["style.safetensors", "detail.safetensors"] and f["--lora_multiplier"] == [
        "0.8",
        "0.5",
    ]
    assert f["--lora_weight_high_noise"] == ["style.safetensors", "motion.safetensors"]
    assert [float(m) for m in f["--lora_multiplier_high_noise"]] == [0.8, 1.0]


def test_wan_lora_target_default_keeps_the_old_command():
    """Workflows saved before the target inputs: every LoRA on `dit`, no high-noise flags (as before)."""
    loras = (("a.safetensors", 1.0), ("b.safetensors", 0.5))
    low, high = split_wan_loras([(f"lora_{i}", p, m, "dit") for i, (p, m) in enumerate(loras, 1)])
    assert (low, high) == (loras, ())
    new = generate_argv(ENV, GenerateJob(loras=low, loras_high_noise=high, **WAN22))
    assert new == generate_argv(ENV, GenerateJob(loras=loras, **WAN22))
    assert not any(a.endswith("_high_noise") and a.startswith("--lora") for a in new)
    # a high-noise-only LoRA: no --lora_weight at all
    only_high = flags(generate_argv(ENV, GenerateJob(loras_high_noise=(("m", 1.0),), **WAN22)))
    assert "--lora_weight" not in only_high and only_high["--lora_weight_high_noise"] == ["m"]


@pytest.mark.parametrize(
    "job, message",
    [
        (dict(**{**WAN22, "dit_high_noise": ""}), "a LoRA targets dit_high_noise, but dit_high_noise is empty"),
        (dict(**{**WAN22, "task": "t2v-14B", "dit_high_noise": ""}), "set that LoRA's target to dit"),
        (dict(arch="framepack", prompt="p", save_path="s", dit="d", vae="v", text_encoder1="a", text_encoder2="b",
              image_encoder="i"), "a LoRA targets dit_high_noise"),
    ],
)  # fmt: skip
def test_high_noise_loras_need_the_high_noise_dit(job, message):
    with pytest.raises(ValueError, match=message):
        generate_argv(ENV, GenerateJob(loras_high_noise=(("m.safetensors", 1.0),), **job))


def test_wan_lora_target_must_be_known():
    with pytest.raises(ValueError, match="lora_2_target='high' must be one of dit, dit_high_noise, both"):
        split_wan_loras([("lora_1", "a", 1.0, "dit"), ("lora_2", "b", 1.0, "high")])


# --- utilities -------------------------------------------------------------------------


def test_convert_merge_ema_match_docs():
    conv = convert_lora_argv(ENV, "path/to/musubi_lora.safetensors", "path/to/another_format.safetensors", "other")
    doc = "python src/musubi_tuner/convert_lora.py --input path/to/musubi_lora.safetensors --output path/to/another_format.safetensors --target other"
    assert_matches_doc(conv, doc, "convert_lora", set())
    merge = merge_lora_argv(
        ENV, "path/to/ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt",
        [("path/to/lora.safetensors", 1.0)], "path/to/merged_model.safetensors", device="cpu",
    )  # fmt: skip
    doc = """python src/musubi_tuner/merge_lora.py \\
    --dit path/to/ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt \\
    --lora_weight path/to/lora.safetensors \\
    --save_merged_model path/to/merged_model.safetensors \\
    --device cpu \\
    --lora_multiplier 1.0"""
    assert_matches_doc(merge, doc, "merge_lora", set())
    ema = post_hoc_ema_argv(ENV, ["a.safetensors", "b.safetensors"], "out.safetensors", beta=0.9, beta2=0.95)
    assert ema[2:] == [
        "a.safetensors",
        "b.safetensors",
        "--beta",
        "0.9",
        "--beta2",
        "0.95",
        "--output_file",
        "out.safetensors",
    ]
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        post_hoc_ema_argv(ENV, ["a"], "o")
    with pytest.raises(ValueError, match="target='comfy'"):
        convert_lora_argv(ENV, "a", "b", "comfy")


def test_extra_args_are_split_not_shelled():
    assert extra_args('--foo 1 --bar "a b"') == ["--foo", "1", "--bar", "a b"]
    with pytest.raises(ValueError, match="must start with a --flag"):
        extra_args("rm -rf /")


def test_video_to_video_and_fun_control():
    base = dict(prompt="p", save_path="s", dit="d", vae="v", text_encoder1="t")
    wan = generate_argv(
        ENV, GenerateJob(arch="wan", task="t2v-14B-FC", video_path="in.mp4", control_path="c.mp4", **base)
    )
    assert wan[wan.index("--video_path") + 1] == "in.mp4" and "--strength" not in wan
    assert wan[wan.index("--control_path") + 1] == "c.mp4"
    hv = generate_argv(
        ENV, GenerateJob(arch="hunyuan_video", text_encoder2="t2", video_path="in.mp4", strength=0.6, **base)
    )
    assert hv[hv.index("--strength") + 1] == "0.6"
    with pytest.raises(ValueError, match="FramePack takes no input video"):
        generate_argv(ENV, GenerateJob(arch="framepack", text_encoder2="t2", image_encoder="i", video_path="x", **base))


def test_arch_table_node_inputs_fill_real_job_fields():
    """Each per-architecture node input in musubi/arch.py names a field the command builders take."""
    from dataclasses import fields

    from speedkit.musubi.arch import ARCHS, TRAINABLE

    train_models = {f.name for f in fields(TrainModels)}
    train_job = {f.name for f in fields(TrainJob)}
    generate_job = {f.name for f in fields(GenerateJob)}
    for arch in TRAINABLE:
        spec = ARCHS[arch]
        for row in spec.train_inputs:
            assert row.field in (train_models if row.role == "model" else train_job), (arch, row)
        for row in spec.generate_inputs:
            assert row.role in ("model", "file", "job") and row.field in generate_job, (arch, row)
        for row in (*spec.train_inputs, *spec.generate_inputs):
            assert row.kind in ("path", "int", "float", "bool", "choice"), (arch, row)
            assert row.kind != "choice" or row.default in row.choices, (arch, row)
        names = [r.name for r in spec.train_inputs]
        assert len(names) == len(set(names)), f"{arch}: an input name repeats in train_inputs"
