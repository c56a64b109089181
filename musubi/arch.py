"""Architectures musubi-tuner supports and the script/flag names each one uses.

Names are from musubi-tuner v0.3.x (``src/musubi_tuner``); the integration tests parse
every generated command with musubi's own argparse definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeInput:
    """One input an architecture's train or generate node adds to the shared ones.

    Kept free of ComfyUI (the adapter turns each row into a widget) so the table stays the one
    place that says what each architecture's scripts take. ``target`` says where the value
    goes: ``model:<field>`` a model path (a :class:`~.commands.TrainModels` /
    :class:`~.commands.GenerateJob` field), ``file:<field>`` an optional input file checked on
    disk, ``job:<field>`` a plain setting of the job, ``flag:<--flag>`` a value passed straight to
    that flag of the script (the table-driven architectures; see :func:`flag_model`).
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
        """``model``, ``file``, ``job`` or ``flag``."""
        return self.target.split(":", 1)[0]

    @property
    def field(self) -> str:
        """The job field the value fills (for ``flag`` rows: the flag)."""
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


def flag_model(name: str, flag: str, tooltip: str, advanced: bool = False) -> NodeInput:
    """A model path passed straight to ``flag`` (empty = not passed); checked on disk when given."""
    return NodeInput(name, "path", tooltip, f"flag:{flag}", "", advanced=advanced)


def flag_setting(name: str, flag: str, kind: str, tooltip: str, default: object = None, low: float = 0,
                 high: float = 0, choices: tuple[str, ...] = (), advanced: bool = False) -> NodeInput:  # fmt: skip
    """A setting passed straight to ``flag``: a bool as a switch, a number unless it is 0, a choice always."""
    if default is None:
        default = {"bool": False, "choice": choices[0] if choices else ""}.get(kind)
    return NodeInput(name, kind, tooltip, f"flag:{flag}", default, low, high, choices, advanced)


@dataclass(frozen=True)
class Trainer:
    """A training script of an architecture besides its LoRA trainer (full fine-tuning).

    ``inputs`` are the architecture-specific inputs of its node (flag targets), ``lacks`` the flags
    of the shared config nodes the script's parser does not define (a config that sets one is an
    error naming the input, never a flag musubi would refuse after a model load).
    """

    function: str  # node id part: MusubiTuner_<function>_<arch node name>
    script: str
    description: str
    inputs: tuple[NodeInput, ...] = ()
    lacks: frozenset[str] = frozenset()
    sample_needs: tuple[str, ...] = ()  # input names sampling during training needs


@dataclass(frozen=True)
class GenImage:
    """An IMAGE input of a generate node, saved as PNG and passed to ``flag``."""

    name: str
    flag: str
    tooltip: str
    every_frame: bool = False  # each frame of the batch is one file (the flag takes several)


@dataclass(frozen=True)
class GenSpec:
    """How one generate script is driven (the scripts differ in flag names, size and output layout).

    Read from each script's ``parse_args()`` and save code in musubi-tuner v0.3.4. An empty flag
    means the script has no such option, so the node has no such input.
    """

    script: str
    video: bool = False
    prompt_flag: str = "--prompt"  # "" = a positional prompt (given after "--")
    negative_flag: str = "--negative_prompt"
    size_flag: str = "--image_size"  # takes H W; "" = --width / --height
    frames_flag: str = ""  # video: the frame count flag
    frames_rule: str = ""  # "4n+1": frame counts the VAE accepts
    fps_flag: str = ""
    steps_flag: str = "--infer_steps"
    guidance_flag: str = "--guidance_scale"
    flow_shift_flag: str = "--flow_shift"
    attention: tuple[tuple[str, tuple[str, ...]], ...] = ()  # node choice -> flags
    fp8: tuple[tuple[str, str], ...] = ()  # node input (fp8, fp8_scaled, fp8_text_encoder) -> flag
    blocks_to_swap: bool = True
    lycoris: bool = True  # the script has --lycoris (LoHa / LoKr through the LyCORIS library)
    output: str = "dir"  # dir: --save_path folder; file: --save_path <folder>/<arch>.png; output: --output file
    output_type: bool = True  # pass --output_type images
    images: tuple[GenImage, ...] = ()
    inputs: tuple[NodeInput, ...] = ()  # after `dit`; flag targets
    required: tuple[str, ...] = ()  # inputs of `inputs` that must be filled
    size: tuple[int, int] = (1024, 1024)  # default width, height
    frames: int = 1
    fps: int = 0
    description: str = ""


