"""Architectures musubi-tuner supports and the script/flag names each one uses.

Names are from musubi-tuner v0.3.x (``src/musubi_tuner``); the integration tests parse
every generated command with musubi's own argparse definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    """Scripts and model inputs of one architecture."""

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
    te_flags: tuple[str, ...] = ()  # text encoder path flags, in order (the first is required)
    te_required: int = 1  # how many of te_flags the script requires
    te_fp8_flag: str = ""
    has_i2v_cache: bool = False
    has_model_version: bool = False
    max_blocks_to_swap: int = 0
    fps: int = 24
    tasks: tuple[str, ...] = field(default_factory=tuple)


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
        max_blocks_to_swap=36,
        fps=24,
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
        te_flags=("--t5",),
        te_fp8_flag="--fp8_t5",
        has_i2v_cache=True,
        max_blocks_to_swap=39,
        fps=16,
        tasks=(
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
        ),
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
        te_flags=("--text_encoder1", "--text_encoder2"),
        te_required=2,
        te_fp8_flag="--fp8_llm",
        max_blocks_to_swap=36,
        fps=30,
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
