"""Command lines of musubi's helper scripts: the Qwen2.5-VL image captioner
(``caption_images_by_qwen_vl.py``) and the Qwen-Image LoRA extractor (``qwen_extract_lora.py``).

Like every builder here they check values, not the disk (the nodes do that first).
"""

from __future__ import annotations

import os
from pathlib import Path

from .commands import _flag, check_device, extra_args
from .configs import _num, check_finite
from .dataset import IMAGE_EXTENSIONS
from .env import MusubiEnv

CAPTION_FORMATS = ("text", "jsonl")
EXTRACT_PRECISIONS = ("default", "float", "fp16", "bf16")


def images_in(folder: str | os.PathLike) -> list[Path]:
    """The images the captioner reads: files of ``folder`` (not sub-folders) with an image extension."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def caption_argv(
    env: MusubiEnv,
    image_dir: str,
    model_path: str,
    output_format: str = "text",
    output_file: str = "",
    max_new_tokens: int = 0,
    max_size: int = 0,
    fp8_vl: bool = False,
    prompt: str = "",
    extra: str = "",
) -> list[str]:
    """``caption_images_by_qwen_vl.py``: ``text`` writes ``<image>.txt`` next to each image, ``jsonl`` one file."""
    if output_format not in CAPTION_FORMATS:
        raise ValueError(f"output_format={output_format!r} must be one of {', '.join(CAPTION_FORMATS)}")
    if output_format == "jsonl" and not output_file:
        raise ValueError("output_file is empty: output_format jsonl writes every caption into that file; give its path")
    if output_format == "text" and output_file:
        raise ValueError("output_file is only for output_format jsonl (text writes <image>.txt files): clear it")
    if max_new_tokens < 0 or max_size < 0:
        raise ValueError("max_new_tokens and max_size must be >= 0 (0 = musubi's default)")
    argv = env.python_cmd("caption_images_by_qwen_vl") + [
        "--image_dir",
        str(image_dir),
        "--model_path",
        str(model_path),
    ]
    argv += ["--output_format", output_format]
    _flag(argv, "--output_file", output_file)
    _flag(argv, "--max_new_tokens", max_new_tokens)
    _flag(argv, "--max_size", max_size)
    _flag(argv, "--fp8_vl", fp8_vl)
    if prompt.strip():
        argv += ["--prompt", prompt]
    return argv + extra_args(extra)


def extract_lora_argv(
    env: MusubiEnv,
    model_org: str,
    model_tuned: str,
    save_to: str,
    dim: int = 4,
    clamp_quantile: float = 0.99,
    device: str = "",
    save_precision: str = "default",
    mem_eff_safe_open: bool = False,
    extra: str = "",
) -> list[str]:
    """``qwen_extract_lora.py``: the difference between a fine-tuned and the original Qwen-Image DiT as a LoRA."""
    check_finite({"clamp_quantile": clamp_quantile}, {"clamp_quantile": 0.99})
    if dim < 1:
        raise ValueError(f"dim={dim} must be >= 1 (the LoRA rank, e.g. 4 or 32)")
    if not 0 < clamp_quantile <= 1:
        raise ValueError(f"clamp_quantile={clamp_quantile} must be in (0, 1], e.g. 0.99")
    if save_precision not in EXTRACT_PRECISIONS:
        raise ValueError(f"save_precision={save_precision!r} must be one of {', '.join(EXTRACT_PRECISIONS)}")
    check_device(device)
    argv = env.python_cmd("qwen_extract_lora") + ["--model_org", str(model_org), "--model_tuned", str(model_tuned)]
    argv += ["--save_to", str(save_to), "--dim", str(dim), "--clamp_quantile", _num(clamp_quantile)]
    _flag(argv, "--device", device)
    if save_precision != "default":
        argv += ["--save_precision", save_precision]
    _flag(argv, "--mem_eff_safe_open", mem_eff_safe_open)
    return argv + extra_args(extra)
