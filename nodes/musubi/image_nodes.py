"""Generate nodes of the table-driven architectures: Generate Image (FLUX.1 Kontext, FLUX.2,
Qwen-Image, Z-Image, HiDream-O1, Ideogram 4, Krea 2) and Generate Video (HunyuanVideo 1.5,
Kandinsky 5), each built from its :class:`musubi.arch.GenSpec`.

A node has only the inputs its script has (no negative prompt where the model takes none, no
steps where a preset decides them ...). It runs the script into a fresh run folder and returns
what it wrote as an IMAGE batch: the PNG(s), or the frames of the MP4 where the script writes
only a video (Kandinsky 5).
"""

from __future__ import annotations

import time
import uuid

from comfy_api.latest import io

from ...musubi import arch as archs
from ...musubi import commands, env, lora_file, media, runner, table_commands
from ...musubi.runner import MusubiRunError
from .images import first_frame_png, image_frames, to_image
from .paths import checked_env, lora_path, output_directory, output_folder
from .running import run
from .widgets import boolean, check_finite, choice, env_input, extra_args_input, from_table, integer, number, string

FP8_TIPS = {
    "fp8": "DiT in fp8 (less VRAM).",
    "fp8_scaled": "Scaled fp8 DiT (less VRAM, better than plain fp8).",
    "fp8_text_encoder": "Text encoder in fp8 (less VRAM).",
}


def gen_inputs(spec: archs.ArchSpec) -> list:
    g = spec.gen
    width, height = g.size
    what = "video" if g.video else "image"
    inputs = [env_input(), string("prompt", f"What the {what} shows.", multiline=True)]
    if g.negative_flag:
        inputs.append(string("negative_prompt", "What to avoid (where the model uses CFG).", multiline=True))
    inputs += [string("dit", "DiT checkpoint path."), *(from_table(row) for row in g.inputs)]
    inputs += [
        integer("width", "Width in pixels (multiple of 16).", width, 16, 8192, step=16),
        integer("height", "Height in pixels (multiple of 16).", height, 16, 8192, step=16),
    ]
    if g.video:
        rule = " (4*N+1)" if g.frames_rule == "4n+1" else ""
        inputs.append(integer("frames", f"Frame count{rule}.", g.frames, 1, 2048))
        if g.fps_flag:
            inputs.append(integer("fps", f"Frames per second of the saved video; 0 = {g.fps}.", 0, 0, 120))
    if g.steps_flag:
        inputs.append(integer("steps", "Sampling steps; 0 = musubi's default.", 0, 0, 1000))
    inputs.append(integer("seed", "Seed; -1 = random.", 42, -1, 2**31 - 1, control_after_generate=True))
    if g.guidance_flag:
        inputs.append(number("guidance_scale", "Guidance / CFG scale; 0 = musubi's default.", 0.0, 0.0, 100.0, 0.1))
    if g.flow_shift_flag:
        inputs.append(number("flow_shift", "Flow shift; 0 = musubi's default.", 0.0, 0.0, 100.0, 0.1))
    inputs += [io.Image.Input(i.name, optional=True, tooltip=i.tooltip) for i in g.images]
    inputs += [
        string("lora_1", "LoRA path or name in models/loras; empty = none."),
        number("strength_1", "Multiplier of lora_1.", 1.0, -10.0, 10.0),
        string("lora_2", "Second LoRA; empty = none.", advanced=True),
        number("strength_2", "Multiplier of lora_2.", 1.0, -10.0, 10.0, advanced=True),
        string("lora_3", "Third LoRA; empty = none.", advanced=True),
        number("strength_3", "Multiplier of lora_3.", 1.0, -10.0, 10.0, advanced=True),
    ]
    if g.attention:
        inputs.append(choice("attn_mode", "Attention kernel (all but sdpa/torch must be in musubi's venv).",
                             [name for name, _ in g.attention]))  # fmt: skip
    inputs += [boolean(name, FP8_TIPS[name]) for name, _ in g.fp8]
    if g.blocks_to_swap:
        inputs.append(integer("blocks_to_swap", "DiT blocks kept on the CPU; 0 = off.", 0, 0, 100))
    inputs += [string("device", "Device, e.g. cuda or cuda:1; empty = musubi's default.", advanced=True)]
    return [*inputs, extra_args_input()]


class GenerateImageNode(io.ComfyNode):
    """Shared schema and run of the table-driven generate nodes; :func:`gen_node` makes one per architecture."""

    ARCH = ""
    NODE_ID = ""

    @classmethod
    def define_schema(cls):
        spec = archs.ARCHS[cls.ARCH]
        kind = "Video" if spec.gen.video else "Image"
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=f"Musubi Generate {kind} ({spec.label})",
            category="MusubiTuner/generate",
            description=spec.gen.description + " LoRAs are applied by musubi; the result comes back as IMAGE.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=gen_inputs(spec),
            outputs=[
                io.Image.Output(display_name="images", tooltip=f"The generated {kind.lower()} as an IMAGE batch."),
                io.String.Output(display_name="path", tooltip="The file or folder musubi saved."),
            ],
        )

    @classmethod
    def execute(cls, **kw):
        spec = archs.ARCHS[cls.ARCH]
        g = spec.gen
        e = checked_env(kw.pop("musubi_env", None), (g.script,))
        check_finite(cls, **kw)
        rows = {row: kw.pop(row.name, row.default) for row in g.inputs}
        paths = {row.name: v for row, v in rows.items() if row.kind == "path"}
        optional = tuple(n for n in paths if n not in g.required)
        checked = commands.require_paths({"dit": kw["dit"], **paths}, optional=optional)
        flags = tuple((row.field, checked.get(row.name, v) if row.kind == "path" else v) for row, v in rows.items())
        return generate(cls, spec, e, kw, checked["dit"], flags)

    @classmethod
    def fingerprint_inputs(cls, **kw):
        """A fixed seed gives the same picture: reuse it. seed -1 (random) always runs again."""
        seed = kw.get("seed", -1)
        return float("nan") if not isinstance(seed, int) or seed < 0 else "seeded"


