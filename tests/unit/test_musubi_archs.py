"""The table-driven architectures, full fine-tuning, several GPUs and training samples (CPU, no musubi).

Documented command lines (musubi-tuner v0.3.4 docs/*.md) are compared flag by flag like in
test_musubi_commands.py; the integration tier parses every command with musubi's own parsers.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from test_musubi_commands import ENV, OUR_TRAIN_EXTRAS, assert_matches_doc, flags, split_launch

from speedkit.musubi import arch as archs
from speedkit.musubi import samples, table_commands, tool_commands
from speedkit.musubi.commands import TrainJob, TrainModels, cache_latents_argv, cache_text_encoder_argv
from speedkit.musubi.configs import MemoryConfig, OptimizerConfig, SamplingConfig, TrainingConfig
from speedkit.musubi.env import Launch, MusubiEnv


@pytest.fixture(autouse=True)
def src_layout(monkeypatch):
    monkeypatch.setattr(MusubiEnv, "src_layout", property(lambda self: True))


def rows_flags(rows, **values) -> tuple[tuple[str, object], ...]:
    """(flag, value) of each flag row: the given values, else the row's default."""
    return tuple((r.field, values.get(r.name, r.default)) for r in rows if r.role == "flag")


# --- the table --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(archs.ARCHS))
def test_every_architecture_is_complete(arch):
    spec = archs.ARCHS[arch]
    assert spec.node_name and spec.train and spec.network_module and spec.cache_latents and spec.cache_text_encoder
    assert arch in archs.GENERATE_ARCHS
    if not spec.table_driven:
        return
    assert spec.gen is not None
    for rows, required, needs in (
        (spec.train_inputs, (), spec.train_sample_needs),
        (spec.gen.inputs, spec.gen.required, ()),
        *((t.inputs, (), t.sample_needs) for t in spec.trainers),
    ):
        names = [r.name for r in rows]
        assert len(names) == len(set(names)), f"{arch}: an input name repeats"
        assert set(required) <= set(names) and set(needs) <= set(names), arch
        for row in rows:
            assert row.role == "flag" and row.field.startswith("--"), (arch, row)
            assert row.kind in ("path", "int", "float", "bool", "choice"), (arch, row)
            assert row.kind != "choice" or row.default in row.choices, (arch, row)


def test_node_ids_follow_function_and_architecture():
    """The frozen ids (schema snapshot) hold one node per function and architecture: MusubiTuner_<Function>_<Arch>."""
    import json

    ids = set(json.loads((Path(__file__).with_name("musubi_node_schemas.json")).read_text(encoding="utf-8")))
    expected = {f"MusubiTuner_TrainLoRA_{s.node_name}" for s in archs.ARCHS.values()}
    expected |= {f"MusubiTuner_{t.function}_{s.node_name}" for s in archs.ARCHS.values() for t in s.trainers}
    expected |= {
        f"MusubiTuner_Generate{'Video' if s.gen.video else 'Image'}_{s.node_name}"
        for s in archs.ARCHS.values()
        if s.gen is not None
    }
    expected |= {f"MusubiTuner_GenerateVideo_{archs.ARCHS[k].node_name}" for k in archs.LEGACY}
    assert expected <= ids
    assert {
        i for i in ids if i.startswith(("MusubiTuner_TrainLoRA_", "MusubiTuner_Generate", "MusubiTuner_FineTune_"))
    } == expected


# --- caching ----------------------------------------------------------------------------


