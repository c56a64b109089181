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


def fake_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Extra environment variables that make ``python -m accelerate.commands.launch`` the fake."""
    return {"PYTHONPATH": str(FAKE_SITE), **(extra or {})}


def python() -> str:
    return sys.executable
