"""Architectures musubi-tuner supports and the script/flag names each one uses.

Names are from musubi-tuner v0.3.x (``src/musubi_tuner``); the integration tests parse
every generated command with musubi's own argparse definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeInput:
    """One input an architecture's Train LoRA or Generate Video node adds to the shared ones.

    Kept free of ComfyUI (the adapter turns each row into a widget) so the table stays the one
    place that says what each architecture's scripts take. ``target`` says where the value
    goes: ``model:<field>`` a model path (a :class:`~.commands.TrainModels` /
    :class:`~.commands.GenerateJob` field), ``file:<field>`` an optional input file checked on
    disk, ``job:<field>`` a plain setting of the job.
    """

    name: str
    kind: str  # "path", "int", "float", "bool" or "choice"
    tooltip: str
    target: str
    default: object = None
    low: float = 0
    high: float = 0
    choices: tuple[str, ...] = ()
    advanced: bool = False

    @property
    def role(self) -> str:
        """``model``, ``file`` or ``job``."""
        return self.target.split(":", 1)[0]

    @property
    def field(self) -> str:
        """The job field the value fills."""
        return self.target.split(":", 1)[1]


def model(name: str, tooltip: str, field_name: str = "", advanced: bool = False) -> NodeInput:
    """A model path input (``field_name`` defaults to the input name)."""
    return NodeInput(name, "path", tooltip, f"model:{field_name or name}", "", advanced=advanced)


def input_file(name: str, tooltip: str, field_name: str = "", advanced: bool = False) -> NodeInput:
    """An optional input file (video, control video) that must exist when given."""
    return NodeInput(name, "path", tooltip, f"file:{field_name or name}", "", advanced=advanced)


def setting(name: str, kind: str, tooltip: str, default: object = None, low: float = 0, high: float = 0,
            choices: tuple[str, ...] = (), advanced: bool = False) -> NodeInput:  # fmt: skip
    """A job setting (``kind`` int, float, bool or choice) passed to the command builder as is."""
    if default is None:
        default = {"bool": False, "choice": choices[0] if choices else ""}.get(kind)
    return NodeInput(name, kind, tooltip, f"job:{name}", default, low, high, choices, advanced)


@dataclass(frozen=True)
class ArchSpec:
    """Scripts, flags and node inputs of one architecture."""

    key: str
    label: str
    cache_latents: str
    cache_text_encoder: str
    train: str = ""
    network_module: str = ""
    generate: str = ""
    # flag -> what it is, for the latent cache script's second model input
    latent_extra_model: str = ""
    latent_extra_required: bool = False
    vae_options: tuple[str, ...] = ()  # VAE memory flags the latent cache script accepts
    latent_switches: tuple[str, ...] = ()  # of --one_frame, --f1, --vae_cache_cpu: those the latent script takes
    te_flags: tuple[str, ...] = ()  # text encoder path flags, in order (the first is required)
    te_required: int = 1  # how many of te_flags the script requires
    te_fp8_flag: str = ""
    te_dtype_flag: str = ""  # the text encoder cache script's dtype flag, where it has one
    has_i2v_cache: bool = False
    has_model_version: bool = False
    max_blocks_to_swap: int = 0
    fps: int = 24
    tasks: tuple[str, ...] = field(default_factory=tuple)
    # --- Train LoRA / Generate Video nodes (architectures in TRAINABLE) ---
    train_description: str = ""
    train_inputs: tuple[NodeInput, ...] = ()  # after `dit`, before `output_name`
    generate_description: str = ""
    generate_inputs: tuple[NodeInput, ...] = ()  # after `vae`, before `width`
    generate_size: tuple[int, int] = (960, 544)  # default width, height
    generate_frames: int = 25  # default frame count
    end_image: bool = True  # the generate script takes --end_image_path
    lora_targets: bool = False  # Wan2.2: each LoRA goes to dit, dit_high_noise or both
    output_types: tuple[str, ...] = ("video", "images", "latent", "both")  # the generate script's --output_type


FRAMES_OUTPUT_TYPE = "images"
"""The ``--output_type`` for which every generate script here writes PNG frames (musubi v0.3.4).