def test_new_cache_scripts_and_their_version_flags():
    t = "d.toml"
    flux2 = cache_latents_argv(ENV, "flux_2", t, "ae.safetensors", model_version="klein-4b")
    assert flux2[1].endswith("flux_2_cache_latents.py") and flux2[flux2.index("--model_version") + 1] == "klein-4b"
    with pytest.raises(ValueError, match="must be one of dev, klein-4b"):
        cache_latents_argv(ENV, "flux_2", t, "ae", model_version="klein-5b")
    pixels = cache_latents_argv(ENV, "hidream_o1", t, "")
    assert pixels[1].endswith("hidream_o1_cache_pixel.py") and "--vae" not in pixels
    with pytest.raises(ValueError, match="caches pixels, not latents"):
        cache_latents_argv(ENV, "hidream_o1", t, "vae.safetensors")
    with pytest.raises(ValueError, match="hidream_o1_cache_pixel.py takes no model version"):
        cache_latents_argv(ENV, "hidream_o1", t, "", model_version="dev")
    te = cache_text_encoder_argv(ENV, "hidream_o1", t, ["", ""], model_version="dev")
    assert te[te.index("--model_type") + 1] == "dev" and "--dit" not in te
    with pytest.raises(ValueError, match="fp8: HiDream-O1 caches fp8 text embeddings from the DiT"):
        cache_text_encoder_argv(ENV, "hidream_o1", t, ["", ""], fp8=True)
    k5 = cache_text_encoder_argv(ENV, "kandinsky5", t, ["qwen", "clip"])
    assert flags(k5)["--text_encoder_qwen"] == ["qwen"] and flags(k5)["--text_encoder_clip"] == ["clip"]
    with pytest.raises(ValueError, match="Kandinsky 5 text encoder caching has no fp8 option"):
        cache_text_encoder_argv(ENV, "kandinsky5", t, ["qwen", "clip"], fp8=True)
    with pytest.raises(
        ValueError, match="model_version='edit': zimage_cache_text_encoder_outputs.py takes no model version"
    ):
        cache_text_encoder_argv(ENV, "zimage", t, ["q"], model_version="edit")


# --- training ---------------------------------------------------------------------------

DOC_FLUX2_TRAIN = """accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/flux_2_train_network.py \\
    --model_version dev \\
    --dit path/to/dit_model \\
    --vae path/to/ae_model \\
    --text_encoder path/to/text_encoder \\
    --dataset_config path/to/toml \\
    --sdpa --mixed_precision bf16 \\
    --timestep_sampling flux2_shift --weighting_scheme none \\
    --optimizer_type adamw8bit --learning_rate 1e-4 --gradient_checkpointing \\
    --max_data_loader_n_workers 2 --persistent_data_loader_workers \\
    --network_module networks.lora_flux_2 --network_dim 32 \\
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
    --output_dir path/to/output_dir --output_name name-of-lora"""

DOC_ZIMAGE_FINETUNE = """accelerate launch --num_cpu_threads_per_process 1 src/musubi_tuner/zimage_train.py \\
    --dit path/to/dit_model \\
    --vae path/to/vae_model \\
    --text_encoder path/to/text_encoder \\
    --dataset_config path/to/toml \\
    --sdpa --mixed_precision bf16 --gradient_checkpointing \\
    --optimizer_type adafactor --learning_rate 1e-6 --fused_backward_pass \\
    --optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False" \\
    --max_grad_norm 0 --lr_scheduler constant_with_warmup --lr_warmup_steps 10 \\
    --max_data_loader_n_workers 2 --persistent_data_loader_workers \\
    --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
    --output_dir path/to/output_dir --output_name name-of-model"""


def job(arch: str, trainer: str = "", **kw) -> TrainJob:
    spec = archs.ARCHS[arch]
    rows = table_commands.trainer_of(spec, trainer).inputs if trainer else spec.train_inputs
    base = dict(arch=arch, models=TrainModels(dit="path/to/dit_model"), dataset_config="path/to/toml",
                output_dir="path/to/output_dir", output_name="name-of-lora", trainer=trainer,
                flags=rows_flags(rows, vae="path/to/ae_model", text_encoder="path/to/text_encoder"))  # fmt: skip
    base.update(kw)
    return TrainJob(**base)