def attn_mode(*modes: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``--attn_mode <mode>`` choices."""
    return tuple((m, ("--attn_mode", m)) for m in modes)


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
    # --- architectures added after the first three (table driven: every input names its flag) ---
    node_name: str = ""  # node id part: MusubiTuner_<Function>_<node_name>
    latent_vae_required: bool = True  # HiDream-O1 caches pixels: no VAE
    version_flag: str = ""  # cache scripts' model version flag (--model_version / --model_type), with version_choices
    version_choices: tuple[str, ...] = ()
    latent_version: bool = True  # the latent cache script takes the version flag too (not HiDream-O1's pixel cache)
    train_sample_needs: tuple[str, ...] = ()  # train_inputs sampling during training needs
    train_te_fp8_flag: str = ""  # Memory Optimizer fp8_text_encoder -> this training flag
    train_fp8_scaled: bool = False  # the training script has --fp8_scaled
    train_fp8_only_scaled: bool = False  # the script refuses --fp8_base without --fp8_scaled: added with it
    train_vae_options: tuple[str, ...] = ()  # Memory Optimizer VAE flags the (full fine-tuning) script takes
    trainers: tuple[Trainer, ...] = ()  # full fine-tuning scripts
    gen: GenSpec | None = None  # generate script of the architectures after the first three

    @property
    def table_driven(self) -> bool:
        """Whether the train / generate commands are built from flag targets (all but the first three)."""
        return self.key not in LEGACY


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
GEN_ATTN = attn_mode("sdpa", "torch", "flash", "sageattn", "xformers")
QWEN_VERSIONS = ("original", "edit", "edit-2509", "edit-2511", "layered")
FLUX2_VERSIONS = ("dev", "klein-4b", "klein-base-4b", "klein-9b", "klein-base-9b")
HIDREAM_TYPES = ("full", "dev")
IDEOGRAM_PRESETS = ("V4_DEFAULT_20", "V4_QUALITY_48", "V4_TURBO_12")
K5_TASKS = (
    "k5-lite-t2i-hd", "k5-lite-i2i-hd", "k5-lite-t2v-5s-sd", "k5-lite-t2v-10s-sd", "k5-lite-i2v-5s-sd",
    "k5-pro-t2v-5s-sd", "k5-pro-t2v-5s-hd", "k5-pro-t2v-10s-sd", "k5-pro-t2v-10s-hd", "k5-pro-i2v-5s-sd",
    "k5-pro-i2v-5s-hd", "k5-lite-t2v-5s-distil-sd", "k5-lite-t2v-10s-distil-sd", "k5-lite-t2v-5s-nocfg-sd",
    "k5-lite-t2v-10s-nocfg-sd", "k5-lite-t2v-5s-pretrain-sd", "k5-lite-t2v-10s-pretrain-sd",
)  # fmt: skip
"""kandinsky5 TASK_CONFIGS keys (the generate script's --task choices; training takes the same names)."""

FT_SWITCHES = (
    flag_setting("full_bf16", "--full_bf16", "bool", "Keep the weights and gradients in bf16 (needs mixed_precision "
                 "bf16): much less memory."),
    flag_setting("fused_backward_pass", "--fused_backward_pass", "bool", "Apply the optimizer during the backward "
                 "pass (Adafactor): less memory."),
    flag_setting("mem_eff_save", "--mem_eff_save", "bool", "Save checkpoints with little extra RAM.", advanced=True),
)  # fmt: skip
"""Memory switches of the full fine-tuning scripts (qwen_image_train, zimage_train, hidream_o1_train)."""

FT_OPTIMIZER_PATCH = flag_setting(
    "block_swap_optimizer_patch_params", "--block_swap_optimizer_patch_params", "bool",
    "With block swap: let the optimizer step on swapped-out parameters.", advanced=True,
)  # fmt: skip

HIDREAM_TRAIN = (
    flag_setting("model_type", "--model_type", "choice", "full or dev (distilled) checkpoint.", choices=HIDREAM_TYPES),
    flag_setting("task", "--task", "choice", "t2i, or i2i (dataset with control images).", choices=("t2i", "i2i")),
)

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
        node_name="HunyuanVideo",
        train_te_fp8_flag="--fp8_llm",
        train_vae_options=HV_VAE,
        trainers=(
            Trainer(
                "FineTune",
                "hv_train",
                "Full fine-tuning of the HunyuanVideo DiT with accelerate launch hv_train.py (writes a whole DiT, not a "
                "LoRA). Use a low learning rate (about 1e-6).",
                inputs=(
                    flag_model("vae", "--vae", "VAE; only for sampling during training."),
                    flag_model("text_encoder1", "--text_encoder1", "LLM text encoder; only for sampling."),
                    flag_model("text_encoder2", "--text_encoder2", "CLIP-L text encoder; only for sampling."),
                    flag_setting(
                        "full_bf16",
                        "--full_bf16",
                        "bool",
                        "Keep the weights and gradients in bf16 (needs mixed_precision bf16): much less memory.",
                    ),
                ),
                lacks=frozenset(
                    {
                        "--fp8_base",
                        "--save_precision",
                        "--use_pinned_memory_for_block_swap",
                        "--block_swap_h2d_only",
                        "--gradient_checkpointing_cpu_offload",
                    }
                ),
                sample_needs=("vae", "text_encoder1", "text_encoder2"),
            ),
        ),
        train_description="Trains a HunyuanVideo LoRA with accelerate launch hv_train_network.py in musubi's venv. "
        "Streams progress and a live log; succeeds only if the final .safetensors was written.",
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
        node_name="Wan",
        train_description="Trains a Wan LoRA (t2v / i2v / Fun-Control; Wan2.2 A14B with high- and low-noise DiTs) "
        "with accelerate launch wan_train_network.py in musubi's venv.",
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
        node_name="FramePack",
        train_description="Trains a FramePack (or F1 / one-frame) LoRA with accelerate launch fpack_train_network.py "
        "in musubi's venv.",
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
        node_name="FluxKontext",
        cache_latents="flux_kontext_cache_latents",
        cache_text_encoder="flux_kontext_cache_text_encoder_outputs",
        vae_options=HV_VAE,
        te_flags=("--text_encoder1", "--text_encoder2"),
        te_required=2,
        te_fp8_flag="--fp8_t5",
        train="flux_kontext_train_network",
        network_module="networks.lora_flux",
        train_description="Trains a FLUX.1 Kontext [dev] LoRA (image editing: dataset with control images) with "
        "accelerate launch flux_kontext_train_network.py in musubi's venv.",
        train_inputs=(
            flag_model("vae", "--vae", "FLUX.1 AE (ae.safetensors); only needed for sampling during training."),
            flag_model("text_encoder1", "--text_encoder1", "T5-XXL text encoder; only for sampling."),
            flag_model("text_encoder2", "--text_encoder2", "CLIP-L text encoder; only for sampling."),
        ),
        train_sample_needs=("vae", "text_encoder1", "text_encoder2"),
        train_te_fp8_flag="--fp8_t5",
        train_fp8_scaled=True,
        gen=GenSpec(
            script="flux_kontext_generate_image",
            negative_flag="",
            guidance_flag="--embedded_cfg_scale",
            attention=GEN_ATTN,
            fp8=(("fp8", "--fp8"), ("fp8_scaled", "--fp8_scaled"), ("fp8_text_encoder", "--fp8_t5")),
            images=(GenImage("control_image", "--control_image_path", "Reference image Kontext edits (first frame)."),),
            inputs=(
                flag_model("vae", "--vae", "FLUX.1 AE (ae.safetensors)."),
                flag_model("text_encoder1", "--text_encoder1", "T5-XXL text encoder."),
                flag_model("text_encoder2", "--text_encoder2", "CLIP-L text encoder."),
                flag_setting(
                    "no_resize_control",
                    "--no_resize_control",
                    "bool",
                    "Keep the control image's size instead of resizing it.",
                    advanced=True,
                ),
            ),
            required=("vae", "text_encoder1", "text_encoder2"),
            description="Image editing / text-to-image with musubi's flux_kontext_generate_image.py.",
        ),
    ),
    "qwen_image": ArchSpec(
        key="qwen_image",
        label="Qwen-Image",
        node_name="QwenImage",
        cache_latents="qwen_image_cache_latents",
        cache_text_encoder="qwen_image_cache_text_encoder_outputs",
        vae_options=HV_VAE,
        te_flags=("--text_encoder",),
        te_fp8_flag="--fp8_vl",
        has_model_version=True,
        version_choices=QWEN_VERSIONS,
        train="qwen_image_train_network",
        network_module="networks.lora_qwen_image",
        train_description="Trains a Qwen-Image / Qwen-Image-Edit LoRA with accelerate launch "
        "qwen_image_train_network.py in musubi's venv (model_version picks the model; Edit needs control images).",
        train_inputs=(
            flag_setting(
                "model_version",
                "--model_version",
                "choice",
                "Which Qwen-Image model the DiT is.",
                choices=QWEN_VERSIONS,
            ),
            flag_model("vae", "--vae", "Qwen-Image VAE; only for sampling during training."),
            flag_model("text_encoder", "--text_encoder", "Qwen2.5-VL text encoder; only for sampling."),
        ),
        train_sample_needs=("vae", "text_encoder"),
        train_te_fp8_flag="--fp8_vl",
        train_fp8_scaled=True,
        trainers=(
            Trainer(
                "FineTune",
                "qwen_image_train",
                "Full fine-tuning of the Qwen-Image DiT with accelerate launch qwen_image_train.py (writes a whole "
                "DiT, not a LoRA). Use a low learning rate (about 1e-6) and Adafactor as musubi's docs do.",
                inputs=(
                    flag_setting(
                        "model_version",
                        "--model_version",
                        "choice",
                        "Which Qwen-Image model the DiT is.",
                        choices=QWEN_VERSIONS,
                    ),
                    flag_model("vae", "--vae", "Qwen-Image VAE; only for sampling during training."),
                    flag_model("text_encoder", "--text_encoder", "Qwen2.5-VL text encoder; only for sampling."),
                    *FT_SWITCHES,
                ),
                sample_needs=("vae", "text_encoder"),
            ),
        ),
        gen=GenSpec(
            script="qwen_image_generate_image",
            attention=GEN_ATTN,
            fp8=(("fp8", "--fp8"), ("fp8_scaled", "--fp8_scaled")),
            images=(
                GenImage(
                    "control_image",
                    "--control_image_path",
                    "Edit models: the image(s) to edit, one per frame of the batch.",
                    every_frame=True,
                ),
            ),
            inputs=(
                flag_setting(
                    "model_version",
                    "--model_version",
                    "choice",
                    "Which Qwen-Image model the DiT is.",
                    choices=QWEN_VERSIONS,
                ),
                flag_model("vae", "--vae", "Qwen-Image VAE."),
                flag_model("text_encoder", "--text_encoder", "Qwen2.5-VL text encoder."),
                flag_setting(
                    "resize_control_to_official_size",
                    "--resize_control_to_official_size",
                    "bool",
                    "Edit: resize the control image to the model's official size.",
                    advanced=True,
                ),
                flag_setting(
                    "text_encoder_cpu",
                    "--text_encoder_cpu",
                    "bool",
                    "Run the text encoder on the CPU (less VRAM, slower).",
                    advanced=True,
                ),
            ),
            required=("vae", "text_encoder"),
            description="Text-to-image and image editing with musubi's qwen_image_generate_image.py.",
        ),
    ),
    "zimage": ArchSpec(
        key="zimage",
        label="Z-Image",
        node_name="ZImage",
        cache_latents="zimage_cache_latents",
        cache_text_encoder="zimage_cache_text_encoder_outputs",
        te_flags=("--text_encoder",),
        te_fp8_flag="--fp8_llm",
        train="zimage_train_network",
        network_module="networks.lora_zimage",
        train_description="Trains a Z-Image LoRA with accelerate launch zimage_train_network.py in musubi's venv.",
        train_inputs=(
            flag_model("vae", "--vae", "Z-Image VAE; only for sampling during training."),
            flag_model("text_encoder", "--text_encoder", "Qwen3 text encoder; only for sampling."),
            flag_setting(
                "use_32bit_attention",
                "--use_32bit_attention",
                "bool",
                "Attention in fp32 (steadier, slower).",
                advanced=True,
            ),
        ),
        train_sample_needs=("vae", "text_encoder"),
        train_te_fp8_flag="--fp8_llm",
        train_fp8_scaled=True,
        trainers=(
            Trainer(
                "FineTune",
                "zimage_train",
                "Full fine-tuning of the Z-Image DiT with accelerate launch zimage_train.py (writes a whole DiT, not "
                "a LoRA). Use a low learning rate (about 1e-6) and Adafactor as musubi's docs do.",
                inputs=(
                    flag_model("vae", "--vae", "Z-Image VAE; only for sampling during training."),
                    flag_model("text_encoder", "--text_encoder", "Qwen3 text encoder; only for sampling."),
                    *FT_SWITCHES,
                    FT_OPTIMIZER_PATCH,
                ),
                sample_needs=("vae", "text_encoder"),
            ),
        ),
        gen=GenSpec(
            script="zimage_generate_image",
            attention=GEN_ATTN,
            fp8=(("fp8", "--fp8"), ("fp8_scaled", "--fp8_scaled"), ("fp8_text_encoder", "--fp8_llm")),
            inputs=(
                flag_model("vae", "--vae", "Z-Image VAE."),
                flag_model("text_encoder", "--text_encoder", "Qwen3 text encoder."),
                flag_setting(
                    "text_encoder_cpu",
                    "--text_encoder_cpu",
                    "bool",
                    "Run the text encoder on the CPU (less VRAM, slower).",
                    advanced=True,
                ),
            ),
            required=("vae", "text_encoder"),
            description="Text-to-image with musubi's zimage_generate_image.py.",
        ),
    ),
    "hunyuan_video_1_5": ArchSpec(
        key="hunyuan_video_1_5",
        label="HunyuanVideo 1.5",
        node_name="HunyuanVideo15",
        cache_latents="hv_1_5_cache_latents",
        cache_text_encoder="hv_1_5_cache_text_encoder_outputs",
        latent_extra_model="--image_encoder",
        te_flags=("--text_encoder", "--byt5"),
        te_required=2,
        te_fp8_flag="--fp8_vl",
        has_i2v_cache=True,
        fps=24,
        train="hv_1_5_train_network",
        network_module="networks.lora_hv_1_5",
        train_description="Trains a HunyuanVideo 1.5 LoRA (t2v or i2v) with accelerate launch hv_1_5_train_network.py "
        "in musubi's venv.",
        train_inputs=(
            flag_setting(
                "task", "--task", "choice", "t2v or i2v (i2v also needs the i2v latent cache).", choices=("t2v", "i2v")
            ),
            flag_model("vae", "--vae", "HunyuanVideo 1.5 VAE; only for sampling during training."),
            flag_model("text_encoder", "--text_encoder", "Qwen2.5-VL text encoder; only for sampling."),
            flag_model("byt5", "--byt5", "byT5 text encoder; only for sampling."),
            flag_model(
                "image_encoder", "--image_encoder", "i2v: SigLIP image encoder; only for sampling.", advanced=True
            ),
        ),
        train_sample_needs=("vae", "text_encoder", "byt5"),
        train_te_fp8_flag="--fp8_vl",
        train_fp8_scaled=True,
        gen=GenSpec(
            script="hv_1_5_generate_video",
            video=True,
            size_flag="--video_size",
            frames_flag="--video_length",
            frames_rule="4n+1",
            fps_flag="--fps",
            attention=GEN_ATTN,
            fp8=(("fp8", "--fp8"), ("fp8_scaled", "--fp8_scaled")),
            images=(GenImage("image", "--image_path", "Start image for image-to-video (i2v DiT; first frame)."),),
            inputs=(
                flag_model("vae", "--vae", "HunyuanVideo 1.5 VAE."),
                flag_model("text_encoder", "--text_encoder", "Qwen2.5-VL text encoder."),
                flag_model("byt5", "--byt5", "byT5 text encoder."),
                flag_model("image_encoder", "--image_encoder", "i2v: SigLIP image encoder; else empty."),
                flag_setting(
                    "text_encoder_cpu",
                    "--text_encoder_cpu",
                    "bool",
                    "Run the text encoders on the CPU (less VRAM, slower).",
                    advanced=True,
                ),
            ),
            required=("vae", "text_encoder", "byt5"),
            size=(848, 480),
            frames=21,
            fps=24,
            description="Text/image-to-video with musubi's hv_1_5_generate_video.py.",
        ),
    ),
    "flux_2": ArchSpec(
        key="flux_2",
        label="FLUX.2 dev / klein",
        node_name="Flux2",
        cache_latents="flux_2_cache_latents",
        cache_text_encoder="flux_2_cache_text_encoder_outputs",
        te_flags=("--text_encoder",),
        te_fp8_flag="--fp8_text_encoder",
        version_flag="--model_version",
        version_choices=FLUX2_VERSIONS,
        train="flux_2_train_network",
        network_module="networks.lora_flux_2",
        train_description="Trains a FLUX.2 [dev] / [klein] LoRA with accelerate launch flux_2_train_network.py in "
        "musubi's venv (timestep_sampling flux2_shift is what musubi's docs recommend).",
        train_inputs=(
            flag_setting(
                "model_version", "--model_version", "choice", "Which FLUX.2 model the DiT is.", choices=FLUX2_VERSIONS
            ),
            flag_model("vae", "--vae", "FLUX.2 AE; only for sampling during training."),
            flag_model(
                "text_encoder", "--text_encoder", "Mistral 3 (dev) / Qwen3 (klein) text encoder; only for sampling."
            ),
        ),
        train_sample_needs=("vae", "text_encoder"),
        train_te_fp8_flag="--fp8_text_encoder",
        train_fp8_scaled=True,
        gen=GenSpec(
            script="flux_2_generate_image",
            attention=GEN_ATTN,
            fp8=(("fp8", "--fp8"), ("fp8_scaled", "--fp8_scaled"), ("fp8_text_encoder", "--fp8_text_encoder")),
            images=(
                GenImage(
                    "control_image",
                    "--control_image_path",
                    "Reference image(s), one per frame of the batch; empty = text-to-image.",
                    every_frame=True,
                ),
            ),
            inputs=(
                flag_setting(
                    "model_version",
                    "--model_version",
                    "choice",
                    "Which FLUX.2 model the DiT is.",
                    choices=FLUX2_VERSIONS,
                ),
                flag_model("vae", "--vae", "FLUX.2 AE."),
                flag_model("text_encoder", "--text_encoder", "Mistral 3 (dev) / Qwen3 (klein) text encoder."),
                flag_setting(
                    "embedded_cfg_scale",
                    "--embedded_cfg_scale",
                    "float",
                    "Embedded guidance (dev); 0 = musubi's default (4.0).",
                    0.0,
                    0.0,
                    100.0,
                    advanced=True,
                ),
            ),
            required=("vae", "text_encoder"),
            description="Text-to-image and multi-reference editing with musubi's flux_2_generate_image.py.",
        ),
    ),
    "kandinsky5": ArchSpec(
        key="kandinsky5",
        label="Kandinsky 5",
        node_name="Kandinsky5",
        cache_latents="kandinsky5_cache_latents",
        cache_text_encoder="kandinsky5_cache_text_encoder_outputs",
        te_flags=("--text_encoder_qwen", "--text_encoder_clip"),
        te_required=2,
        fps=24,
        tasks=K5_TASKS,
        train="kandinsky5_train_network",
        network_module="networks.lora_kandinsky",
        train_description="Trains a Kandinsky 5 LoRA with accelerate launch kandinsky5_train_network.py in musubi's "
        "venv (task names the model the DiT is).",
        train_inputs=(
            flag_setting(
                "task",
                "--task",
                "choice",
                "The Kandinsky 5 model (task) the DiT is.",
                "k5-lite-t2v-5s-sd",
                choices=K5_TASKS,
            ),
            flag_model("vae", "--vae", "Kandinsky 5 VAE; only for sampling during training."),
            flag_model("text_encoder_qwen", "--text_encoder_qwen", "Qwen2.5-VL text encoder; only for sampling."),
            flag_model("text_encoder_clip", "--text_encoder_clip", "CLIP-L text encoder; only for sampling."),
            flag_setting(
                "scheduler_scale",
                "--scheduler_scale",
                "float",
                "Sampling scheduler scale; 0 = the task's default.",
                0.0,
                0.0,
                100.0,
                advanced=True,
            ),
        ),
        train_sample_needs=("vae", "text_encoder_qwen", "text_encoder_clip"),
        train_fp8_scaled=True,
        gen=GenSpec(
            script="kandinsky5_generate_video",
            video=True,
            size_flag="",
            frames_flag="--frames",
            steps_flag="--steps",
            guidance_flag="--guidance",
            flow_shift_flag="",
            attention=(
                ("sdpa", ("--sdpa",)),
                ("flash", ("--flash_attn",)),
                ("flash3", ("--flash3",)),
                ("sage", ("--sage_attn",)),
                ("xformers", ("--xformers",)),
            ),
            fp8=(("fp8", "--fp8_base"), ("fp8_scaled", "--fp8_scaled")),
            lycoris=False,
            output="output",
            output_type=False,
            images=(
                GenImage("image", "--i", "Start image for i2v tasks (first frame)."),
                GenImage("end_image", "--image_last", "i2v: last frame (first_last conditioning)."),
            ),
            inputs=(
                flag_setting(
                    "task",
                    "--task",
                    "choice",
                    "The Kandinsky 5 model (task) the DiT is.",
                    "k5-lite-t2v-5s-sd",
                    choices=K5_TASKS,
                ),
                flag_model("vae", "--vae", "Kandinsky 5 VAE."),
                flag_model("text_encoder_qwen", "--text_encoder_qwen", "Qwen2.5-VL text encoder."),
                flag_model("text_encoder_clip", "--text_encoder_clip", "CLIP-L text encoder."),
                flag_setting(
                    "scheduler_scale",
                    "--scheduler_scale",
                    "float",
                    "Scheduler scale; 0 = the task's default.",
                    0.0,
                    0.0,
                    100.0,
                    advanced=True,
                ),
                flag_setting(
                    "offload_dit_during_sampling",
                    "--offload_dit_during_sampling",
                    "bool",
                    "Move the DiT to the CPU while the VAE decodes (less VRAM).",
                    advanced=True,
                ),
            ),
            required=("vae", "text_encoder_qwen", "text_encoder_clip"),
            size=(512, 512),
            frames=17,
            fps=24,
            description="Text/image-to-video (and the t2i / i2i tasks) with musubi's kandinsky5_generate_video.py.",
        ),
    ),
    "hidream_o1": ArchSpec(
        key="hidream_o1",
        label="HiDream-O1",
        node_name="HiDreamO1",
        cache_latents="hidream_o1_cache_pixel",
        latent_vae_required=False,
        latent_version=False,
        cache_text_encoder="hidream_o1_cache_text_encoder_outputs",
        te_flags=("--dit",),
        te_required=0,
        te_fp8_flag="--fp8_te",
        version_flag="--model_type",
        version_choices=HIDREAM_TYPES,
        train="hidream_o1_train_network",
        network_module="networks.lora_hidream_o1",
        train_description="Trains a HiDream-O1-Image LoRA (t2i, or i2i with control images) with accelerate launch "
        "hidream_o1_train_network.py in musubi's venv. The DiT holds the text model too: no VAE or text encoder.",
        train_inputs=HIDREAM_TRAIN,
        train_fp8_scaled=True,
        train_fp8_only_scaled=True,
        trainers=(
            Trainer(
                "FineTune",
                "hidream_o1_train",
                "Full fine-tuning of HiDream-O1-Image with accelerate launch hidream_o1_train.py (writes a whole "
                "model, not a LoRA). Use a low learning rate (about 1e-6) and Adafactor as musubi's docs do.",
                inputs=(*HIDREAM_TRAIN, *FT_SWITCHES, FT_OPTIMIZER_PATCH),
            ),
        ),
        gen=GenSpec(
            script="hidream_o1_generate_image",
            negative_flag="",
            attention=(("sdpa", ()), ("flash", ("--flash_attn",))),
            lycoris=False,
            output="file",
            output_type=False,
            images=(
                GenImage(
                    "ref_images",
                    "--ref_images",
                    "Reference images for editing / subject-driven generation, one per frame of the batch.",
                    every_frame=True,
                ),
            ),
            inputs=(
                flag_setting(
                    "model_type", "--model_type", "choice", "full or dev (distilled) checkpoint.", choices=HIDREAM_TYPES
                ),
                flag_setting(
                    "keep_original_aspect",
                    "--keep_original_aspect",
                    "bool",
                    "Keep the reference image's aspect ratio.",
                    advanced=True,
                ),
            ),
            size=(2048, 2048),
            description="Text-to-image and reference-based editing with musubi's hidream_o1_generate_image.py.",
        ),
    ),
    "ideogram4": ArchSpec(
        key="ideogram4",
        label="Ideogram 4",
        node_name="Ideogram4",
        cache_latents="ideogram4_cache_latents",
        cache_text_encoder="ideogram4_cache_text_encoder_outputs",
        te_flags=("--text_encoder",),
        max_blocks_to_swap=33,
        train="ideogram4_train_network",
        network_module="networks.lora_ideogram4",
        train_description="Trains an Ideogram 4 LoRA (experimental in musubi) with accelerate launch "
        "ideogram4_train_network.py in musubi's venv (weighting_scheme must stay none).",
        train_inputs=(
            flag_model("vae", "--vae", "FLUX.2 VAE; only for sampling during training."),
            flag_model("text_encoder", "--text_encoder", "Qwen3-VL text encoder; only for sampling."),
            flag_model(
                "unconditional_dit",
                "--unconditional_dit",
                "Unconditional DiT for sampling with the official CFG; empty = single-DiT CFG.",
                advanced=True,
            ),
            flag_setting(
                "sampler_preset",
                "--sampler_preset",
                "choice",
                "Sampling step schedule.",
                choices=IDEOGRAM_PRESETS,
                advanced=True,
            ),
        ),
        train_sample_needs=("vae", "text_encoder"),
        gen=GenSpec(
            script="ideogram4_generate_image",
            negative_flag="",
            steps_flag="",
            guidance_flag="",
            flow_shift_flag="",
            attention=attn_mode("sdpa", "torch", "flash", "xformers"),
            blocks_to_swap=False,
            lycoris=False,
            output_type=False,
            inputs=(
                flag_model("vae", "--vae", "FLUX.2 VAE."),
                flag_model("text_encoder", "--text_encoder", "Qwen3-VL text encoder."),
                flag_model(
                    "unconditional_dit", "--unconditional_dit", "Unconditional DiT (official CFG); empty = none."
                ),
                flag_setting(
                    "sampler_preset",
                    "--sampler_preset",
                    "choice",
                    "Step schedule (20, 48 or 12 steps).",
                    choices=IDEOGRAM_PRESETS,
                ),
                flag_setting(
                    "warn_on_caption_issues",
                    "--warn_on_caption_issues",
                    "bool",
                    "Accept a plain-text prompt (the model expects structured JSON; musubi then only warns).",
                    True,
                ),
                flag_setting(
                    "split_attn", "--split_attn", "bool", "Attention one sample at a time (less VRAM).", advanced=True
                ),
            ),
            required=("vae", "text_encoder"),
            description="Text-to-image with musubi's ideogram4_generate_image.py (experimental in musubi).",
        ),
    ),
    "krea2": ArchSpec(
        key="krea2",
        label="Krea 2",
        node_name="Krea2",
        cache_latents="krea2_cache_latents",
        cache_text_encoder="krea2_cache_text_encoder_outputs",
        vae_options=HV_VAE,
        te_flags=("--text_encoder",),
        te_dtype_flag="--text_encoder_dtype",
        train="krea2_train_network",
        network_module="networks.lora_krea2",
        train_description="Trains a Krea 2 LoRA (experimental in musubi) with accelerate launch krea2_train_network.py "
        "in musubi's venv.",
        train_inputs=(
            flag_model("vae", "--vae", "Qwen-Image VAE; only for sampling during training."),
            flag_model("text_encoder", "--text_encoder", "Qwen3-VL 4B text encoder; only for sampling."),
            flag_model(
                "turbo_dit",
                "--turbo_dit",
                "Turbo DiT used for sampling during training; empty = the trained DiT.",
                advanced=True,
            ),
        ),
        train_sample_needs=("vae", "text_encoder"),
        train_fp8_scaled=True,
        train_fp8_only_scaled=True,
        gen=GenSpec(
            script="krea2_generate_image",
            prompt_flag="",
            size_flag="",
            steps_flag="--steps",
            flow_shift_flag="",
            attention=attn_mode("torch", "flash", "sageattn", "xformers"),
            fp8=(("fp8_scaled", "--fp8_scaled"),),
            lycoris=False,
            output_type=False,
            inputs=(
                flag_model("vae", "--vae", "Qwen-Image VAE."),
                flag_model("text_encoder", "--text_encoder", "Qwen3-VL 4B text encoder."),
                flag_setting(
                    "mu",
                    "--mu",
                    "float",
                    "Schedule shift mu; 0 = from the resolution (turbo DiT: 1.15).",
                    0.0,
                    0.0,
                    10.0,
                    advanced=True,
                ),
                flag_setting(
                    "text_encoder_cpu",
                    "--text_encoder_cpu",
                    "bool",
                    "Run the text encoder on the CPU (less VRAM, slower).",
                    advanced=True,
                ),
            ),
            required=("vae", "text_encoder"),
            description="Text-to-image with musubi's krea2_generate_image.py (experimental in musubi).",
        ),
    ),
}