``both`` writes a latent and an MP4 and no frames (hv_generate_video.py, and ``save_output`` of
wan_generate_video.py / fpack_generate_video.py); ``latent_images`` writes frames only in
FramePack (Wan writes just the latent). Frames go to ``<save_path>/<name>/<name>_NNN.png``, or
straight into ``<save_path>`` for one-frame inference (Wan, FramePack).
"""

WAN_TASKS = (
    "t2v-14B",
    "t2v-1.3B",
    "i2v-14B",
    "t2i-14B",
    "flf2v-14B",
    "t2v-1.3B-FC",
    "t2v-14B-FC",
    "i2v-14B-FC",
    "t2v-A14B",
    "i2v-A14B",
)

HV_VAE = ("--vae_tiling", "--vae_chunk_size", "--vae_spatial_tile_sample_min_size")

ARCHS: dict[str, ArchSpec] = {
    "hunyuan_video": ArchSpec(
        key="hunyuan_video",
        label="HunyuanVideo",
        cache_latents="cache_latents",
        cache_text_encoder="cache_text_encoder_outputs",
        train="hv_train_network",
        network_module="networks.lora",
        generate="hv_generate_video",
        vae_options=HV_VAE,
        te_flags=("--text_encoder1", "--text_encoder2"),
        te_required=2,
        te_fp8_flag="--fp8_llm",
        te_dtype_flag="--text_encoder_dtype",
        max_blocks_to_swap=36,
        fps=24,
        train_description="Trains a HunyuanVideo LoRA with accelerate launch hv_train_network.py in musubi's venv. "
        "Streams progress and a live log; succeeds only if the final .safetensors was written. Queued again with "
        "unchanged inputs and data, the finished run is reused.",
        train_inputs=(
            model("vae", "VAE (only needed for sampling during training)."),
            model("text_encoder1", "LLM text encoder (only for sampling)."),
            model("text_encoder2", "CLIP-L text encoder (only for sampling)."),
        ),
        generate_description="Text/image/video-to-video with musubi's hv_generate_video.py (LoRAs applied by musubi).",
        generate_inputs=(
            model("text_encoder1", "LLM text encoder."),
            model("text_encoder2", "CLIP-L text encoder."),
            input_file("video_path", "Video-to-video: input video path; empty = off.", advanced=True),
            setting(
                "strength",
                "float",
                "Video-to-video: share of the steps run on the input video; higher changes it more.",
                0.8,
                0.0,
                1.0,
                advanced=True,
            ),  # fmt: skip
        ),
        end_image=False,
    ),
    "wan": ArchSpec(
        key="wan",
        label="Wan 2.1 / 2.2",
        cache_latents="wan_cache_latents",
        cache_text_encoder="wan_cache_text_encoder_outputs",
        train="wan_train_network",
        network_module="networks.lora_wan",
        generate="wan_generate_video",
        latent_extra_model="--clip",
        latent_switches=("--one_frame", "--vae_cache_cpu"),
        te_flags=("--t5",),
        te_fp8_flag="--fp8_t5",
        has_i2v_cache=True,
        max_blocks_to_swap=39,
        fps=16,
        tasks=WAN_TASKS,
        train_description="Trains a Wan LoRA (t2v / i2v / Fun-Control; Wan2.2 A14B with high- and low-noise DiTs) "
        "with accelerate launch wan_train_network.py in musubi's venv. Queued again with unchanged inputs and data, "
        "the finished run is reused.",
        train_inputs=(
            setting("task", "choice", "Model task; *-FC = Fun-Control, *-A14B = Wan2.2.", choices=WAN_TASKS),
            model("dit_high_noise", "Wan2.2: the high-noise DiT (dit is the low-noise one); empty = low only."),
            setting(
                "timestep_boundary",
                "int",
                "Wan2.2: high/low switch timestep (0-1000); 0 = musubi's default.",
                0,
                0,
                1000,
                advanced=True,
            ),  # fmt: skip
            setting(
                "offload_inactive_dit",
                "bool",
                "Wan2.2: park the inactive DiT on CPU (not with block swap).",
                advanced=True,
            ),  # fmt: skip
            setting("one_frame", "bool", "One-frame training (image pairs).", advanced=True),
            model("vae", "Wan VAE (only for sampling)."),
            model("t5", "T5 text encoder (only for sampling).", "text_encoder1"),
            model("clip", "Wan2.1 I2V: CLIP model (only for sampling).", "image_encoder", advanced=True),
        ),
        generate_description="Text/image-to-video with musubi's wan_generate_video.py (Wan2.2 with high-noise DiT; "
        "each LoRA applied to the DiT its lora_N_target names).",
        generate_inputs=(
            setting("task", "choice", "Model task.", "t2v-1.3B", choices=WAN_TASKS),
            model("t5", "T5 text encoder.", "text_encoder1"),
            model("clip", "Wan2.1 I2V: CLIP model; else empty.", "image_encoder"),
            model(
                "dit_high_noise",
                "Wan2.2: high-noise DiT; empty = none. LoRAs apply to it through lora_N_target.",
                advanced=True,
            ),  # fmt: skip
            setting("fp8_scaled", "bool", "Scaled fp8 DiT (better than plain fp8)."),
            input_file("video_path", "Video-to-video: input video path; empty = off.", advanced=True),
            input_file(
                "control_video",
                "Fun-Control tasks (*-FC): control video path; empty = off.",
                "control_path",
                advanced=True,
            ),  # fmt: skip
        ),
        generate_size=(832, 480),
        generate_frames=81,
        lora_targets=True,
        output_types=("video", "images", "latent", "both", "latent_images"),
    ),
    "framepack": ArchSpec(
        key="framepack",
        label="FramePack",
        cache_latents="fpack_cache_latents",
        cache_text_encoder="fpack_cache_text_encoder_outputs",
        train="fpack_train_network",
        network_module="networks.lora_framepack",
        generate="fpack_generate_video",
        latent_extra_model="--image_encoder",
        latent_extra_required=True,
        vae_options=HV_VAE,
        latent_switches=("--one_frame", "--f1"),
        te_flags=("--text_encoder1", "--text_encoder2"),
        te_required=2,
        te_fp8_flag="--fp8_llm",
        max_blocks_to_swap=36,
        fps=30,
        train_description="Trains a FramePack (or F1 / one-frame) LoRA with accelerate launch fpack_train_network.py "
        "in musubi's venv. Queued again with unchanged inputs and data, the finished run is reused.",
        train_inputs=(
            model("vae", "HunyuanVideo VAE."),
            model("text_encoder1", "LLM text encoder (llava)."),
            model("text_encoder2", "CLIP-L text encoder."),
            model("image_encoder", "SigLIP image encoder."),
            setting("f1", "bool", "FramePack-F1 (forward sampling) model."),
            setting("one_frame", "bool", "One-frame (kisekaeichi-style) training.", advanced=True),
            setting("latent_window_size", "int", "Latent window size; 0 = default (9).", 0, 0, 64, advanced=True),
        ),
        generate_description="Image-to-video with musubi's fpack_generate_video.py.",
        generate_inputs=(
            model("text_encoder1", "LLM text encoder."),
            model("text_encoder2", "CLIP-L text encoder."),
            model("image_encoder", "SigLIP image encoder."),
            setting("fp8_scaled", "bool", "Scaled fp8 DiT."),
        ),
        output_types=("video", "images", "latent", "both", "latent_images"),
    ),
    "flux_kontext": ArchSpec(
        key="flux_kontext",
        label="FLUX.1 Kontext [dev]",
        cache_latents="flux_kontext_cache_latents",
        cache_text_encoder="flux_kontext_cache_text_encoder_outputs",
        vae_options=HV_VAE,
        te_flags=("--text_encoder1", "--text_encoder2"),
        te_required=2,
        te_fp8_flag="--fp8_t5",
    ),
    "qwen_image": ArchSpec(
        key="qwen_image",
        label="Qwen-Image",
        cache_latents="qwen_image_cache_latents",
        cache_text_encoder="qwen_image_cache_text_encoder_outputs",
        vae_options=HV_VAE,
        te_flags=("--text_encoder",),
        te_fp8_flag="--fp8_vl",
        has_model_version=True,
    ),
    "zimage": ArchSpec(
        key="zimage",
        label="Z-Image",
        cache_latents="zimage_cache_latents",
        cache_text_encoder="zimage_cache_text_encoder_outputs",
        te_flags=("--text_encoder",),
        te_fp8_flag="--fp8_llm",
    ),
    "hunyuan_video_1_5": ArchSpec(
        key="hunyuan_video_1_5",
        label="HunyuanVideo 1.5",
        cache_latents="hv_1_5_cache_latents",
        cache_text_encoder="hv_1_5_cache_text_encoder_outputs",
        latent_extra_model="--image_encoder",
        te_flags=("--text_encoder", "--byt5"),
        te_required=2,
        te_fp8_flag="--fp8_vl",
        has_i2v_cache=True,
    ),
}

TRAINABLE = ("hunyuan_video", "wan", "framepack")
"""Architectures with a TrainLoRA / GenerateVideo node in this pack."""

NETWORK_TYPES = {"lora": "", "loha": "networks.loha", "lokr": "networks.lokr"}
"""LyCORIS variants musubi ships (docs/loha_lokr.md); '' means the architecture's LoRA module."""


def get_arch(key: str) -> ArchSpec:
    """The spec of ``key`` or a ValueError listing the choices."""
    try:
        return ARCHS[key]
    except KeyError:
        raise ValueError(f"architecture {key!r} is not supported; choose one of {', '.join(ARCHS)}") from None