def test_flux2_training_matches_docs():
    training = TrainingConfig(learning_rate=1e-4, timestep_sampling="flux2_shift", discrete_flow_shift=1.0)
    argv = table_commands.build_train_argv(ENV, job("flux_2", training=training))
    # weighting_scheme none is musubi's default, which we leave out
    doc = DOC_FLUX2_TRAIN.replace("adamw8bit", "AdamW8bit").replace(" --weighting_scheme none", "")
    assert_matches_doc(
        argv, doc, "flux_2_train_network", OUR_TRAIN_EXTRAS | {"--network_alpha", "--discrete_flow_shift"}
    )


def test_zimage_full_fine_tuning_matches_docs():
    training = TrainingConfig(learning_rate=1e-6, discrete_flow_shift=3.0)
    opt = OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="constant_with_warmup", lr_warmup_steps=10,
                          optimizer_args="relative_step=False scale_parameter=False warmup_init=False",
                          max_grad_norm=0.0)  # fmt: skip
    fl = rows_flags(table_commands.trainer_of(archs.ARCHS["zimage"], "FineTune").inputs,
                    vae="path/to/vae_model", text_encoder="path/to/text_encoder", fused_backward_pass=True)  # fmt: skip
    argv = table_commands.build_train_argv(
        ENV, job("zimage", "FineTune", training=training, optimizer=opt, flags=fl, output_name="name-of-model")
    )
    doc = DOC_ZIMAGE_FINETUNE.replace("adafactor", "Adafactor")
    assert_matches_doc(argv, doc, "zimage_train", {"--timestep_sampling", "--discrete_flow_shift"})
    assert "--network_module" not in argv and "--network_dim" not in argv


def test_fine_tuning_refuses_what_its_script_lacks():
    with pytest.raises(ValueError, match=r"^fp8_base: not available for HunyuanVideo FineTune \(hv_train.py"):
        table_commands.build_train_argv(ENV, job("hunyuan_video", "FineTune", training=TrainingConfig(fp8_base=True)))
    argv = table_commands.build_train_argv(ENV, job("hunyuan_video", "FineTune", memory=MemoryConfig(vae_tiling=True,
                                                                                                     vae_chunk_size=16)))  # fmt: skip
    assert "--vae_tiling" in argv and flags(argv)["--vae_chunk_size"] == ["16"]


def test_memory_flags_only_where_the_script_has_them():
    mem = MemoryConfig(fp8_base=True, fp8_text_encoder=True, blocks_to_swap=10, use_pinned_memory_for_block_swap=True,
                       block_swap_h2d_only=True, gradient_checkpointing_cpu_offload=True, vae_tiling=True)  # fmt: skip
    krea = table_commands.build_train_argv(ENV, job("krea2", memory=mem))
    # Krea 2 takes fp8 only scaled, and has no fp8 text encoder or VAE tiling option
    assert "--fp8_base" in krea and "--fp8_scaled" in krea and "--vae_tiling" not in krea
    assert {
        "--block_swap_h2d_only",
        "--gradient_checkpointing_cpu_offload",
        "--use_pinned_memory_for_block_swap",
    } <= set(krea)
    qwen = table_commands.build_train_argv(ENV, job("qwen_image", memory=mem))
    assert "--fp8_vl" in qwen and "--fp8_scaled" not in qwen
    ideo = table_commands.build_train_argv(ENV, job("ideogram4", memory=replace(mem, blocks_to_swap=33)))
    assert "--fp8_scaled" not in ideo and flags(ideo)["--blocks_to_swap"] == ["33"]
    with pytest.raises(ValueError, match="Ideogram 4 swaps at most 33 blocks"):
        table_commands.build_train_argv(ENV, job("ideogram4", memory=replace(mem, blocks_to_swap=34)))


def test_lycoris_training_only_where_musubi_detects_the_architecture():
    loha = TrainingConfig(network_type="loha")
    assert "networks.loha" in table_commands.build_train_argv(ENV, job("flux_2", training=loha))
    with pytest.raises(ValueError, match=r"network_type='loha': .* do not recognise Kandinsky 5"):
        table_commands.build_train_argv(ENV, job("kandinsky5", training=loha))


