"""Generate Video nodes, one per architecture with a generate script, built from the table in
``musubi/arch.py``, and the batch prompt list that feeds them.

The node runs ``<arch>_generate_video.py`` with ``--output_type images``
(:data:`musubi.arch.FRAMES_OUTPUT_TYPE`), the one type for which every script writes PNG
frames, and returns those frames as an IMAGE batch.
"""

from __future__ import annotations

import time
import uuid

from comfy_api.latest import io

from ...musubi import arch as archs
from ...musubi import commands, env, lora_file, media, runner
from ...musubi.runner import MusubiRunError
from .images import first_frame_png, image_frames, to_image
from .paths import checked_env, lora_path, output_directory, output_folder
from .running import run
from .widgets import boolean, check_finite, choice, env_input, extra_args_input, from_table, integer, number, string

INPUT_IMAGES = {"image": "start_image", "end_image": "end_image"}
"""IMAGE inputs -> the PNG name they are saved under in the run folder (never taken for output frames)."""


def generate_inputs(spec: archs.ArchSpec) -> list:
    width, height = spec.generate_size
    inputs = [
        env_input(),
        string("prompt", "What the video shows.", multiline=True),
        string("negative_prompt", "What to avoid (where the model uses CFG).", multiline=True),
        string("dit", "DiT checkpoint path."),
        string("vae", "VAE path."),
        *(from_table(row) for row in spec.generate_inputs),
        integer("width", "Width in pixels (multiple of 16).", width, 16, 4096, step=16),
        integer("height", "Height in pixels (multiple of 16).", height, 16, 4096, step=16),
        integer(
            "frames",
            "Frame count (4*N+1 for HunyuanVideo/Wan; FramePack: seconds = frames / fps).",
            spec.generate_frames,
            1,
            2048,
        ),  # fmt: skip
        integer("fps", f"Frames per second; 0 = {spec.fps}.", 0, 0, 120),
        integer("steps", "Sampling steps; 0 = musubi's default.", 0, 0, 1000),
        integer("seed", "Seed; -1 = random.", 42, -1, 2**31 - 1, control_after_generate=True),
        number("guidance_scale", "CFG / guidance scale; 0 = musubi's default.", 0.0, 0.0, 100.0, 0.1),
        number("flow_shift", "Flow shift; 0 = musubi's default.", 0.0, 0.0, 100.0, 0.1),
        io.Image.Input("image", optional=True, tooltip="Start image for image-to-video (first frame used)."),
    ]
    if spec.end_image:
        inputs.append(
            io.Image.Input("end_image", optional=True, tooltip="End image (Wan FLF2V / FramePack), first frame used.")
        )
    inputs += [
        string("lora_1", "LoRA path or name in models/loras; empty = none."),
        number("strength_1", "Multiplier of lora_1.", 1.0, -10.0, 10.0),
        string("lora_2", "Second LoRA; empty = none.", advanced=True),
        number("strength_2", "Multiplier of lora_2.", 1.0, -10.0, 10.0, advanced=True),
        string("lora_3", "Third LoRA; empty = none.", advanced=True),
        number("strength_3", "Multiplier of lora_3.", 1.0, -10.0, 10.0, advanced=True),
        choice("attn_mode", "Attention kernel.", ("sdpa", "torch", "flash", "sageattn", "xformers")),
        boolean("fp8", "DiT in fp8 (less VRAM)."),
        boolean("fp8_text_encoder", "Text encoder in fp8."),
        integer("blocks_to_swap", "DiT blocks on CPU; 0 = off.", 0, 0, 60),
        extra_args_input(),
    ]
    if spec.lora_targets:
        # after every older input, and optional: saved workflows keep their widget values and apply
        # their LoRAs to `dit` as before
        inputs += [
            choice(
                f"lora_{i}_target",
                f"Which DiT lora_{i} is applied to: dit (Wan2.1's DiT, Wan2.2's low-noise DiT), dit_high_noise "
                "(Wan2.2), or both (a LoRA trained on both Wan2.2 DiTs in one run).",
                commands.WAN_LORA_TARGETS,
                optional=True,
                advanced=i > 1,
            )
            for i in (1, 2, 3)
        ]
    return inputs


def generate_outputs() -> list:
    return [
        io.Image.Output(display_name="frames", tooltip="The generated frames as an IMAGE batch."),
        io.String.Output(display_name="path", tooltip="The folder of the PNG frames musubi saved."),
    ]


class GenerateVideoNode(io.ComfyNode):
    """Shared schema and run of the Generate Video nodes; :func:`generate_node` makes one per architecture."""

    ARCH = ""
    NODE_ID = ""

    @classmethod
    def define_schema(cls):
        spec = archs.ARCHS[cls.ARCH]
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=f"Musubi Generate Video ({spec.label})",
            category="MusubiTuner/generate",
            description=spec.generate_description,
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=generate_inputs(spec),
            outputs=generate_outputs(),
        )

    @classmethod
    def execute(cls, **kw):
        spec = archs.ARCHS[cls.ARCH]
        values = {row: kw.pop(row.name, row.default) for row in spec.generate_inputs}
        given = {row.name: v for row, v in values.items() if row.role == "file"}
        files = commands.require_paths(given, optional=tuple(given))
        job_kw = {row.field: files[row.name] for row in values if row.role == "file"}
        job_kw.update({row.field: v for row, v in values.items() if row.role == "job"})
        e = checked_env(kw.pop("musubi_env", None), (spec.generate,))
        check_finite(cls, **kw, **job_kw)
        # errors name the input (t5, clip), the job gets the field (text_encoder1, image_encoder); only the
        # main text encoder is required here, generate_argv checks the others per architecture and task
        models = {row.name: v for row, v in values.items() if row.role == "model"}
        fields = {row.name: row.field for row in values if row.role == "model"}
        optional = [name for name, f in fields.items() if f != "text_encoder1"]
        checked = commands.require_paths({"dit": kw["dit"], "vae": kw["vae"], **models}, optional=optional)
        paths = {fields.get(name, name): path for name, path in checked.items()}
        return generate(cls, spec, e, kw, paths, job_kw)

    @classmethod
    def fingerprint_inputs(cls, **kw):
        """A fixed seed gives the same video: reuse it. seed -1 (random) always runs again."""
        seed = kw.get("seed", -1)
        return float("nan") if not isinstance(seed, int) or seed < 0 else "seeded"


