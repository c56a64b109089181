"""Our command lines and dataset TOMLs checked by musubi-tuner's own code.

Needs ``MUSUBI_TUNER_ROOT`` (a kohya-ss/musubi-tuner checkout, v0.3.x layout) and ideally
``MUSUBI_TUNER_PYTHON`` (its venv; else this interpreter, with musubi's heavy imports
stubbed, and the schema test skipped unless voluptuous is installed). Every argv below is parsed by musubi's real argparse parser for that script, the
accelerate flags by accelerate's launch parser, and each dataset TOML goes through musubi's
``ConfigSanitizer`` + ``BlueprintGenerator`` (voluptuous schema).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speedkit.musubi import commands, dataset
from speedkit.musubi.commands import (
    CacheOptions,
    GenerateJob,
    MergeJob,
    TrainJob,
    TrainModels,
    cache_latents_argv,
    cache_text_encoder_argv,
    convert_lora_argv,
    generate_argv,
    merge_argv,
    merge_lora_argv,
    post_hoc_ema_argv,
    train_argv,
)
from speedkit.musubi.configs import MemoryConfig, OptimizerConfig, SamplingConfig, TrainingConfig, suggest_memory
from speedkit.musubi.env import MusubiEnv

ROOT = os.environ.get("MUSUBI_TUNER_ROOT", "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not ROOT, reason="set MUSUBI_TUNER_ROOT to a kohya-ss/musubi-tuner checkout to run these"),
]
PROBE = Path(__file__).resolve().parents[1] / "fake_musubi" / "musubi_probe.py"


@pytest.fixture(scope="module")
def env() -> MusubiEnv:
    return MusubiEnv(root=Path(ROOT), python=Path(os.environ.get("MUSUBI_TUNER_PYTHON", sys.executable)))


def probe(env: MusubiEnv, request: dict) -> dict:
    # Without musubi's venv every heavy import is stubbed (the parser code itself is musubi's).
    request = {"root": str(env.root), "stub_all": not os.environ.get("MUSUBI_TUNER_PYTHON"), **request}
    proc = subprocess.run(
        [str(env.python), str(PROBE)], input=json.dumps(request), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def script_and_args(env: MusubiEnv, argv: list[str]) -> tuple[str, list[str], list[str] | None]:
    """(script name, its args, accelerate launch flags or None)."""
    i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    launch = argv[3 : i + 1] if argv[1:3] == ["-m", "accelerate.commands.launch"] else None
    return Path(argv[i]).stem, argv[i + 1 :], launch


def all_commands(env: MusubiEnv, tmp: Path) -> list[tuple[str, list[str]]]:
    t = str(tmp / "d.toml")
    cmds: list[tuple[str, list[str]]] = []
    opts = CacheOptions(batch_size=4, num_workers=2, skip_existing=True, keep_cache=True, device="cuda")
    # latent caches
    cmds.append(
        (
            "hv latents",
            cache_latents_argv(
                env,
                "hunyuan_video",
                t,
                "vae.pt",
                vae_chunk_size=32,
                vae_tiling=True,
                vae_spatial_tile_sample_min_size=128,
                vae_dtype="float16",
                options=opts,
            ),
        )
    )
    cmds.append(
        (
            "wan latents i2v",
            cache_latents_argv(
                env, "wan", t, "vae", extra_model="clip.pth", i2v=True, vae_cache_cpu=True, one_frame=True, options=opts
            ),
        )
    )
    cmds.append(
        (
            "fpack latents",
            cache_latents_argv(
                env,
                "framepack",
                t,
                "vae",
                extra_model="siglip",
                f1=True,
                vae_chunk_size=32,
                vae_tiling=True,
                options=opts,
            ),
        )
    )
    cmds.append(("kontext latents", cache_latents_argv(env, "flux_kontext", t, "ae", vae_tiling=True)))
    cmds.append(("qwen latents", cache_latents_argv(env, "qwen_image", t, "vae", model_version="edit-2509")))
    cmds.append(("zimage latents", cache_latents_argv(env, "zimage", t, "vae")))
    cmds.append(
        ("hv1.5 latents", cache_latents_argv(env, "hunyuan_video_1_5", t, "vae", i2v=True, extra_model="siglip"))
    )
    # text encoder caches
    cmds.append(
        (
            "hv te",
            cache_text_encoder_argv(
                env, "hunyuan_video", t, ["te1", "te2"], fp8=True, text_encoder_dtype="float16", options=opts
            ),
        )
    )
    cmds.append(("wan te", cache_text_encoder_argv(env, "wan", t, ["t5"], fp8=True, options=opts)))
    cmds.append(("fpack te", cache_text_encoder_argv(env, "framepack", t, ["te1", "te2"], fp8=True)))
    cmds.append(("kontext te", cache_text_encoder_argv(env, "flux_kontext", t, ["t5", "clip"], fp8=True)))
    cmds.append(("qwen te", cache_text_encoder_argv(env, "qwen_image", t, ["vl"], fp8=True, model_version="edit")))
    cmds.append(("zimage te", cache_text_encoder_argv(env, "zimage", t, ["qwen3"], fp8=True)))
    cmds.append(("hv1.5 te", cache_text_encoder_argv(env, "hunyuan_video_1_5", t, ["qwen", "byt5"], fp8=True)))
    # training
    sampling = SamplingConfig(prompts="a cat", sample_every_n_epochs=1, sample_every_n_steps=50, sample_at_first=True)
    full = TrainingConfig(
        max_train_epochs=0, max_train_steps=100, save_every_n_steps=10, save_last_n_epochs=2, attention="xformers",
        split_attn=True, network_args="loraplus_lr_ratio=4", network_dropout=0.1, network_weights="prev.safetensors",
        save_state=True, log_tensorboard=True, gradient_accumulation_steps=2, weighting_scheme="logit_normal",
        save_precision="fp16", mixed_precision="fp16",
    )  # fmt: skip
    opt = OptimizerConfig(
        optimizer_type="AdamW", optimizer_args="weight_decay=0.01 betas=0.9,0.99", lr_scheduler="cosine_with_restarts",
        lr_warmup_steps=0.1, lr_scheduler_num_cycles=2, lr_scheduler_min_lr_ratio=0.1,
    )  # fmt: skip
    mem = MemoryConfig(blocks_to_swap=20, use_pinned_memory_for_block_swap=True, fp8_base=True, fp8_text_encoder=True,
                       vae_tiling=True, vae_chunk_size=16, vae_spatial_tile_sample_min_size=128, vae_cache_cpu=True)  # fmt: skip
    pf = tmp / "p.txt"
    common = dict(dataset_config=t, output_dir=str(tmp / "out"), output_name="lora")
    hv_models = TrainModels(dit="dit", vae="vae", text_encoder1="te1", text_encoder2="te2")
    cmds.append(
        ("hv train default", train_argv(env, TrainJob(arch="hunyuan_video", models=TrainModels(dit="d"), **common)))
    )
    cmds.append(
        (
            "hv train full",
            train_argv(
                env,
                TrainJob(
                    arch="hunyuan_video",
                    models=hv_models,
                    training=full,
                    optimizer=opt,
                    sampling=sampling,
                    memory=mem,
                    **common,
                ),
                pf,
            ),
        )
    )
    cmds.append(
        (
            "hv train lokr",
            train_argv(
                env,
                TrainJob(
                    arch="hunyuan_video",
                    models=hv_models,
                    training=TrainingConfig(network_type="lokr", attention="flash"),
                    **common,
                ),
            ),
        )
    )
    wan_models = TrainModels(dit="dit", vae="vae", text_encoder1="t5", image_encoder="clip")
    for task in ("t2v-1.3B", "t2v-14B", "i2v-14B", "t2v-14B-FC", "flf2v-14B"):
        cmds.append(
            (f"wan train {task}", train_argv(env, TrainJob(arch="wan", task=task, models=wan_models, **common)))
        )
    wan_mem = MemoryConfig(blocks_to_swap=30, fp8_scaled=True, fp8_text_encoder=True, vae_cache_cpu=True)
    cmds.append(
        (
            "wan train full",
            train_argv(
                env,
                TrainJob(
                    arch="wan",
                    task="t2v-14B",
                    models=wan_models,
                    training=full,
                    optimizer=opt,
                    sampling=sampling,
                    memory=wan_mem,
                    **common,
                ),
                pf,
            ),
        )
    )
    cmds.append(("wan2.2 train", train_argv(env, TrainJob(
        arch="wan", task="i2v-A14B", models=TrainModels(dit="low", dit_high_noise="high", vae="v", text_encoder1="t5"),
        timestep_boundary=900, offload_inactive_dit=True, one_frame=True,
        training=TrainingConfig(attention="sage", timestep_sampling="logsnr"), **common))))  # fmt: skip
    fp_models = TrainModels(dit="dit", vae="vae", text_encoder1="te1", text_encoder2="te2", image_encoder="siglip")
    cmds.append(("fpack train", train_argv(env, TrainJob(arch="framepack", models=fp_models, **common))))
    cmds.append(("fpack train full", train_argv(env, TrainJob(
        arch="framepack", models=fp_models, training=full, optimizer=OptimizerConfig(optimizer_type="Adafactor",
        lr_scheduler="polynomial", lr_warmup_steps=50, lr_scheduler_power=2.0), memory=mem, f1=True, one_frame=True,
        latent_window_size=9, sampling=sampling, **common), pf)))  # fmt: skip
    suggested = suggest_memory("wan", 12.0)
    cmds.append(
        ("wan train suggested", train_argv(env, TrainJob(arch="wan", models=wan_models, memory=suggested, **common)))
    )
    # generation
    g = dict(prompt="a cat", save_path=str(tmp / "gen"), dit="dit", vae="vae", seed=1, steps=20,
             loras=(("a.safetensors", 1.0), ("b.safetensors", 0.5)), negative_prompt="blurry")  # fmt: skip
    cmds.append(
        (
            "hv gen",
            generate_argv(
                env,
                GenerateJob(
                    arch="hunyuan_video",
                    text_encoder1="a",
                    text_encoder2="b",
                    width=960,
                    height=544,
                    frames=25,
                    fp8=True,
                    guidance_scale=1.0,
                    flow_shift=7.0,
                    vae_chunk_size=32,
                    blocks_to_swap=10,
                    fp8_text_encoder=True,
                    **g,
                ),
            ),
        )
    )
    cmds.append(
        (
            "hv gen loha (lycoris)",
            generate_argv(
                env, GenerateJob(arch="hunyuan_video", text_encoder1="a", text_encoder2="b", lycoris=True, **g)
            ),
        )
    )
    cmds.append(
        (
            "hv v2v",
            generate_argv(
                env,
                GenerateJob(
                    arch="hunyuan_video",
                    text_encoder1="a",
                    text_encoder2="b",
                    video_path="in.mp4",
                    strength=0.6,
                    output_type="both",
                    **g,
                ),
            ),
        )
    )
    cmds.append(
        (
            "wan t2v",
            generate_argv(
                env,
                GenerateJob(
                    arch="wan",
                    task="t2v-1.3B",
                    text_encoder1="t5",
                    frames=81,
                    fp8_scaled=True,
                    attn_mode="torch",
                    fp8_text_encoder=True,
                    guidance_scale=5.0,
                    **g,
                ),
            ),
        )
    )
    cmds.append(
        (
            "wan v2v fun-control",
            generate_argv(
                env,
                GenerateJob(
                    arch="wan", task="t2v-1.3B-FC", text_encoder1="t5", video_path="in.mp4", control_path="c.mp4", **g
                ),
            ),
        )
    )
    cmds.append(
        (
            "wan2.2 i2v",
            generate_argv(
                env,
                GenerateJob(
                    arch="wan",
                    task="i2v-A14B",
                    text_encoder1="t5",
                    dit_high_noise="high",
                    image_path="x.png",
                    end_image_path="y.png",
                    blocks_to_swap=20,
                    **g,
                ),
            ),
        )
    )
    low, high = commands.split_wan_loras(
        [("lora_1", "both.safetensors", 0.8, "both"), ("lora_2", "high.safetensors", 0.6, "dit_high_noise"),
         ("lora_3", "low.safetensors", 1.0, "dit")]
    )  # fmt: skip
    cmds.append(
        (
            "wan2.2 t2v high-noise loras",
            generate_argv(
                env,
                GenerateJob(
                    arch="wan", task="t2v-A14B", text_encoder1="t5", dit_high_noise="high",
                    **{**g, "loras": low}, loras_high_noise=high,
                ),
            ),
        )
    )  # fmt: skip
    cmds.append(
        (
            "fpack gen",
            generate_argv(
                env,
                GenerateJob(
                    arch="framepack",
                    text_encoder1="a",
                    text_encoder2="b",
                    image_encoder="siglip",
                    image_path="x.png",
                    frames=90,
                    fp8_scaled=True,
                    vae_chunk_size=32,
                    **g,
                ),
            ),
        )
    )
    # utilities
    cmds.append(("convert", convert_lora_argv(env, "a.safetensors", "b.safetensors", "other", "diffusion_model")))
    cmds.append(("convert back", convert_lora_argv(env, "a.safetensors", "b.safetensors", "default")))
    cmds.append(("merge", merge_lora_argv(env, "dit", [("a", 1.0), ("b", 0.7)], "out.safetensors", "cuda")))
    cmds += merge_commands(env, tmp)
    cmds.append(("ema", post_hoc_ema_argv(env, ["a", "b", "c"], "o.safetensors", 0.9, 0.99, 0.0, True)))
    cmds.append(("ema sigma", post_hoc_ema_argv(env, ["a", "b"], "o.safetensors", sigma_rel=0.2)))
    return cmds


def merge_commands(env: MusubiEnv, tmp: Path) -> list[tuple[str, list[str]]]:
    """Merge LoRA for every architecture (and every Wan task's model set)."""
    loras = (("a.safetensors", 1.0), ("b.safetensors", 0.7))
    base = dict(dit="dit.safetensors", loras=loras, output=str(tmp / "merged.safetensors"), device="cuda")
    pf = str(tmp / "merge.prompt.txt")
    jobs = {
        "merge hv": MergeJob(arch="hunyuan_video", **base),
        "merge fpack": MergeJob(arch="framepack", vae="v", text_encoder1="llava", text_encoder2="clip",
                                image_encoder="siglip", include_pattern=r"single_blocks_\d+", **base),
        "merge kontext": MergeJob(arch="flux_kontext", vae="ae", text_encoder1="t5", text_encoder2="clip",
                                  prompt_file=pf, exclude_pattern="img_mod", **base),
        "merge kontext loha": MergeJob(arch="flux_kontext", vae="ae", text_encoder1="t5", text_encoder2="clip",
                                       prompt_file=pf, lycoris=True, **base),
        "merge qwen": MergeJob(arch="qwen_image", vae="v", text_encoder1="qwen_vl", **base),
        "merge zimage": MergeJob(arch="zimage", text_encoder1="qwen3", include_pattern="attn", exclude_pattern="x",
                                 **base),
        "merge hv1.5": MergeJob(arch="hunyuan_video_1_5", text_encoder1="qwen_vl", text_encoder2="byt5", **base),
        "merge flux2": MergeJob(arch="flux_2", vae="ae", text_encoder1="qwen3", prompt_file=pf, model_version="klein-4b",
                                **base),
    }  # fmt: skip
    for task in ("t2v-14B", "i2v-14B", "t2v-1.3B-FC", "flf2v-14B", "i2v-A14B", "t2v-A14B"):
        models = {"text_encoder1": "t5", "vae": "v", "image_encoder": "clip"}
        need = commands.merge_models(MergeJob(arch="wan", task=task, **base))
        jobs[f"merge wan {task}"] = MergeJob(
            arch="wan", task=task, prompt_file=pf, **{k: v for k, v in models.items() if k in need}, **base
        )
    return [(name, merge_argv(env, j)) for name, j in jobs.items()]


def test_every_generated_argv_is_accepted_by_musubis_parser(env, tmp_path):
    cmds = all_commands(env, tmp_path)
    checks, launches = [], []
    for _, argv in cmds:
        script, args, launch = script_and_args(env, argv)
        assert Path(argv[[i for i, a in enumerate(argv) if a.endswith(".py")][0]]).is_file(), f"{script}.py missing"
        checks.append({"script": script, "argv": args})
        if launch:
            launches.append(launch)
    answer = probe(env, {"argv_checks": checks, "accelerate_checks": launches})
    bad = [f"{name}: {res.get('error')}" for (name, _), res in zip(cmds, answer["argv"], strict=True) if not res["ok"]]
    assert not bad, "musubi rejected:\n" + "\n".join(bad)
    acc = [r for r in answer["accelerate"] if not r.get("skipped")]
    assert all(r["ok"] for r in acc), answer["accelerate"]
    # the parsed values are ours (e.g. the Wan2.2 boundary and the swap count)
    parsed = {name: res["namespace"] for (name, _), res in zip(cmds, answer["argv"], strict=True)}
    assert parsed["wan2.2 train"]["timestep_boundary"] == 900 and parsed["wan2.2 train"]["task"] == "i2v-A14B"
    assert parsed["hv train full"]["blocks_to_swap"] == 20 and parsed["hv train full"]["network_alpha"] == 16.0
    assert parsed["fpack gen"]["video_size"] == [480, 832] and parsed["ema"]["path"] == ["a", "b", "c"]
    assert parsed["hv gen loha (lycoris)"]["lycoris"] is True and parsed["hv gen"]["lycoris"] is False
    wan22 = parsed["wan2.2 t2v high-noise loras"]
    assert wan22["dit_high_noise"] == "high" and wan22["task"] == "t2v-A14B"
    assert wan22["lora_weight"] == ["both.safetensors", "low.safetensors"] and wan22["lora_multiplier"] == [0.8, 1.0]
    assert wan22["lora_weight_high_noise"] == ["both.safetensors", "high.safetensors"]
    assert wan22["lora_multiplier_high_noise"] == [0.8, 0.6]
    merges = {name: res for (name, _), res in zip(cmds, answer["argv"], strict=True) if name.startswith("merge ")}
    assert len(merges) == 14
    for name, res in merges.items():
        ns = res["namespace"]
        assert ns["save_merged_model"] == str(tmp_path / "merged.safetensors"), name
        assert ns["lora_weight"] == ["a.safetensors", "b.safetensors"] and ns["lora_multiplier"] == [1.0, 0.7], name
        assert ns["device"] == "cuda", name
        if name != "merge hv":
            # generate scripts: musubi's own post-parse checks ran too (prompt / from_file, lycoris installed)
            assert res["validated"], name
            # Kontext and FLUX.2 save without LyCORIS (plain LoRA, batch mode)
            assert ns["lycoris"] == (name not in ("merge kontext", "merge flux2")), name
    assert merges["merge wan i2v-A14B"]["namespace"]["task"] == "i2v-A14B"
    assert merges["merge wan i2v-14B"]["namespace"]["clip"] == "clip"
    assert merges["merge kontext"]["namespace"]["exclude_patterns"] == ["img_mod", "img_mod"]
    assert merges["merge hv1.5"]["namespace"]["video_length"] == 1
    assert merges["merge flux2"]["namespace"]["model_version"] == "klein-4b"


def test_musubi_parser_rejects_a_wrong_flag(env):
    answer = probe(env, {"argv_checks": [{"script": "wan_train_network", "argv": ["--fp8_scaled_typo"]}]})
    assert not answer["argv"][0]["ok"] and "unrecognized arguments" in answer["argv"][0]["error"]


def test_musubi_post_parse_checks_run_too(env):
    """A generate script's parse_args() checks after parsing: a merge without --prompt is refused."""
    argv = ["--dit", "d", "--text_encoder", "q", "--lora_weight", "a", "--save_merged_model", "o", "--save_path", "s"]
    answer = probe(env, {"argv_checks": [{"script": "zimage_generate_image", "argv": argv}]})
    assert not answer["argv"][0]["ok"]
    assert "Either --prompt, --from_file or --interactive must be specified" in answer["argv"][0]["error"]


GOOD_CONFIGS = {
    "image": dataset.build_config(
        {"resolution": [960, 544], "caption_extension": ".txt", "batch_size": 1, "enable_bucket": True,
         "bucket_no_upscale": False},
        [{"image_directory": "/data/img", "cache_directory": "/data/img_cache", "num_repeats": 2}],
    ),
    "video": dataset.build_config(
        {"resolution": [832, 480], "caption_extension": ".txt"},
        [{"video_directory": "/data/vid", "target_frames": [1, 25, 45], "frame_extraction": "uniform",
          "frame_sample": 4, "max_frames": 129, "frame_stride": 2, "source_fps": 30.0, "cache_directory": "/c/v"},
         {"video_jsonl_file": "/data/v.jsonl", "cache_directory": "/c/j", "control_directory": "/data/ctrl",
          "fp_latent_window_size": 9}],
    ),
    "framepack 1f": dataset.build_config(
        {"resolution": 512},
        [{"image_jsonl_file": "/d/x.jsonl", "cache_directory": "/c/1f", "fp_1f_clean_indices": [0],
          "fp_1f_target_index": 9, "fp_1f_no_post": True, "control_directory": "/d/c", "no_resize_control": True,
          "control_resolution": [512, 512]}],
    ),
}  # fmt: skip

BAD_CONFIGS = {
    "int source_fps": {"datasets": [{"video_directory": "/v", "source_fps": 30}]},
    "cache_directory in general": {"general": {"cache_directory": "/c"}, "datasets": [{"image_directory": "/i"}]},
    "video key in image dataset": {"datasets": [{"image_directory": "/i", "target_frames": [1]}]},
    "unknown top-level key": {"dataset": [{"image_directory": "/i"}]},
    "3-element resolution": {"general": {"resolution": [1, 2, 3]}, "datasets": []},
    "string for bool": {"general": {"enable_bucket": "true"}, "datasets": []},
    "string frames": {"datasets": [{"video_directory": "/v", "target_frames": ["1"]}]},
    "unknown dataset key": {"datasets": [{"image_directory": "/i", "colour_aug": True}]},
}


def write(tmp: Path, name: str, config: dict, ours: bool = True) -> str:
    """Our writer for good configs; a generic TOML writer for bad ones (ours refuses them)."""
    import toml

    path = tmp / (name.replace(" ", "_") + ".toml")
    path.write_text(dataset.to_toml(config) if ours else toml.dumps(config))
    return str(path)


def test_our_tomls_pass_musubis_schema_and_bad_ones_fail_both(env, tmp_path):
    good = {n: write(tmp_path, n, c) for n, c in GOOD_CONFIGS.items()}
    bad = {n: write(tmp_path, n, c, ours=False) for n, c in BAD_CONFIGS.items()}
    answer = probe(env, {"dataset_checks": list(good.values()) + list(bad.values()), "architecture": "wan"})
    if not answer["voluptuous_real"]:
        pytest.skip(
            "voluptuous is not installed in the probe's Python: musubi's schema cannot run (the static schema test still runs)"
        )
    results = dict(zip(list(good) + list(bad), answer["datasets"], strict=True))
    for name in good:
        assert results[name]["ok"], f"musubi rejected our {name} config: {results[name].get('error')}"
        dataset.validate_config(GOOD_CONFIGS[name], strict=False)
    for name, config in BAD_CONFIGS.items():
        assert not results[name]["ok"], f"musubi accepted the bad config {name!r}"
        with pytest.raises(dataset.DatasetConfigError):
            dataset.validate_config(config, strict=False)
    # musubi reads our resolution as [W, H]
    video = results["video"]["datasets"][0]
    assert video["resolution"] == [832, 480] and video["source_fps"] == 30.0 and not video["is_image"]


def _static_schema(root: Path) -> dict[str, dict[str, str]]:
    """musubi's ConfigSanitizer schema dicts read with ``ast`` (works without voluptuous)."""
    import ast

    src = (root / "src" / "musubi_tuner" / "dataset" / "config_utils.py").read_text(encoding="utf-8")
    cls = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ClassDef) and n.name == "ConfigSanitizer")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            table = {}
            for k, v in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(v, ast.Name):
                    kind = v.id
                elif isinstance(v, ast.List) and isinstance(v.elts[0], ast.Name) and v.elts[0].id == "int":
                    kind = "ints"
                elif isinstance(v, ast.Call) and "scalar_or_twodim" in ast.unparse(v):
                    kind = "res"
                else:
                    kind = ast.unparse(v)
                table[k.value] = kind
            out[node.targets[0].id] = table
    return out


def test_our_schema_tables_equal_musubis_static_schema(env):
    schema = _static_schema(env.root)
    asc = schema["DATASET_ASCENDABLE_SCHEMA"]
    assert asc == dataset.ASCENDABLE_KEYS
    assert {**asc, **schema["IMAGE_DATASET_DISTINCT_SCHEMA"]} == dataset.IMAGE_KEYS
    assert {**asc, **schema["VIDEO_DATASET_DISTINCT_SCHEMA"]} == dataset.VIDEO_KEYS
