"""Build a throw-away musubi-tuner checkout whose scripts are the fake CLI."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKE_SITE = HERE / "site"
LYCORIS_SITE = HERE / "lycoris_site"  # an importable stand-in for lycoris-lora (Merge LoRA checks for it)

SCRIPTS = (
    "cache_latents",
    "cache_text_encoder_outputs",
    "hv_train_network",
    "hv_generate_video",
    "wan_cache_latents",
    "wan_cache_text_encoder_outputs",
    "wan_train_network",
    "wan_generate_video",
    "fpack_cache_latents",
    "fpack_cache_text_encoder_outputs",
    "fpack_train_network",
    "fpack_generate_video",
    "flux_kontext_generate_image",
    "qwen_image_generate_image",
    "zimage_generate_image",
    "hv_1_5_generate_video",
    "convert_lora",
    "merge_lora",
    "lora_post_hoc_ema",
    # every other architecture musubi-tuner v0.3.4 ships, its full fine-tuning scripts and helper tools
    "hv_train",
    "flux_kontext_cache_latents",
    "flux_kontext_cache_text_encoder_outputs",
    "flux_kontext_train_network",
    "flux_2_cache_latents",
    "flux_2_cache_text_encoder_outputs",
    "flux_2_train_network",
    "flux_2_generate_image",
    "qwen_image_cache_latents",
    "qwen_image_cache_text_encoder_outputs",
    "qwen_image_train_network",
    "qwen_image_train",
    "zimage_cache_latents",
    "zimage_cache_text_encoder_outputs",
    "zimage_train_network",
    "zimage_train",
    "hv_1_5_cache_latents",
    "hv_1_5_cache_text_encoder_outputs",
    "hv_1_5_train_network",
    "kandinsky5_cache_latents",
    "kandinsky5_cache_text_encoder_outputs",
    "kandinsky5_train_network",
    "kandinsky5_generate_video",
    "hidream_o1_cache_pixel",
    "hidream_o1_cache_text_encoder_outputs",
    "hidream_o1_train_network",
    "hidream_o1_train",
    "hidream_o1_generate_image",
    "ideogram4_cache_latents",
    "ideogram4_cache_text_encoder_outputs",
    "ideogram4_train_network",
    "ideogram4_generate_image",
    "krea2_cache_latents",
    "krea2_cache_text_encoder_outputs",
    "krea2_train_network",
    "krea2_generate_image",
    "caption_images_by_qwen_vl",
    "qwen_extract_lora",
)


def make_fake_root(base: Path) -> Path:
    """A checkout layout (``pyproject.toml``, ``src/musubi_tuner/<script>.py``) under ``base``."""
    root = base / "musubi-tuner"
    pkg = root / "src" / "musubi_tuner"
    pkg.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text('[project]\nname = "musubi-tuner"\nversion = "0.3.4"\n')
    (pkg / "__init__.py").write_text("")
    for name in SCRIPTS:
        shutil.copyfile(HERE / "fake_cli.py", pkg / f"{name}.py")
    return root


def make_fake_workspace(base: Path, model_files: tuple[str, ...] = ("dit.safetensors",)) -> tuple[Path, Path, Path]:
    """A fake checkout, a two-image captioned dataset and placeholder model files under ``base``.

    Returns ``(root, data, models)``: what a node graph driving the fake CLI needs (the fake never
    reads the model files, it only needs paths that exist).
    """
    from PIL import Image

    root = make_fake_root(base)
    data = base / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (i * 100, 50, 50)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a test image {i}")
    models = base / "models"
    models.mkdir()
    for name in model_files:
        (models / name).write_bytes(b"x")
    return root, data, models


def hanging_training_prompt(
    info: dict, root: Path, data: Path, dit: Path, out_dir: Path, pid_file: Path, name: str
) -> dict:
    """An API prompt whose HunyuanVideo training hangs in the fake CLI with a child process, both
    pids written to ``pid_file``: the graph the cancel tests press Cancel on."""
    from comfy_server import widget_inputs

    env = f"PYTHONPATH={FAKE_SITE}\nFAKE_MUSUBI_MODE=hang\nFAKE_MUSUBI_CHILD=1\nFAKE_MUSUBI_PIDFILE={pid_file}"
    return {
        "1": {"class_type": "MusubiTuner_Environment", "inputs": widget_inputs(
            info, "MusubiTuner_Environment", musubi_root=str(root), python=sys.executable, extra_env=env)},
        "2": {"class_type": "MusubiTuner_DatasetConfig", "inputs": widget_inputs(
            info, "MusubiTuner_DatasetConfig", directory=str(data), name=name)},
        "3": {"class_type": "MusubiTuner_TrainLoRA_HunyuanVideo", "inputs": widget_inputs(
            info, "MusubiTuner_TrainLoRA_HunyuanVideo", musubi_env=["1", 0], dataset=["2", 0],
            dit=str(dit), output_name="cancel_lora", output_dir=str(out_dir))},
    }  # fmt: skip


def fake_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Extra environment variables that make ``python -m accelerate.commands.launch`` the fake."""
    return {"PYTHONPATH": str(FAKE_SITE), **(extra or {})}


def python() -> str:
    return sys.executable