def generate(cls, spec: archs.ArchSpec, e: env.MusubiEnv, kw: dict, paths: dict[str, str], job_kw: dict):
    """Check everything, write the input images, run the script and load the frames it saved."""
    images = {k: image_frames(kw[k], k) for k in INPUT_IMAGES if kw.get(k) is not None}
    loras = []
    for i in (1, 2, 3):
        if kw[f"lora_{i}"].strip():
            path = lora_path(kw[f"lora_{i}"], f"lora_{i}")
            # workflows saved before the Wan target inputs existed apply every LoRA to `dit`
            loras.append((f"lora_{i}", path, kw[f"strength_{i}"], kw.get(f"lora_{i}_target") or "dit"))
    low, high = commands.split_wan_loras(loras)
    # LoHa / LoKr: the script's own loader or the LyCORIS library (--lycoris), per architecture
    infos = lora_file.inspect_files({n: p for n, p, _, _ in loras})
    lora_file.require_musubi_layout(spec.key, infos, "generation")
    lycoris = lora_file.generate_lycoris(spec.key, infos)
    # every check before the run folder exists: a refused input leaves no folder behind
    name = f"{spec.key}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
    out = output_directory() / "musubi" / "generated" / name
    image_paths = {k: str(out / f"{INPUT_IMAGES[k]}.png") for k in images}
    job = commands.GenerateJob(
        arch=spec.key, prompt=kw["prompt"], negative_prompt=kw["negative_prompt"], save_path=str(out), **paths,
        width=kw["width"], height=kw["height"], frames=kw["frames"], fps=kw["fps"], steps=kw["steps"],
        seed=kw["seed"], guidance_scale=kw["guidance_scale"], flow_shift=kw["flow_shift"],
        image_path=image_paths.get("image", ""), end_image_path=image_paths.get("end_image", ""),
        loras=low, loras_high_noise=high, attn_mode=kw["attn_mode"], fp8=kw["fp8"],
        fp8_text_encoder=kw["fp8_text_encoder"], blocks_to_swap=kw["blocks_to_swap"],
        output_type=archs.FRAMES_OUTPUT_TYPE, extra=kw["extra_args"], lycoris=lycoris, **job_kw,
    )  # fmt: skip
    argv = commands.generate_argv(e, job)
    if lycoris:
        env.validate_env(e, modules=("lycoris",))
    output_folder(out, "the output folder")
    for k, arr in images.items():
        first_frame_png(arr, out, INPUT_IMAGES[k])
    log = out / "generate.log"
    run(argv, e, node_id=cls.hidden.unique_id, log_path=log, what=f"{spec.label} generation", run_dirs=[out])
    frames = [p for p in media.collect_frames(out) if p.name not in {f"{n}.png" for n in INPUT_IMAGES.values()}]
    if not frames:
        moved = runner.set_aside([], [out])
        where = moved[0][1] if moved else out
        raise MusubiRunError(
            f"{spec.label} generation exited with code 0 but wrote no frames; its folder was renamed to {where} so it "
            f"is not taken for a finished video. Full log: {where / log.name}",
            returncode=0, tail=[], log_path=where / log.name,
        )  # fmt: skip
    return io.NodeOutput(to_image(media.load_images(frames)), str(frames[0].parent))


def generate_node(arch: str, node_id: str) -> type[GenerateVideoNode]:
    """The GenerateVideo node class of ``arch``; its ``node_id`` is frozen (saved workflows refer to it)."""
    name = node_id.removeprefix("MusubiTuner_").replace("_", "")
    return type(
        name, (GenerateVideoNode,), {"ARCH": arch, "NODE_ID": node_id, "__module__": __name__, "__qualname__": name}
    )


GenerateVideoHunyuanVideo = generate_node("hunyuan_video", node_id="MusubiTuner_GenerateVideo_HunyuanVideo")
GenerateVideoWan = generate_node("wan", node_id="MusubiTuner_GenerateVideo_Wan")
GenerateVideoFramePack = generate_node("framepack", node_id="MusubiTuner_GenerateVideo_FramePack")


class BatchProcessor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_BatchProcessor",
            display_name="Musubi Batch Prompts",
            category="MusubiTuner/generate",
            description="Runs a list of prompts through a connected Generate Video node one after another "
            "(ComfyUI runs the downstream node once per list item) and collects the outputs.",
            inputs=[string("prompts", "One prompt per line; # starts a comment.", multiline=True)],
            outputs=[
                io.String.Output(display_name="prompt", is_output_list=True, tooltip="Each prompt, as a list."),
                io.Int.Output(display_name="count", tooltip="Number of prompts."),
            ],
        )

    @classmethod
    def execute(cls, prompts):
        items = [p.strip() for p in prompts.splitlines() if p.strip() and not p.strip().startswith("#")]
        if not items:
            raise ValueError("prompts is empty: write one prompt per line")
        return io.NodeOutput(items, len(items))
