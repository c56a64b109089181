"""The MusubiTuner nodes inside a real ComfyUI, driving the fake musubi CLI end to end."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_musubi.fakeroot import FAKE_SITE, LYCORIS_SITE, hanging_training_prompt, make_fake_workspace
from PIL import Image

from comfy_server import process_alive, widget_inputs
from speedkit.musubi import arch as archs

pytestmark = pytest.mark.integration

EXPECTED = {
    "Environment", "DatasetConfig", "DatasetConfigLoader", "DatasetViewer", "CacheLatents", "CacheTextEncoder",
    "TrainingConfig", "OptimizerConfig", "SamplingConfig", "MemoryOptimizer", "TrainLoRA_HunyuanVideo",
    "TrainLoRA_Wan", "TrainLoRA_FramePack", "GenerateVideo_HunyuanVideo", "GenerateVideo_Wan",
    "GenerateVideo_FramePack", "ConvertLoRA", "MergeLoRA", "PostHocEMA", "VideoInput", "VideoOutput",
    "BatchProcessor", "TrainingMonitor", "ResourceMonitor", "CaptionImages", "ExtractLoRA_QwenImage",
    *(f"TrainLoRA_{s.node_name}" for s in archs.ARCHS.values()),
    *(f"Generate{'Video' if s.gen.video else 'Image'}_{s.node_name}" for s in archs.ARCHS.values() if s.gen),
    *(f"{t.function}_{s.node_name}" for s in archs.ARCHS.values() for t in s.trainers),
}  # fmt: skip


def test_all_musubi_nodes_are_registered(comfy_server):
    info = comfy_server.object_info()
    ids = {k.removeprefix("MusubiTuner_") for k in info if k.startswith("MusubiTuner_")}
    assert ids == EXPECTED
    for node_id in info:
        if node_id.startswith("MusubiTuner_"):
            assert info[node_id]["category"].startswith("MusubiTuner/")


widgets = widget_inputs


@pytest.fixture
def fake_setup(comfy_server, tmp_path):
    return make_fake_workspace(tmp_path, ("dit.safetensors", "vae.safetensors", "t5.pth"))


def test_wan_training_graph_runs_the_fake_musubi(comfy_server, fake_setup, tmp_path):
    root, data, models = fake_setup
    info = comfy_server.object_info()
    out_dir = tmp_path / "loras"
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_STEPS_PER_EPOCH=2")},
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), cache_directory=str(tmp_path / "cache"),
            name="itest")},
        "3": {"class_type": "MusubiTuner_CacheLatents", "inputs": widgets(
            info, "MusubiTuner_CacheLatents", musubi_env=["1", 0], dataset=["2", 0], architecture="wan",
            vae=str(models / "vae.safetensors"))},
        "4": {"class_type": "MusubiTuner_CacheTextEncoder", "inputs": widgets(
            info, "MusubiTuner_CacheTextEncoder", musubi_env=["1", 0], dataset=["3", 0], architecture="wan",
            text_encoder1=str(models / "t5.pth"))},
        "5": {"class_type": "MusubiTuner_TrainingConfig", "inputs": widgets(
            info, "MusubiTuner_TrainingConfig", max_train_epochs=3)},
        "6": {"class_type": "MusubiTuner_TrainLoRA_Wan", "inputs": widgets(
            info, "MusubiTuner_TrainLoRA_Wan", musubi_env=["1", 0], dataset=["4", 0], training_config=["5", 0],
            dit=str(models / "dit.safetensors"), task="t2v-1.3B", output_name="itest_lora", output_dir=str(out_dir))},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=120)
    assert (out_dir / "itest_lora.safetensors").is_file()
    assert (out_dir / "itest_lora-000001.safetensors").is_file()
    log = (out_dir / "itest_lora_train.log").read_text()
    assert "wan_train_network.py" in log.splitlines()[0] and "model saved." in log
    assert "--task t2v-1.3B" in log.splitlines()[0] and "--network_module networks.lora_wan" in log.splitlines()[0]
    # the output folder is now one of ComfyUI's LoRA folders
    loras = comfy_server.get("/models/loras")
    assert "itest_lora.safetensors" in loras
    # queued again unchanged: nothing is retrained or re-cached while the LoRA exists
    log_mtime = (out_dir / "itest_lora_train.log").stat().st_mtime_ns
    cache_log = next((comfy_server.output_dir / "musubi" / "datasets").glob("itest_wan_latents.log"))
    cache_mtime = cache_log.stat().st_mtime_ns
    comfy_server.run_prompt(prompt, timeout=120)
    assert (out_dir / "itest_lora_train.log").stat().st_mtime_ns == log_mtime
    assert cache_log.stat().st_mtime_ns == cache_mtime
    # a new training image re-runs the caches and the training
    Image.new("RGB", (64, 48), (0, 0, 200)).save(data / "img9.png")
    (data / "img9.txt").write_text("a new image")
    comfy_server.run_prompt(prompt, timeout=120)
    assert cache_log.stat().st_mtime_ns != cache_mtime
    assert (out_dir / "itest_lora_train.log").stat().st_mtime_ns != log_mtime


def test_failed_training_is_an_error_with_the_log(comfy_server, fake_setup, tmp_path):
    root, data, models = fake_setup
    info = comfy_server.object_info()
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_MODE=fail\nFAKE_MUSUBI_EXIT=7")},
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name="itest_fail")},
        "3": {"class_type": "MusubiTuner_TrainLoRA_HunyuanVideo", "inputs": widgets(
            info, "MusubiTuner_TrainLoRA_HunyuanVideo", musubi_env=["1", 0], dataset=["2", 0],
            dit=str(models / "dit.safetensors"), output_name="fail_lora", output_dir=str(tmp_path / "o"))},
    }  # fmt: skip
    with pytest.raises(RuntimeError, match="MusubiRunError"):
        comfy_server.run_prompt(prompt, timeout=120)
    log = tmp_path / "o" / "fail_lora_train.log"
    assert "CUDA out of memory" in log.read_text()
    history = comfy_server.get("/history")  # the full message (run_prompt keeps only its tail)
    errors = [m[1] for h in history.values() for m in h["status"]["messages"] if m[0] == "execution_error"]
    message = next(e["exception_message"] for e in errors if "fail_lora" in e["exception_message"])
    assert "exited with code 7" in message and f"Full log: {log}" in message
    assert "Last " in message and "CUDA out of memory" in message


def test_bad_environment_is_a_clear_error(comfy_server, tmp_path):
    info = comfy_server.object_info()
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(tmp_path / "nope"), python=sys.executable)},
        "2": {"class_type": "MusubiTuner_TrainingMonitor", "inputs": widgets(
            info, "MusubiTuner_TrainingMonitor", log_path=str(tmp_path / "x.log"))},
    }  # fmt: skip
    # node 1 is not an output and not linked: nothing runs; link it through a cache node instead
    del prompt["2"]
    prompt["2"] = {"class_type": "MusubiTuner_ConvertLoRA", "inputs": widgets(
        info, "MusubiTuner_ConvertLoRA", musubi_env=["1", 0], lora=str(tmp_path / "a.safetensors"))}  # fmt: skip
    with pytest.raises(RuntimeError, match="is not a folder: clone it"):
        comfy_server.run_prompt(prompt, timeout=60)


def test_cancel_kills_the_training_tree(comfy_server, fake_setup, tmp_path):
    root, data, models = fake_setup
    info = comfy_server.object_info()
    pid_file = tmp_path / "pids"
    prompt = hanging_training_prompt(
        info, root, data, models / "dit.safetensors", tmp_path / "o", pid_file, "itest_cancel"
    )
    import threading

    errors = []
    t = threading.Thread(target=lambda: _run_catch(comfy_server, prompt, errors))
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pid_file.exists() and len(pid_file.read_text().split()) >= 2):
        time.sleep(0.1)
    time.sleep(0.5)
    t0 = time.monotonic()
    import urllib.request

    # POST /interrupt answers with an empty body (comfy_server.interrupt expects JSON)
    urllib.request.urlopen(
        urllib.request.Request(comfy_server.url + "/interrupt", data=b"{}", method="POST"), timeout=10
    )
    pids = [int(p) for p in pid_file.read_text().split()]
    while time.monotonic() - t0 < 5 and any(process_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if process_alive(p)], "musubi processes survived Cancel"
    t.join(60)


def _run_catch(server, prompt, errors):
    try:
        server.run_prompt(prompt, timeout=90)
    except Exception as exc:  # noqa: BLE001 - an interrupted prompt may report an error
        errors.append(exc)


def _history_outputs(comfy_server, entry: dict) -> dict:
    return entry.get("outputs", {})


def test_generate_with_lora_and_batch_prompts_to_webp(comfy_server, fake_setup, tmp_path):
    root, _, models = fake_setup
    info = comfy_server.object_info()
    lora = tmp_path / "style.safetensors"
    from fake_musubi.fake_cli import LORA_KEYS, write_safetensors

    write_safetensors(str(lora), LORA_KEYS)
    argv_file = tmp_path / "argv.json"
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_ARGV={argv_file}")},
        "2": {"class_type": "MusubiTuner_BatchProcessor", "inputs": {"prompts": "a red fox\n# skip\na blue bird"}},
        "3": {"class_type": "MusubiTuner_GenerateVideo_Wan", "inputs": widgets(
            info, "MusubiTuner_GenerateVideo_Wan", musubi_env=["1", 0], prompt=["2", 0], task="t2v-1.3B",
            dit=str(models / "dit.safetensors"), vae=str(models / "vae.safetensors"), t5=str(models / "t5.pth"),
            width=64, height=48, frames=5, steps=3, seed=7, lora_1=str(lora), strength_1=0.8)},
        "4": {"class_type": "MusubiTuner_VideoOutput", "inputs": widgets(
            info, "MusubiTuner_VideoOutput", frames=["3", 0], fps=8.0, format="webp", filename_prefix="itest/clip")},
    }  # fmt: skip
    entry = comfy_server.run_prompt(prompt, timeout=120)
    previews = _history_outputs(comfy_server, entry)["4"]["images"]
    assert len(previews) == 2  # one video per prompt of the list
    saved = comfy_server.output_dir / previews[0]["subfolder"] / previews[0]["filename"]
    from speedkit.musubi import media

    frames, fps = media.read_video(saved)
    assert frames.shape == (5, 48, 64, 3) and fps == pytest.approx(8, rel=0.05)
    argv = json.loads(argv_file.read_text())
    assert argv[0] == "wan_generate_video" and argv[argv.index("--lora_multiplier") + 1] == "0.8"
    assert argv[argv.index("--video_size") + 1 : argv.index("--video_size") + 3] == ["48", "64"]
    assert argv[argv.index("--prompt") + 1] in ("a red fox", "a blue bird")
    # the one output type for which musubi's generate scripts save PNG frames (see test_musubi_real_outputs.py)
    assert argv[argv.index("--output_type") + 1] == "images"


def test_one_frame_generation_returns_its_frame(comfy_server, fake_setup, tmp_path):
    """Wan with one frame saves its PNG straight into the run folder, not in a frame folder."""
    root, _, models = fake_setup
    info = comfy_server.object_info()
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}")},
        "2": {"class_type": "MusubiTuner_GenerateVideo_Wan", "inputs": widgets(
            info, "MusubiTuner_GenerateVideo_Wan", musubi_env=["1", 0], prompt="a fox", task="t2v-1.3B",
            dit=str(models / "dit.safetensors"), vae=str(models / "vae.safetensors"), t5=str(models / "t5.pth"),
            width=64, height=48, frames=1, steps=2, seed=11)},
        "3": {"class_type": "MusubiTuner_VideoOutput", "inputs": widgets(
            info, "MusubiTuner_VideoOutput", frames=["2", 0], fps=8.0, format="webp", filename_prefix="itest/one")},
    }  # fmt: skip
    entry = comfy_server.run_prompt(prompt, timeout=120)
    preview = _history_outputs(comfy_server, entry)["3"]["images"][0]
    from speedkit.musubi import media

    frames, _ = media.read_video(comfy_server.output_dir / preview["subfolder"] / preview["filename"])
    assert frames.shape == (1, 48, 64, 3)


def test_wan22_generate_applies_each_lora_to_its_dit(comfy_server, fake_setup, tmp_path):
    root, _, models = fake_setup
    info = comfy_server.object_info()
    from fake_musubi.fake_cli import LORA_KEYS, write_safetensors

    for name in ("both", "high", "low"):
        write_safetensors(str(tmp_path / f"{name}.safetensors"), LORA_KEYS)
    (models / "high_dit.safetensors").write_bytes(b"x")
    argv_file = tmp_path / "argv.json"
    node = widgets(
        info, "MusubiTuner_GenerateVideo_Wan", musubi_env=["1", 0], prompt="a fox", task="t2v-A14B",
        dit=str(models / "dit.safetensors"), dit_high_noise=str(models / "high_dit.safetensors"),
        vae=str(models / "vae.safetensors"), t5=str(models / "t5.pth"), width=64, height=48, frames=5, steps=2,
        seed=3, lora_1=str(tmp_path / "both.safetensors"), strength_1=0.8, lora_1_target="both",
        lora_2=str(tmp_path / "high.safetensors"), strength_2=0.6, lora_2_target="dit_high_noise",
        lora_3=str(tmp_path / "low.safetensors"), strength_3=1.0,
    )  # fmt: skip
    assert node["lora_3_target"] == "dit"  # the default
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_ARGV={argv_file}")},
        "2": {"class_type": "MusubiTuner_GenerateVideo_Wan", "inputs": node},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=120)
    argv = json.loads(argv_file.read_text())

    def values(flag: str) -> list[str]:
        i = argv.index(flag) + 1
        return argv[i : next((j for j in range(i, len(argv)) if argv[j].startswith("--")), len(argv))]

    assert [Path(p).stem for p in values("--lora_weight")] == ["both", "low"]
    assert [float(m) for m in values("--lora_multiplier")] == [0.8, 1.0]
    assert [Path(p).stem for p in values("--lora_weight_high_noise")] == ["both", "high"]
    assert [float(m) for m in values("--lora_multiplier_high_noise")] == [0.8, 0.6]

    # an API prompt saved before the target inputs existed: every LoRA on `dit`, as before
    prompt["2"]["inputs"] = {k: v for k, v in node.items() if not k.endswith("_target")}
    prompt["2"]["inputs"]["seed"] = 4  # a new prompt, not a cached result
    comfy_server.run_prompt(prompt, timeout=120)
    argv = json.loads(argv_file.read_text())
    assert [Path(p).stem for p in values("--lora_weight")] == ["both", "high", "low"]
    assert not any(a.startswith("--lora") and a.endswith("_high_noise") for a in argv)

    # a high-noise target without the high-noise DiT: named, nothing run
    argv_file.unlink()
    prompt["2"]["inputs"] = {**node, "dit_high_noise": "", "task": "t2v-14B", "seed": 5}
    with pytest.raises(RuntimeError, match="a LoRA targets dit_high_noise, but dit_high_noise is empty"):
        comfy_server.run_prompt(prompt, timeout=60)
    assert not argv_file.exists()


def test_loha_lokr_files_in_every_lora_node(comfy_server, fake_setup, tmp_path):
    """LoHa/LoKr are LoRA files too; each node does what its musubi script can do with them."""
    root, _, models = fake_setup
    info = comfy_server.object_info()
    from fake_musubi.fake_cli import write_safetensors

    loha, lokr = tmp_path / "style_loha.safetensors", tmp_path / "style_lokr.safetensors"
    module = "lora_unet_blocks_0_self_attn_q"
    write_safetensors(str(loha), [f"{module}.hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b")] + [f"{module}.alpha"])
    write_safetensors(str(lokr), [f"{module}.lokr_w1", f"{module}.lokr_w2", f"{module}.alpha"])
    argv_file = tmp_path / "argv.json"
    with_lycoris = f"PYTHONPATH={FAKE_SITE}{os.pathsep}{LYCORIS_SITE}\nFAKE_MUSUBI_ARGV={argv_file}"
    env_node = {
        "class_type": "MusubiTuner_Environment",
        "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable, extra_env=with_lycoris
        ),
    }
    m = {k: str(models / f) for k, f in (("dit", "dit.safetensors"), ("vae", "vae.safetensors"), ("te", "t5.pth"))}

    def run(node_id: str, **inputs) -> list[str]:
        prompt = {
            "1": env_node,
            "2": {"class_type": node_id, "inputs": widgets(info, node_id, musubi_env=["1", 0], **inputs)},
        }
        comfy_server.run_prompt(prompt, timeout=120)
        return json.loads(argv_file.read_text())

    # HunyuanVideo generation: hv_generate_video.py applies LoHa/LoKr only through LyCORIS
    hv = dict(prompt="a fox", dit=m["dit"], vae=m["vae"], text_encoder1=m["te"], text_encoder2=m["te"], width=64,
              height=48, frames=5, steps=2, seed=1, lora_1=str(loha))  # fmt: skip
    argv = run("MusubiTuner_GenerateVideo_HunyuanVideo", **hv)
    assert argv[0] == "hv_generate_video" and "--lycoris" in argv
    # Wan: wan_generate_video.py merges musubi's LoHa/LoKr itself
    argv = run("MusubiTuner_GenerateVideo_Wan", prompt="a fox", task="t2v-1.3B", dit=m["dit"], vae=m["vae"],
               t5=m["te"], width=64, height=48, frames=5, steps=2, seed=1, lora_1=str(lokr))  # fmt: skip
    assert argv[0] == "wan_generate_video" and "--lycoris" not in argv and str(lokr) in argv
    # FLUX.1 Kontext merge: --lycoris for a LoKr (its plain path merges lora_down/up only)
    out = tmp_path / "merged" / "kontext.safetensors"
    argv = run("MusubiTuner_MergeLoRA", architecture="flux_kontext", dit=m["dit"], vae=m["vae"], text_encoder1=m["te"],
               text_encoder2=m["te"], lora_1=str(lokr), output_path=str(out))  # fmt: skip
    assert argv[0] == "flux_kontext_generate_image" and "--lycoris" in argv and out.is_file()
    # Convert: convert_lora.py maps hada_* tensors; auto direction from the layout
    argv = run("MusubiTuner_ConvertLoRA", lora=str(loha))
    assert argv[0] == "convert_lora" and argv[argv.index("--target") + 1] == "other"

    # refused before musubi starts, naming the input and why
    argv_file.unlink()
    bad = [
        ("MusubiTuner_MergeLoRA", dict(dit=m["dit"], lora_1=str(loha), output_path=str(tmp_path / "hv.safetensors")),
         "lora_1 is a LoHa: musubi's merge_lora.py \\(HunyuanVideo\\) merges plain LoRA only"),
        ("MusubiTuner_PostHocEMA", dict(checkpoints=f"{loha}\n{lokr}", output_path=str(tmp_path / "e.safetensors")),
         "checkpoints line 2 does not have the same tensors as checkpoints line 1"),
    ]  # fmt: skip
    for node_id, inputs, message in bad:
        with pytest.raises(RuntimeError, match=message):
            run(node_id, **inputs)
        assert not argv_file.exists()
    # no LyCORIS in musubi's venv: HunyuanVideo + LoHa says what to install
    env_node["inputs"]["extra_env"] = f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_ARGV={argv_file}"
    with pytest.raises(RuntimeError, match="lycoris is not installed .*pip install lycoris-lora"):
        run("MusubiTuner_GenerateVideo_HunyuanVideo", **{**hv, "seed": 2})
    assert not argv_file.exists()


@pytest.mark.parametrize("fmt", ["mp4", "webm", "gif", "webp"])
def test_video_output_encodes_and_previews(comfy_server, tmp_path, fmt):
    from speedkit.musubi import media

    if fmt in ("mp4", "webm") and not media.has_pyav():
        pytest.skip("PyAV is not installed in the test Python: the saved video cannot be decoded here")
    info = comfy_server.object_info()
    frames = tmp_path / "frames.webp"  # 6 frames, 48x64, each a different colour
    src = np.stack([np.full((48, 64, 3), (40 * i, 200 - 30 * i, 90), np.uint8) for i in range(6)])
    media.write_video(src, frames, fps=6, fmt="webp", quality=100)
    prompt = {
        "1": {"class_type": "MusubiTuner_VideoInput", "inputs": widgets(
            info, "MusubiTuner_VideoInput", video_path=str(frames))},
        "2": {"class_type": "MusubiTuner_VideoOutput", "inputs": widgets(
            info, "MusubiTuner_VideoOutput", frames=["1", 0], fps=6.0, format=fmt, quality=90,
            filename_prefix=f"itest/out_{fmt}")},
    }  # fmt: skip
    entry = comfy_server.run_prompt(prompt, timeout=120)
    ui = _history_outputs(comfy_server, entry)["2"]
    assert ui["images"][0]["filename"].endswith(f".{fmt}") and ui["images"][0]["type"] == "output"
    # the front end shows a <video> only for animated outputs that are not .webp/.png
    assert ui["animated"] == [fmt in ("mp4", "webm")]
    saved = comfy_server.output_dir / ui["images"][0]["subfolder"] / ui["images"][0]["filename"]
    back, fps = media.read_video(saved)
    assert back.shape == src.shape and fps == pytest.approx(6, rel=0.05)
    if fmt != "gif":  # GIF's palette may shift colours a little more
        assert np.abs(back.astype(int) - src.astype(int)).mean() < 4


def test_convert_lora_auto_direction_and_not_a_lora(comfy_server, fake_setup, tmp_path):
    root, _, models = fake_setup
    info = comfy_server.object_info()
    from fake_musubi.fake_cli import LORA_KEYS, write_safetensors

    lora = tmp_path / "mine.safetensors"
    write_safetensors(str(lora), LORA_KEYS)
    argv_file = tmp_path / "argv.json"
    env_node = {"class_type": "MusubiTuner_Environment", "inputs": widgets(
        info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
        extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_ARGV={argv_file}")}  # fmt: skip
    prompt = {
        "1": env_node,
        "2": {"class_type": "MusubiTuner_ConvertLoRA", "inputs": widgets(
            info, "MusubiTuner_ConvertLoRA", musubi_env=["1", 0], lora=str(lora))},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=60)
    argv = json.loads(argv_file.read_text())
    assert argv[argv.index("--target") + 1] == "other"  # musubi keys -> other
    assert (tmp_path / "mine_other.safetensors").is_file()
    ckpt = tmp_path / "model.safetensors"
    write_safetensors(str(ckpt), ["blocks.0.weight"])
    prompt["2"]["inputs"]["lora"] = str(ckpt)
    with pytest.raises(RuntimeError, match="is not a LoRA"):
        comfy_server.run_prompt(prompt, timeout=60)


def test_merge_lora_per_architecture(comfy_server, fake_setup, tmp_path):
    root, _, models = fake_setup
    info = comfy_server.object_info()
    from fake_musubi.fake_cli import LORA_KEYS, write_safetensors

    lora = tmp_path / "mine.safetensors"
    write_safetensors(str(lora), LORA_KEYS)
    argv_file = tmp_path / "argv.json"
    paths = f"{FAKE_SITE}{os.pathsep}{LYCORIS_SITE}"
    env_node = {"class_type": "MusubiTuner_Environment", "inputs": widgets(
        info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
        extra_env=f"PYTHONPATH={paths}\nFAKE_MUSUBI_ARGV={argv_file}")}  # fmt: skip
    # a prompt saved before `architecture` existed: only the old inputs, HunyuanVideo's merge_lora.py runs
    old = {k: v for k, v in widgets(info, "MusubiTuner_MergeLoRA").items()
           if k in ("dit", "lora_1", "strength_1", "lora_2", "strength_2", "lora_3", "strength_3", "output_path",
                    "device")}  # fmt: skip
    out = tmp_path / "merged" / "hv.safetensors"
    old.update(dit=str(models / "dit.safetensors"), lora_1=str(lora), strength_1=0.8, output_path=str(out))
    prompt = {"1": env_node, "2": {"class_type": "MusubiTuner_MergeLoRA", "inputs": {**old, "musubi_env": ["1", 0]}}}
    comfy_server.run_prompt(prompt, timeout=60)
    argv = json.loads(argv_file.read_text())
    assert argv[0] == "merge_lora" and argv[argv.index("--lora_multiplier") + 1] == "0.8" and out.is_file()

    # Wan2.2 i2v: T5 + VAE, batch mode with a prompt file (removed afterwards), LyCORIS path
    out = tmp_path / "merged" / "wan.safetensors"
    node = {**old, "musubi_env": ["1", 0], "architecture": "wan", "task": "i2v-A14B", "output_path": str(out),
            "text_encoder1": str(models / "t5.pth"), "vae": str(models / "vae.safetensors"),
            "include_pattern": "self_attn"}  # fmt: skip
    prompt["2"] = {"class_type": "MusubiTuner_MergeLoRA", "inputs": node}
    comfy_server.run_prompt(prompt, timeout=60)
    argv = json.loads(argv_file.read_text())
    assert argv[0] == "wan_generate_video" and "--lycoris" in argv and argv[argv.index("--task") + 1] == "i2v-A14B"
    assert argv[argv.index("--include_patterns") + 1] == "self_attn"
    assert out.is_file() and not Path(argv[argv.index("--from_file") + 1]).exists()

    # Qwen-Image: musubi crashes after "Merged model saved" (v0.3.4); the merge still counts
    out = tmp_path / "merged" / "qwen.safetensors"
    prompt["2"]["inputs"] = {**old, "musubi_env": ["1", 0], "architecture": "qwen_image", "output_path": str(out),
                             "text_encoder1": str(models / "t5.pth"), "vae": str(models / "vae.safetensors")}  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=60)
    assert json.loads(argv_file.read_text())[0] == "qwen_image_generate_image" and out.is_file()

    # FLUX.2 [klein]: AE + text encoder, batch mode, the model version passed on
    out = tmp_path / "merged" / "flux2.safetensors"
    prompt["2"]["inputs"] = {**old, "musubi_env": ["1", 0], "architecture": "flux_2", "output_path": str(out),
                             "text_encoder1": str(models / "t5.pth"), "vae": str(models / "vae.safetensors"),
                             "model_version": "klein-4b"}  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=60)
    argv = json.loads(argv_file.read_text())
    assert argv[0] == "flux_2_generate_image" and argv[argv.index("--model_version") + 1] == "klein-4b"
    assert "--from_file" in argv and "--lycoris" not in argv and out.is_file()

    # bad input: the text encoder Wan loads before merging is missing -> named, nothing is run
    argv_file.unlink()
    prompt["2"]["inputs"] = {**node, "text_encoder1": "", "output_path": str(tmp_path / "merged" / "x.safetensors")}
    with pytest.raises(RuntimeError, match="loads text_encoder1 before it merges: fill those inputs"):
        comfy_server.run_prompt(prompt, timeout=60)
    assert not argv_file.exists()

    # no LyCORIS in musubi's venv: said before musubi starts, with the package to install
    prompt["1"]["inputs"]["extra_env"] = f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_ARGV={argv_file}"
    prompt["2"]["inputs"] = {**node, "output_path": str(tmp_path / "merged" / "y.safetensors")}
    with pytest.raises(RuntimeError, match="lycoris is not installed .*pip install lycoris-lora"):
        comfy_server.run_prompt(prompt, timeout=60)
    assert not argv_file.exists()


def test_training_monitor_reads_tensorboard_files(comfy_server, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed in the test Python: cannot write event files"
    )
    from torch.utils.tensorboard import SummaryWriter

    info = comfy_server.object_info()
    logs = tmp_path / "tb" / "logs"
    for name, n in (("lora_20260101120000", 9), ("lora_20260102120000", 6)):  # musubi's layout, two runs
        writer = SummaryWriter(str(logs / name / "network_train"))
        writer.add_hparams({"network_dim": 32}, metric_dict={})
        for step in range(1, n + 1):
            writer.add_scalar("loss/current", 1.0 / step, global_step=step)
            writer.add_scalar("lr/unet", 1e-4, global_step=step)
        writer.add_scalar("loss/epoch", 0.3, global_step=1)
        writer.close()
        time.sleep(0.05)
    prompt = {
        "1": {"class_type": "MusubiTuner_TrainingMonitor", "inputs": widgets(
            info, "MusubiTuner_TrainingMonitor", tensorboard_dir=str(logs), width=256, height=128)},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    }  # fmt: skip
    try:
        entry = comfy_server.run_prompt(prompt, timeout=60)
    except RuntimeError as exc:  # ComfyUI's Python (COMFYUI_PYTHON) may lack tensorboard: then it must say so
        assert "needs the tensorboard package" in str(exc) and "pip install tensorboard" in str(exc)
        return
    summary = entry["outputs"]["2"]["text"][0]
    assert "loss/current: 6 points, last 0.16667 at step 6" in summary  # the newest run only
    assert "run lora_20260102120000 (the newest of 2" in summary and "loss/epoch: last 0.3 at epoch 1" in summary


def test_dataset_loader_rejects_unknown_keys_and_viewer_reports(comfy_server, fake_setup, tmp_path):
    _, data, _ = fake_setup
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nimage_directory = "{data}"\nflip_aug = true\n'
    )
    prompt = {
        "1": {"class_type": "MusubiTuner_DatasetConfigLoader", "inputs": {"toml_path": str(bad), "check_files": True}},
        "2": {"class_type": "MusubiTuner_DatasetViewer", "inputs": {"dataset": ["1", 0], "max_items": 4, "size": 64}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    with pytest.raises(RuntimeError, match="flip_aug: unknown key"):
        comfy_server.run_prompt(prompt, timeout=60)
    good = tmp_path / "good.toml"
    good.write_text(
        f'[general]\ncaption_extension = ".txt"\nresolution = [64, 48]\n\n[[datasets]]\nimage_directory = "{data}"\n'
    )
    prompt["1"]["inputs"]["toml_path"] = str(good)
    entry = comfy_server.run_prompt(prompt, timeout=60)
    assert len(entry["outputs"]["3"]["images"]) == 2


def test_resource_monitor_without_nvidia_smi_says_so(comfy_server):
    entry = comfy_server.run_prompt(
        {"1": {"class_type": "MusubiTuner_ResourceMonitor", "inputs": {"fail_without_nvidia_smi": False}}}, timeout=60
    )
    text = entry["outputs"]["1"]["text"][0]
    assert "nvidia-smi was not found" in text or "GPU 0" in text


def test_live_log_events_reach_the_browser(comfy_server, fake_setup, tmp_path):
    import asyncio

    import aiohttp

    root, data, models = fake_setup
    info = comfy_server.object_info()
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_STEP_SLEEP=0.05")},
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name="itest_ws")},
        "3": {"class_type": "MusubiTuner_TrainLoRA_FramePack", "inputs": widgets(
            info, "MusubiTuner_TrainLoRA_FramePack", musubi_env=["1", 0], dataset=["2", 0],
            dit=str(models / "dit.safetensors"), vae=str(models / "vae.safetensors"),
            text_encoder1=str(models / "t5.pth"), text_encoder2=str(models / "t5.pth"),
            image_encoder=str(models / "vae.safetensors"), output_name="ws_lora", output_dir=str(tmp_path / "o"))},
    }  # fmt: skip

    async def collect() -> list[dict]:
        events: list[dict] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(comfy_server.url.replace("http", "ws") + "/ws?clientId=itest") as ws:
                loop = asyncio.get_running_loop()
                job = loop.run_in_executor(None, comfy_server.run_prompt, prompt, 120)
                while not job.done():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data_ = json.loads(msg.data)
                        if data_.get("type") == "speedkit.musubi.log":
                            events.append(data_["data"])
                await job
        return events

    events = asyncio.run(collect())
    assert events and all(e["node"] == "3" for e in events)
    assert events[0].get("reset") and "fpack_train_network.py" in events[0]["lines"][0]
    lines = [line for e in events for line in e.get("lines", [])]
    assert any(line.startswith("steps:") for line in lines) and any("model saved." in line for line in lines)
    summaries = [e.get("summary", "") for e in events]
    assert any("step 64/64" in s for s in summaries), summaries  # 16 default epochs x 4 steps


def test_config_nodes_reach_the_hunyuan_command_line(comfy_server, fake_setup, tmp_path):
    root, data, models = fake_setup
    info = comfy_server.object_info()
    argv_file = tmp_path / "argv.json"
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_ARGV={argv_file}")},
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widgets(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name="itest_cfg")},
        "3": {"class_type": "MusubiTuner_TrainingConfig", "inputs": widgets(
            info, "MusubiTuner_TrainingConfig", network_dim=8, network_alpha=4.0, max_train_epochs=2,
            discrete_flow_shift=7.0, attention="flash", network_type="loha")},
        "4": {"class_type": "MusubiTuner_OptimizerConfig", "inputs": widgets(
            info, "MusubiTuner_OptimizerConfig", optimizer_type="Adafactor", lr_scheduler="cosine",
            lr_warmup_steps=0.1, optimizer_args="relative_step=False")},
        "5": {"class_type": "MusubiTuner_SamplingConfig", "inputs": widgets(
            info, "MusubiTuner_SamplingConfig", prompts="a cat", sample_every_n_epochs=1, frames=25)},
        "6": {"class_type": "MusubiTuner_MemoryOptimizer", "inputs": widgets(
            info, "MusubiTuner_MemoryOptimizer", mode="manual", blocks_to_swap=12, fp8_base=True,
            fp8_text_encoder=True, vae_chunk_size=16)},
        "7": {"class_type": "MusubiTuner_TrainLoRA_HunyuanVideo", "inputs": widgets(
            info, "MusubiTuner_TrainLoRA_HunyuanVideo", musubi_env=["1", 0], dataset=["2", 0],
            training_config=["3", 0], optimizer_config=["4", 0], sampling_config=["5", 0], memory_config=["6", 0],
            dit=str(models / "dit.safetensors"), vae=str(models / "vae.safetensors"),
            text_encoder1=str(models / "t5.pth"), text_encoder2=str(models / "t5.pth"),
            output_name="cfg_lora", output_dir=str(tmp_path / "o"))},
    }  # fmt: skip
    comfy_server.run_prompt(prompt, timeout=120)
    argv = json.loads(argv_file.read_text())

    def val(flag):
        return argv[argv.index(flag) + 1]

    assert argv[0] == "hv_train_network"
    assert val("--network_module") == "networks.loha" and val("--network_dim") == "8" and val("--network_alpha") == "4"
    assert "--flash_attn" in argv and val("--discrete_flow_shift") == "7" and val("--max_train_epochs") == "2"
    assert val("--optimizer_type") == "Adafactor" and val("--optimizer_args") == "relative_step=False"
    assert val("--lr_scheduler") == "cosine" and val("--lr_warmup_steps") == "0.1"
    assert val("--blocks_to_swap") == "12" and "--fp8_base" in argv and "--fp8_llm" in argv
    assert val("--vae_chunk_size") == "16" and val("--sample_every_n_epochs") == "1"
    prompts = (tmp_path / "o" / "cfg_lora_sample_prompts.txt").read_text()
    assert val("--sample_prompts").endswith("cfg_lora_sample_prompts.txt") and prompts.strip() == "a cat --f 25"


def test_nan_float_and_unreadable_video_are_clear_errors(comfy_server, tmp_path):
    """NaN passes ComfyUI's own min/max validation; a text file named .mp4 is not PyAV's raw exception."""
    from speedkit.musubi import media

    info = comfy_server.object_info()
    src = tmp_path / "frames.webp"
    media.write_video(np.zeros((2, 16, 16, 3), np.uint8), src, fps=4, fmt="webp")
    prompt = {
        "1": {"class_type": "MusubiTuner_VideoInput", "inputs": widgets(
            info, "MusubiTuner_VideoInput", video_path=str(src))},
        "2": {"class_type": "MusubiTuner_VideoOutput", "inputs": widgets(
            info, "MusubiTuner_VideoOutput", frames=["1", 0], fps=float("nan"), filename_prefix="itest/nan")},
    }  # fmt: skip
    with pytest.raises(RuntimeError, match="fps: nan is not a finite number; set it to a number such as 16.0"):
        comfy_server.run_prompt(prompt, timeout=60)
    assert not list((comfy_server.output_dir / "itest").glob("nan_*"))
    if not media.has_pyav():
        return  # without PyAV an .mp4 is refused before it is decoded
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video\n")
    prompt["1"]["inputs"]["video_path"] = str(fake)
    prompt["2"]["inputs"]["fps"] = 8.0
    with pytest.raises(RuntimeError, match=r"video_path: '.*notes\.mp4' is not a readable video file"):
        comfy_server.run_prompt(prompt, timeout=60)


def test_failed_generation_leaves_only_a_partial_folder(comfy_server, fake_setup, tmp_path):
    root, _, models = fake_setup
    info = comfy_server.object_info()
    generated = comfy_server.output_dir / "musubi" / "generated"
    before = set(generated.iterdir()) if generated.is_dir() else set()
    prompt = {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widgets(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable,
            extra_env=f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_MODE=fail")},
        "2": {"class_type": "MusubiTuner_GenerateVideo_Wan", "inputs": widgets(
            info, "MusubiTuner_GenerateVideo_Wan", musubi_env=["1", 0], prompt="a fox", task="t2v-1.3B",
            dit=str(models / "dit.safetensors"), vae=str(models / "vae.safetensors"), t5=str(models / "t5.pth"),
            width=64, height=48, frames=5, steps=2, seed=11)},
    }  # fmt: skip
    with pytest.raises(RuntimeError, match="exited with code 1"):
        comfy_server.run_prompt(prompt, timeout=120)
    (folder,) = set(generated.iterdir()) - before
    assert folder.name.endswith(".partial") and (folder / "generate.log").is_file()
    history = comfy_server.get("/history")
    errors = [m[1] for h in history.values() for m in h["status"]["messages"] if m[0] == "execution_error"]
    message = next(e["exception_message"] for e in errors if folder.name in e["exception_message"])
    assert f"Full log: {folder / 'generate.log'}" in message and "renamed so it is not taken for a finished" in message
