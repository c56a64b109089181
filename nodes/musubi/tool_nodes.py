"""Helper nodes around musubi's own tools: caption a folder of images with Qwen2.5-VL
(``caption_images_by_qwen_vl.py``) and extract a LoRA from a fine-tuned Qwen-Image DiT
(``qwen_extract_lora.py``)."""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from ...musubi import commands, env, tool_commands
from .paths import checked_env, folder_signature, mtime, not_an_input, output_file, output_folder
from .running import run
from .widgets import boolean, check_finite, choice, env_input, extra_args_input, integer, number, string


class CaptionImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_CaptionImages",
            display_name="Musubi Caption Images (Qwen-VL)",
            category="MusubiTuner/data",
            description="Writes a caption for every image of a folder with musubi's caption_images_by_qwen_vl.py "
            "(Qwen2.5-VL, e.g. Qwen-Image's text encoder): <image>.txt files next to the images, ready for Dataset "
            "Config (caption_extension .txt), or one JSONL file for a JSONL dataset.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                env_input(),
                string("image_dir", "Folder of the images to caption (not its sub-folders)."),
                string("model_path", "Qwen2.5-VL model file (.safetensors), e.g. Qwen-Image's text encoder."),
                choice(
                    "output_format",
                    "text: <image>.txt next to each image; jsonl: one file of image_path / caption lines.",
                    tool_commands.CAPTION_FORMATS,
                ),
                string("output_file", "jsonl: the .jsonl file to write; empty for text."),
                boolean("overwrite", "text: replace existing .txt captions (off: refuse when one exists)."),
                boolean("fp8_vl", "Load the model in fp8 (less VRAM)."),
                integer(
                    "max_size",
                    "Longest image side passed to the model; 0 = musubi's default (1280).",
                    0,
                    0,
                    8192,
                    advanced=True,
                ),  # fmt: skip
                integer(
                    "max_new_tokens",
                    "Longest caption in tokens; 0 = musubi's default (1024).",
                    0,
                    0,
                    32768,
                    advanced=True,
                ),  # fmt: skip
                string(
                    "prompt", "Instruction for the captioner; empty = musubi's default.", multiline=True, advanced=True
                ),  # fmt: skip
                extra_args_input(),
            ],
            outputs=[
                io.String.Output(display_name="image_dir", tooltip="The captioned folder (for Dataset Config)."),
                io.String.Output(
                    display_name="captions", tooltip="The JSONL file, or the caption files, one per line."
                ),
            ],
        )

    @classmethod
    def execute(cls, image_dir, model_path, output_format, output_file, overwrite, fp8_vl, max_size, max_new_tokens,
                prompt, extra_args, musubi_env=None):  # fmt: skip
        e = checked_env(musubi_env, ("caption_images_by_qwen_vl",))
        folder = env.native_path(image_dir)
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"image_dir {image_dir!r} is not a folder: give the folder of the images to caption")
        images = tool_commands.images_in(folder)
        if not images:
            raise ValueError(f"image_dir {folder!r} holds no .png/.jpg/.jpeg/.webp/.bmp image: nothing to caption")
        model = commands.require_paths({"model_path": model_path})["model_path"]
        out = ""
        if output_format == "jsonl":
            out = str(output_file_path(output_file))
        captions = [p.with_suffix(".txt") for p in images]
        existing = [c for c in captions if c.exists()]
        if output_format == "text" and existing and not overwrite:
            raise ValueError(
                f"{len(existing)} of the {len(images)} images already have a caption (e.g. {existing[0].name}): "
                "switch overwrite on to replace them, or use output_format jsonl"
            )
        argv = tool_commands.caption_argv(
            e, folder, model, output_format, out, max_new_tokens, max_size, fp8_vl, prompt, extra_args
        )
        log = Path(out).with_suffix(".log") if out else Path(folder) / "captions_qwen_vl.log"
        expected = [Path(out)] if out else []
        run(argv, e, node_id=cls.hidden.unique_id, log_path=log, expected=expected, what="captioning")
        if not out:
            missing = [c.name for c in captions if not c.exists()]
            if missing:
                raise ValueError(f"the captioner exited without writing {len(missing)} caption(s), e.g. {missing[0]}")
        return io.NodeOutput(folder, out or "\n".join(str(c) for c in captions))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return folder_signature(str(kw.get("image_dir", "")))


def output_file_path(value: str) -> Path:
    """The JSONL path: absolute, or inside ComfyUI's output folder (like the .safetensors outputs)."""
    path = output_file(value, "output_file", ".jsonl")
    output_folder(path.parent, "output_file")
    return path


class ExtractLoRAQwenImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_ExtractLoRA_QwenImage",
            display_name="Musubi Extract LoRA (Qwen-Image)",
            category="MusubiTuner/lora",
            description="Extracts a LoRA from a fine-tuned Qwen-Image DiT (e.g. from Fine-Tune (Qwen-Image)) with "
            "musubi's qwen_extract_lora.py: the difference to the original DiT, cut to rank dim by SVD.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                env_input(),
                string("model_org", "The original Qwen-Image DiT (.safetensors)."),
                string("model_tuned", "The fine-tuned DiT (.safetensors)."),
                string("output_path", "LoRA file to write (.safetensors; relative = in ComfyUI's output folder)."),
                integer("dim", "LoRA rank: higher keeps more of the difference, larger file.", 4, 1, 1024),
                number(
                    "clamp_quantile",
                    "Clamp outliers of the factors at this quantile (1 = off).",
                    0.99,
                    0.5,
                    1.0,
                    0.001,
                    advanced=True,
                ),  # fmt: skip
                string("device", "Where the SVD runs, e.g. cuda; empty = CPU (slow).", advanced=True),
                choice(
                    "save_precision",
                    "LoRA file precision; default = the models'.",
                    tool_commands.EXTRACT_PRECISIONS,
                    advanced=True,
                ),  # fmt: skip
                boolean("mem_eff_safe_open", "Read the models with little RAM.", advanced=True),
                extra_args_input(),
            ],
            outputs=[io.String.Output(display_name="lora_path", tooltip="The extracted LoRA.")],
        )

    @classmethod
    def execute(cls, model_org, model_tuned, output_path, dim, clamp_quantile, device, save_precision,
                mem_eff_safe_open, extra_args, musubi_env=None):  # fmt: skip
        e = checked_env(musubi_env, ("qwen_extract_lora",))
        check_finite(cls, clamp_quantile=clamp_quantile)
        paths = commands.require_paths({"model_org": model_org, "model_tuned": model_tuned})
        out = output_file(output_path, "output_path")
        not_an_input(out, "output_path", paths)
        argv = tool_commands.extract_lora_argv(
            e, paths["model_org"], paths["model_tuned"], str(out), dim, clamp_quantile, device.strip(),
            save_precision, mem_eff_safe_open, extra_args,
        )  # fmt: skip
        output_folder(out.parent, "output_path")
        run(argv, e, node_id=cls.hidden.unique_id, log_path=out.with_suffix(".log"), expected=[out],
            what="LoRA extraction")  # fmt: skip
        return io.NodeOutput(str(out))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return "|".join(mtime(kw.get(k, "")) for k in ("model_org", "model_tuned"))