def generate(cls, spec: archs.ArchSpec, e: env.MusubiEnv, kw: dict, dit: str, flags: tuple):
    """Check everything, save the input images, run the script and load what it saved."""
    g = spec.gen
    given = {i.name: (i, image_frames(kw[i.name], i.name)) for i in g.images if kw.get(i.name) is not None}
    named = {f"lora_{i}": lora_path(kw[f"lora_{i}"], f"lora_{i}") for i in (1, 2, 3) if kw[f"lora_{i}"].strip()}
    loras = tuple((path, kw[f"strength_{name[-1]}"]) for name, path in named.items())
    infos = lora_file.inspect_files(named)
    lora_file.require_musubi_layout(spec.key, infos, "generation")
    lycoris = lora_file.generate_lycoris(spec.key, infos)
    name = f"{spec.key}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}"
    out = output_directory() / "musubi" / "generated" / name
    images = []
    for i, arr in given.values():
        count = len(arr) if i.every_frame else 1
        images.append((i.flag, tuple(str(out / f"input_{i.name}_{n:02d}.png") for n in range(count))))
    job = table_commands.ImageJob(
        arch=spec.key, prompt=kw["prompt"], run_dir=str(out), dit=dit, flags=flags,
        negative_prompt=kw.get("negative_prompt", ""), width=kw["width"], height=kw["height"],
        frames=kw.get("frames", 1), fps=kw.get("fps", 0), steps=kw.get("steps", 0), seed=kw["seed"],
        guidance_scale=kw.get("guidance_scale", 0.0), flow_shift=kw.get("flow_shift", 0.0), images=tuple(images),
        loras=loras, lycoris=lycoris, attention=kw.get("attn_mode", ""),
        fp8=tuple(n for n, _ in g.fp8 if kw.get(n)), blocks_to_swap=kw.get("blocks_to_swap", 0),
        device=kw.get("device", "").strip(), extra=kw["extra_args"],
    )  # fmt: skip
    argv = table_commands.image_argv(e, job)  # every check before the run folder exists
    if lycoris:
        env.validate_env(e, modules=("lycoris",))
    output_folder(out, "the output folder")
    for i, arr in given.values():
        for n in range(len(arr) if i.every_frame else 1):
            first_frame_png(arr[n : n + 1], out, f"input_{i.name}_{n:02d}")
    run(argv, e, node_id=cls.hidden.unique_id, log_path=out / "generate.log", what=f"{spec.label} generation",
        run_dirs=[out])  # fmt: skip
    target = table_commands.output_path(job)
    if target.suffix == ".mp4" and target.is_file():
        frames, _ = media.read_video(target, name="the generated video")
        return io.NodeOutput(to_image(frames), str(target))
    found = [p for p in media.collect_frames(out) if not p.name.startswith("input_")]
    if not found:
        moved = runner.set_aside([], [out])
        where = moved[0][1] if moved else out
        raise MusubiRunError(
            f"{spec.label} generation exited with code 0 but wrote no image; its folder was renamed to {where} so it "
            f"is not taken for a finished one. Full log: {where / 'generate.log'}",
            returncode=0, tail=[], log_path=where / "generate.log",
        )  # fmt: skip
    return io.NodeOutput(to_image(media.load_images(found)), str(target))


def gen_node(arch: str, node_id: str) -> type[GenerateImageNode]:
    """The generate node class of ``arch``; its ``node_id`` is frozen (saved workflows refer to it)."""
    name = node_id.removeprefix("MusubiTuner_").replace("_", "")
    attrs = {"ARCH": arch, "NODE_ID": node_id, "__module__": __name__, "__qualname__": name}
    return type(name, (GenerateImageNode,), attrs)


GenerateImageFluxKontext = gen_node("flux_kontext", node_id="MusubiTuner_GenerateImage_FluxKontext")
GenerateImageQwenImage = gen_node("qwen_image", node_id="MusubiTuner_GenerateImage_QwenImage")
GenerateImageZImage = gen_node("zimage", node_id="MusubiTuner_GenerateImage_ZImage")
GenerateVideoHunyuanVideo15 = gen_node("hunyuan_video_1_5", node_id="MusubiTuner_GenerateVideo_HunyuanVideo15")
GenerateImageFlux2 = gen_node("flux_2", node_id="MusubiTuner_GenerateImage_Flux2")
GenerateVideoKandinsky5 = gen_node("kandinsky5", node_id="MusubiTuner_GenerateVideo_Kandinsky5")
GenerateImageHiDreamO1 = gen_node("hidream_o1", node_id="MusubiTuner_GenerateImage_HiDreamO1")
GenerateImageIdeogram4 = gen_node("ideogram4", node_id="MusubiTuner_GenerateImage_Ideogram4")
GenerateImageKrea2 = gen_node("krea2", node_id="MusubiTuner_GenerateImage_Krea2")

GEN_NODES = [
    GenerateImageFluxKontext, GenerateImageQwenImage, GenerateImageZImage, GenerateVideoHunyuanVideo15,
    GenerateImageFlux2, GenerateVideoKandinsky5, GenerateImageHiDreamO1, GenerateImageIdeogram4, GenerateImageKrea2,
]  # fmt: skip