def test_sampling_during_training_needs_the_sampling_models(tmp_path):
    sampling = SamplingConfig(prompts="a cat", sample_every_n_epochs=1)
    empty = rows_flags(archs.ARCHS["flux_2"].train_inputs)
    with pytest.raises(ValueError, match="sampling during FLUX.2 dev / klein LoRA training needs vae, text_encoder"):
        table_commands.build_train_argv(ENV, job("flux_2", sampling=sampling, flags=empty), tmp_path / "p.txt")
    argv = table_commands.build_train_argv(ENV, job("flux_2", sampling=sampling), tmp_path / "p.txt")
    assert flags(argv)["--sample_prompts"] == [str(tmp_path / "p.txt")] and flags(argv)["--sample_every_n_epochs"]


def test_resume_and_multi_gpu_launch():
    argv = table_commands.build_train_argv(ENV, job("wan", models=TrainModels(dit="d"), resume="/runs/x-state",
                                                    launch=Launch("0,1,2")))  # fmt: skip
    launch, args = split_launch(argv, "wan_train_network")
    assert launch[3:8] == ["--multi_gpu", "--num_processes", "3", "--num_machines", "1"]
    assert flags(launch)["--gpu_ids"] == ["0,1,2"] and flags(args)["--resume"] == ["/runs/x-state"]
    two = Launch("0,1", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29500)
    f = flags(ENV.accelerate_cmd("krea2_train_network", launch=two)[3:-1])
    assert f["--num_processes"] == ["4"] and f["--machine_rank"] == ["1"] and f["--main_process_port"] == ["29500"]
    single = ENV.accelerate_cmd("x", gpu_ids="1")
    assert "--multi_gpu" not in single and flags(single[3:])["--num_processes"] == ["1"]
    for bad, message in (
        (Launch("0", num_machines=2), "main_process_ip is empty but num_machines=2"),
        (Launch("", num_machines=2, main_process_ip="h"), "needs this machine's GPUs listed"),
        (Launch("0", num_machines=2, machine_rank=2, main_process_ip="h"), "machine_rank=2 must be 0..1"),
        (Launch("0", num_machines=0), "num_machines=0 must be >= 1"),
        (Launch("0", num_machines=2, main_process_ip="h; rm"), "is not a host name or IP address"),
    ):
        with pytest.raises(ValueError, match=message):
            bad.process_args()


# --- generation -------------------------------------------------------------------------


def image_job(arch: str, **kw) -> table_commands.ImageJob:
    g = archs.ARCHS[arch].gen
    base = dict(arch=arch, prompt="a fox", run_dir="/out/run", dit="dit",
                flags=rows_flags(g.inputs, **{n: f"{n}.st" for n in g.required}),
                attention=g.attention[0][0] if g.attention else "")  # fmt: skip
    base.update(kw)
    return table_commands.ImageJob(**base)


def test_image_generation_commands():
    kontext = table_commands.image_argv(ENV, image_job("flux_kontext", images=(("--control_image_path", ("c.png",)),)))
    f = flags(kontext)
    assert f["--image_size"] == ["1024", "1024"] and f["--control_image_path"] == ["c.png"]
    assert f["--save_path"] == ["/out/run"] and f["--output_type"] == ["images"] and f["--attn_mode"] == ["sdpa"]
    with pytest.raises(ValueError, match="FLUX.1 Kontext .* takes no negative prompt"):
        table_commands.image_argv(ENV, image_job("flux_kontext", negative_prompt="blur"))
    krea = table_commands.image_argv(ENV, image_job("krea2", prompt="-a fox", width=512, height=256))
    assert krea[-2:] == ["--", "-a fox"] and flags(krea)["--width"] == ["512"] and "--output_type" not in krea
    hidream = table_commands.image_argv(ENV, image_job("hidream_o1", attention="flash"))
    assert flags(hidream)["--save_path"] == ["/out/run/hidream_o1.png"] and "--flash_attn" in hidream
    with pytest.raises(ValueError, match="steps: Ideogram 4 generation has no such option"):
        table_commands.image_argv(ENV, image_job("ideogram4", steps=20))
    with pytest.raises(ValueError, match="Krea 2 generation has no LyCORIS path"):
        table_commands.image_argv(ENV, image_job("krea2", loras=(("l", 1.0),), lycoris=True))
    with pytest.raises(ValueError, match="fp8: Krea 2 generation has no such option"):
        table_commands.image_argv(ENV, image_job("krea2", fp8=("fp8",)))