LEGACY = ("hunyuan_video", "wan", "framepack")
"""The first three architectures: their train / generate commands are built by hand in commands.py."""

TRAINABLE = LEGACY
"""Architectures of the Memory Optimizer's suggestion (its choices are frozen in saved workflows)."""

LORA_ARCHS = tuple(ARCHS)
"""Every architecture has a Train LoRA node."""

GENERATE_ARCHS = tuple(k for k, s in ARCHS.items() if k in LEGACY or s.gen is not None)
"""Every architecture has a generate node (Generate Video or Generate Image)."""

LYCORIS_TRAIN_ARCHS = (
    "hunyuan_video", "wan", "framepack", "flux_kontext", "qwen_image", "zimage", "hunyuan_video_1_5", "flux_2",
)  # fmt: skip
"""Architectures musubi's networks.loha / networks.lokr recognise (networks/network_arch.py detect_arch_config)."""

NETWORK_TYPES = {"lora": "", "loha": "networks.loha", "lokr": "networks.lokr"}
"""LyCORIS variants musubi ships (docs/loha_lokr.md); '' means the architecture's LoRA module."""


def get_arch(key: str) -> ArchSpec:
    """The spec of ``key`` or a ValueError listing the choices."""
    try:
        return ARCHS[key]
    except KeyError:
        raise ValueError(f"architecture {key!r} is not supported; choose one of {', '.join(ARCHS)}") from None
