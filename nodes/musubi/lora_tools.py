"""LoRA tools: convert between musubi's and the diffusers-style format, merge LoRAs into a
DiT, and average checkpoints (post-hoc EMA), each with musubi's own script."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ...musubi import arch as archs
from ...musubi import commands, env, lora_file
from .paths import checked_env, lora_path, mtime, not_an_input, output_file, output_folder
from .running import run
from .widgets import boolean, check_finite, choice, env_input, number, string


class ConvertLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_ConvertLoRA",
            display_name="Musubi Convert LoRA",
            category="MusubiTuner/lora",
            description="Converts between musubi's format (lora_unet_*, lora_down/up) and the diffusers-style "
            "'other' format (lora_A/B) other tools and ComfyUI's HunyuanVideo loader read, with musubi's "
            "convert_lora.py; LoHa and LoKr files convert the same way. auto picks the direction from the file's keys.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                env_input(),
                string("lora", "LoRA .safetensors path or name in models/loras."),
                choice(
                    "direction",
                    "auto: from the keys; to_other: musubi -> other; to_musubi: other -> musubi.",
                    ("auto", "to_other", "to_musubi"),
                ),  # fmt: skip
                string("output_name", "Output file name (no folder); empty = <input>_<format>.", advanced=True),
                string("diffusers_prefix", "Key prefix for the other format; empty = musubi's default.", advanced=True),
            ],
            outputs=[io.String.Output(display_name="lora_path", tooltip="The converted file (next to the input).")],
        )

    @classmethod
    def execute(cls, lora, direction, output_name, diffusers_prefix, musubi_env=None):
        e = checked_env(musubi_env, ("convert_lora",))
        if not lora.strip():
            raise ValueError("lora is empty: give a LoRA .safetensors path or a name from models/loras")
        src = Path(lora_path(lora, "lora"))
        info = lora_file.inspect_lora(lora_file.read_safetensors_keys(src, "lora")[0], "lora")
        lora_file.check_convertible(info)
        current = info.layout
        target = {"to_other": "other", "to_musubi": "default"}.get(direction)
        if target is None:
            target = "other" if current == "default" else "default"
        stem = env.check_output_name(output_name) if output_name.strip() else f"{src.stem}_{target}"
        dst = src.with_name(stem + ".safetensors")
        if dst == src:
            raise ValueError("output_name equals the input file name: pick another name so the input is kept")
        argv = commands.convert_lora_argv(e, str(src), str(dst), target, diffusers_prefix.strip())
        run(
            argv,
            e,
            node_id=cls.hidden.unique_id,
            log_path=dst.with_suffix(".log"),
            expected=[dst],
            what="LoRA conversion",
        )
        return io.NodeOutput(str(dst))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return mtime(kw.get("lora", ""))


class MergeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        # New inputs go after `device` and are optional: saved workflows store widget values by
        # position, and API prompts saved before them do not name them.
        return io.Schema(
            node_id="MusubiTuner_MergeLoRA",
            display_name="Musubi Merge LoRA into DiT",
            category="MusubiTuner/lora",
            description="Merges up to three LoRAs with multipliers into a DiT checkpoint. HunyuanVideo: musubi's "
            "merge_lora.py (DiT only). Other architectures: their generate script's --save_merged_model mode, which "
            "also loads the text encoder(s) (and for some the VAE / image encoder) before merging, so those paths "
            "are needed; Wan, FramePack, Qwen-Image, Z-Image and HunyuanVideo 1.5 save only through LyCORIS "
            "(`pip install lycoris-lora` in musubi's venv).",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                env_input(),
                string("dit", "Base DiT checkpoint (.safetensors; HunyuanVideo also the original .pt)."),
                string("lora_1", "LoRA path or name in models/loras."),
                number("strength_1", "Multiplier of lora_1.", 1.0, -10.0, 10.0),
                string("lora_2", "Optional second LoRA."),
                number("strength_2", "Multiplier of lora_2.", 1.0, -10.0, 10.0),
                string("lora_3", "Optional third LoRA."),
                number("strength_3", "Multiplier of lora_3.", 1.0, -10.0, 10.0),
                string("output_path", "Merged checkpoint path (.safetensors)."),
                choice("device", "Where the merge (and the text encoder run before it) is computed.", ("cpu", "cuda")),
                choice(
                    "architecture",
                    "Model family of the DiT and LoRAs. hunyuan_video runs merge_lora.py; the others their "
                    "generate script in merge-only mode.",
                    tuple(commands.MERGE_SPECS),
                    optional=True,
                ),
                choice(
                    "task",
                    "Wan only: the DiT's task. Wan2.2 A14B: merge the low-noise and the high-noise DiT in two runs, "
                    "each with its own LoRAs.",
                    archs.ARCHS["wan"].tasks,
                    optional=True,
                ),
                string(
                    "vae",
                    "VAE path: Wan i2v / Fun-Control, FramePack, FLUX.1 Kontext / FLUX.2 (AE), Qwen-Image. Else empty.",
                    optional=True,
                ),
                string(
                    "text_encoder1",
                    "Text encoder the script loads before merging: Wan T5; FramePack LLM (llava); Kontext T5; "
                    "Qwen-Image Qwen2.5-VL; Z-Image Qwen3; HunyuanVideo 1.5 Qwen2.5-VL; FLUX.2 Mistral 3 / Qwen3. "
                    "Empty for HunyuanVideo.",
                    optional=True,
                ),
                string(
                    "text_encoder2", "FramePack / Kontext: CLIP-L; HunyuanVideo 1.5: byT5. Else empty.", optional=True
                ),
                string("image_encoder", "FramePack: SigLIP; Wan2.1 i2v tasks: CLIP. Else empty.", optional=True),
                string(
                    "include_pattern",
                    "Regex: merge only LoRA modules whose name matches (every LoRA); empty = all. Not for HunyuanVideo.",
                    optional=True,
                    advanced=True,
                ),
                string(
                    "exclude_pattern",
                    "Regex: skip LoRA modules whose name matches (every LoRA); empty = none. Not for HunyuanVideo.",
                    optional=True,
                    advanced=True,
                ),
                choice(
                    "model_version",
                    "FLUX.2 only: which FLUX.2 model the DiT is (dev or a klein variant).",
                    archs.ARCHS["flux_2"].version_choices,
                    optional=True,
                    advanced=True,
                ),
            ],
            outputs=[io.String.Output(display_name="model_path", tooltip="The merged DiT.")],
        )

    @classmethod
    def execute(cls, dit, output_path, device, architecture="hunyuan_video", task="t2v-14B", vae="",
                text_encoder1="", text_encoder2="", image_encoder="", include_pattern="", exclude_pattern="",
                model_version="dev", musubi_env=None, **kw):  # fmt: skip
        spec = commands.merge_spec(architecture)
        e = checked_env(musubi_env, (spec.script,))
        check_finite(cls, **kw)
        named = {f"lora_{i}": lora_path(kw[f"lora_{i}"], f"lora_{i}") for i in (1, 2, 3) if kw[f"lora_{i}"].strip()}
        loras = [(path, kw[f"strength_{name[-1]}"]) for name, path in named.items()]
        infos = lora_file.inspect_files(named)
        lora_file.require_musubi_layout(architecture, infos, "merge")
        lycoris = lora_file.merge_lycoris(architecture, infos, always=spec.lycoris)
        out = output_file(output_path, "output_path")
        models = {"vae": vae, "text_encoder1": text_encoder1, "text_encoder2": text_encoder2,
                  "image_encoder": image_encoder}  # fmt: skip
        paths = commands.require_paths({"dit": dit, **models}, optional=tuple(models))
        job = commands.MergeJob(
            arch=architecture, dit=paths.pop("dit"), loras=tuple(loras), output=str(out), device=device,
            task=task if architecture == "wan" else "", include_pattern=include_pattern.strip(),
            exclude_pattern=exclude_pattern.strip(), prompt_file=str(out.with_suffix(".prompt.txt")),
            lycoris=lycoris and not spec.lycoris, model_version=model_version if architecture == "flux_2" else "",
            **paths,
        )  # fmt: skip
        argv = commands.merge_argv(e, job)  # checks the inputs before musubi's venv is started
        not_an_input(out, "output_path", {"dit": job.dit, **named, **{k: v for k, v in paths.items() if v}})
        if lycoris:
            env.validate_env(e, modules=("lycoris",))
        output_folder(out.parent, "output_path")
        prompt_file = Path(job.prompt_file)
        if spec.prompt_file:
            # batch mode needs a prompt: it is text-encoded (musubi does that before merging), never sampled
            prompt_file.write_text("merge\n", encoding="utf-8")
        try:
            run(
                argv,
                e,
                node_id=cls.hidden.unique_id,
                log_path=out.with_suffix(".log"),
                expected=[out],
                what="LoRA merge",
                done_line=commands.MERGE_SAVED_LINE if spec.exits_nonzero_after_save else "",
            )
        finally:
            if spec.prompt_file:
                prompt_file.unlink(missing_ok=True)
        return io.NodeOutput(str(out))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return "|".join(mtime(kw.get(k, "")) for k in ("dit", "lora_1", "lora_2", "lora_3"))


class PostHocEMA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_PostHocEMA",
            display_name="Musubi Post-hoc EMA",
            category="MusubiTuner/lora",
            description="Averages saved checkpoints into one smoother LoRA with musubi's lora_post_hoc_ema.py "
            "(beta, optional linear ramp to beta2, or power-function EMA with sigma_rel).",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                env_input(),
                string(
                    "checkpoints",
                    "Checkpoint paths, one per line (e.g. a trainer's checkpoints output).",
                    multiline=True,
                ),
                number("beta", "EMA decay.", 0.95, 0.0001, 0.9999, 0.001),
                number("beta2", "Ramp beta linearly to this; 0 = constant beta.", 0.0, 0.0, 0.9999, 0.001),
                number("sigma_rel", "Power-function EMA (overrides beta); 0 = off, e.g. 0.2.", 0.0, 0.0, 10.0, 0.01),
                boolean("no_sort", "Keep the given order instead of sorting by file time.", advanced=True),
                string("output_path", "Output .safetensors path."),
            ],
            outputs=[io.String.Output(display_name="lora_path", tooltip="The averaged LoRA.")],
        )

    @classmethod
    def execute(cls, checkpoints, beta, beta2, sigma_rel, no_sort, output_path, musubi_env=None):
        e = checked_env(musubi_env, ("lora_post_hoc_ema",))
        check_finite(cls, beta=beta, beta2=beta2, sigma_rel=sigma_rel)
        paths = [env.native_path(p) for p in checkpoints.splitlines() if p.strip()]
        if len(paths) < 2:
            raise ValueError(
                f"checkpoints: {len(paths)} path(s) given, post-hoc EMA averages at least 2: write one checkpoint "
                "path per line (connect a trainer's checkpoints output)"
            )
        named = [
            (f"checkpoints line {i + 1}", lora_file.read_safetensors_keys(p, f"checkpoints line {i + 1}")[0])
            for i, p in enumerate(paths)
        ]
        for name, keys in named:
            lora_file.inspect_lora(keys, name)  # LoRA, LoHa and LoKr average alike (tensor by tensor)
        lora_file.check_same_tensors(named)
        out = output_file(output_path, "output_path")
        not_an_input(out, "output_path", {f"checkpoints line {i + 1}": p for i, p in enumerate(paths)})
        argv = commands.post_hoc_ema_argv(e, paths, str(out), beta, beta2, sigma_rel, no_sort)
        output_folder(out.parent, "output_path")
        run(
            argv, e, node_id=cls.hidden.unique_id, log_path=out.with_suffix(".log"), expected=[out], what="post-hoc EMA"
        )
        return io.NodeOutput(str(out))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        paths = [p for p in str(kw.get("checkpoints", "")).splitlines() if p.strip()]
        return "|".join(mtime(p) for p in paths)