def test_video_generation_commands():
    k5 = image_job("kandinsky5", frames=17, attention="sage", fp8=("fp8",), images=(("--i", ("s.png",)),))
    f = flags(table_commands.image_argv(ENV, k5))
    assert f["--output"] == ["/out/run/kandinsky5.mp4"] and f["--frames"] == ["17"] and "--sage_attn" in f
    assert "--fp8_base" in f and f["--i"] == ["s.png"] and table_commands.output_path(k5).suffix == ".mp4"
    one = replace(k5, frames=1)
    assert table_commands.output_path(one) == Path("/out/run/kandinsky5.png")
    with pytest.raises(ValueError, match=r"frames=20 must be 4\*N\+1"):
        table_commands.image_argv(ENV, image_job("hunyuan_video_1_5", frames=20))
    hv = flags(table_commands.image_argv(ENV, image_job("hunyuan_video_1_5", frames=21, width=848, height=480)))
    assert hv["--video_size"] == ["480", "848"] and hv["--output_type"] == ["images"]
    assert hv["--video_length"] == ["21"] and hv["--fps"] == ["24"]


# --- helper tools -----------------------------------------------------------------------


def test_caption_and_extract_commands(tmp_path):
    text = tool_commands.caption_argv(ENV, str(tmp_path), "qwen.st", "text", fp8_vl=True, prompt="Describe it.")
    assert flags(text)["--output_format"] == ["text"] and "--output_file" not in text and "--fp8_vl" in text
    with pytest.raises(ValueError, match="output_file is empty: output_format jsonl"):
        tool_commands.caption_argv(ENV, str(tmp_path), "q", "jsonl")
    extract = tool_commands.extract_lora_argv(ENV, "a", "b", "o.safetensors", 8, 0.99, "", "default")
    assert flags(extract)["--dim"] == ["8"] and "--save_precision" not in extract and "--device" not in extract
    with pytest.raises(ValueError, match=r"clamp_quantile=1.5 must be in \(0, 1\]"):
        tool_commands.extract_lora_argv(ENV, "a", "b", "o", 8, 1.5)


# --- samples ----------------------------------------------------------------------------


def test_sample_watch_reports_each_new_sample_once(tmp_path):
    folder = samples.sample_folder(tmp_path)
    folder.mkdir()
    old = folder / "run_e000001_00_20260101000000_000.png"
    Image.new("RGB", (32, 16)).save(old)
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # an earlier run's sample
    watch = samples.SampleWatch(folder, "run")
    assert watch.poll(force=True) == []
    new = folder / "run_e000002_00_20260101000100_000.png"
    Image.new("RGB", (640, 320), (255, 0, 0)).save(new)
    Image.new("RGB", (8, 8)).save(folder / "other_e000002_00_20260101000100_000.png")  # another run's name
    (folder / "run_e000003_00_20260101000200.mp4").write_bytes(b"")  # being written
    found = watch.poll(force=True)
    assert [p for p, _ in found] == [new] and found[0][1].size == (512, 256)  # a preview at most 512 a side
    assert watch.poll(force=True) == []
    assert watch.poll() == []  # polled again within 0.5 s: nothing is read
