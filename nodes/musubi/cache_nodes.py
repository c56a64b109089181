"""Cache nodes: encode a dataset's media (VAE) and captions (text encoders) with musubi's
``<arch>_cache_*.py`` scripts. One node per step; the architecture is a choice from the
table in ``musubi/arch.py``, which also says which flags each architecture's script takes.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ...musubi import arch as archs
from ...musubi import commands
from .paths import cache_dirs, checked_env
from .running import run
from .widgets import DatasetT, boolean, choice, env_input, extra_args_input, integer, string


def _model_version_input():
    """The ``model_version`` input both cache nodes take (same flag, same choices)."""
    return string(
        "model_version",
        "Qwen-Image: original, edit, edit-2509, edit-2511, layered; FLUX.2: dev, klein-4b, klein-base-4b, "
        "klein-9b, klein-base-9b; HiDream-O1 (text cache): full or dev. Empty = the script's default.",
        advanced=True,
    )


def _common_inputs():
    return [
        integer("batch_size", "Items per batch; 0 = musubi's default.", 0, 0, 1024),
        integer("num_workers", "Data loader workers; 0 = musubi's default.", 0, 0, 64, advanced=True),
        boolean("skip_existing", "Keep caches that already exist (faster reruns).", True),
        boolean("keep_cache", "Keep cache files of items no longer in the dataset.", False, advanced=True),
        string("device", "Device, e.g. cuda or cuda:1; empty = musubi's default.", advanced=True),
        extra_args_input(),
    ]


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_CacheLatents",
            display_name="Musubi Cache Latents",
            category="MusubiTuner/data",
            description="Encodes the dataset with the VAE into cache files (musubi's <arch>_cache_latents.py). "
            "Run before training; with skip_existing, reruns only encode new files.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                env_input(),
                DatasetT.Input("dataset", tooltip="The dataset config to cache."),
                choice("architecture", "Model family the caches are for.", tuple(archs.ARCHS)),
                string("vae", "VAE checkpoint path (HiDream-O1 caches pixels: leave empty)."),
                string(
                    "image_encoder",
                    "FramePack / HunyuanVideo 1.5 I2V: SigLIP image encoder; Wan2.1 I2V: CLIP model. Else empty.",
                ),
                boolean("i2v", "Wan / HunyuanVideo 1.5: cache image features for image-to-video training."),
                boolean("vae_tiling", "HunyuanVideo-family VAEs: spatial tiling (less VRAM)."),
                integer(
                    "vae_chunk_size",
                    "HunyuanVideo-family VAEs: causal conv chunk size; 0 = off (32 or 16 save VRAM).",
                    0,
                    0,
                    1024,
                ),
                integer(
                    "vae_spatial_tile_sample_min_size",
                    "Tile size in pixels with tiling; 0 = default (256).",
                    0,
                    0,
                    4096,
                    advanced=True,
                ),
                boolean("vae_cache_cpu", "Wan: keep the VAE's internal cache on the CPU (less VRAM).", advanced=True),
                boolean("one_frame", "Wan / FramePack: cache for one-frame training.", advanced=True),
                boolean("f1", "FramePack: cache for the F1 model.", advanced=True),
                _model_version_input(),
                *_common_inputs(),
            ],
            outputs=[
                DatasetT.Output(display_name="dataset", tooltip="The same dataset, cached (chain to the next step)."),
                io.String.Output(display_name="log_path", tooltip="The script's full log."),
            ],
        )

    @classmethod
    def execute(cls, dataset, architecture, vae, image_encoder, i2v, vae_tiling, vae_chunk_size,
                vae_spatial_tile_sample_min_size, vae_cache_cpu, one_frame, f1, model_version, batch_size,
                num_workers, skip_existing, keep_cache, device, extra_args, musubi_env=None):  # fmt: skip
        spec = archs.get_arch(architecture)
        e = checked_env(musubi_env, (spec.cache_latents,))
        optional = ("image_encoder",) if spec.latent_vae_required else ("image_encoder", "vae")
        paths = commands.require_paths({"vae": vae, "image_encoder": image_encoder}, optional=optional)
        opts = commands.CacheOptions(batch_size, num_workers, skip_existing, keep_cache, device, extra_args)
        argv = commands.cache_latents_argv(
            e, architecture, dataset["toml"], paths["vae"], extra_model=paths["image_encoder"], i2v=i2v,
            vae_tiling=vae_tiling, vae_chunk_size=vae_chunk_size,
            vae_spatial_tile_sample_min_size=vae_spatial_tile_sample_min_size, vae_cache_cpu=vae_cache_cpu,
            one_frame=one_frame, f1=f1, model_version=model_version, options=opts,
        )  # fmt: skip
        log = Path(dataset["toml"]).with_name(Path(dataset["toml"]).stem + f"_{architecture}_latents.log")
        run(argv, e, node_id=cls.hidden.unique_id, log_path=log, what="latent caching", cache_dirs=cache_dirs(dataset))
        return io.NodeOutput({**dataset, "latents": architecture}, str(log))


class CacheTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_CacheTextEncoder",
            display_name="Musubi Cache Text Encoder",
            category="MusubiTuner/data",
            description="Encodes every caption with the text encoder(s) into cache files "
            "(musubi's <arch>_cache_text_encoder_outputs.py).",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                env_input(),
                DatasetT.Input("dataset", tooltip="The dataset config (usually after Cache Latents)."),
                choice("architecture", "Model family the caches are for.", tuple(archs.ARCHS)),
                string(
                    "text_encoder1",
                    "HunyuanVideo/FramePack: LLM (llava); Wan/Kontext: T5; Qwen-Image/Z-Image/HV1.5/FLUX.2/Ideogram 4/"
                    "Krea 2: the text encoder; Kandinsky 5: Qwen2.5-VL; HiDream-O1: the DiT (optional).",
                ),
                string(
                    "text_encoder2",
                    "HunyuanVideo/FramePack/Kontext/Kandinsky 5: CLIP-L; HunyuanVideo 1.5: byT5. Else empty.",
                ),
                boolean(
                    "fp8",
                    "Run the big text encoder in fp8 (--fp8_llm / --fp8_t5 / --fp8_vl / --fp8_text_encoder; HiDream-O1 "
                    "--fp8_te): less VRAM.",
                ),
                _model_version_input(),
                *_common_inputs(),
            ],
            outputs=[
                DatasetT.Output(display_name="dataset", tooltip="The same dataset, cached (chain to training)."),
                io.String.Output(display_name="log_path", tooltip="The script's full log."),
            ],
        )

    @classmethod
    def execute(cls, dataset, architecture, text_encoder1, text_encoder2, fp8, model_version, batch_size,
                num_workers, skip_existing, keep_cache, device, extra_args, musubi_env=None):  # fmt: skip
        spec = archs.get_arch(architecture)
        e = checked_env(musubi_env, (spec.cache_text_encoder,))
        optional = ("text_encoder2",) if spec.te_required else ("text_encoder1", "text_encoder2")
        paths = commands.require_paths({"text_encoder1": text_encoder1, "text_encoder2": text_encoder2}, optional)
        opts = commands.CacheOptions(batch_size, num_workers, skip_existing, keep_cache, device, extra_args)
        argv = commands.cache_text_encoder_argv(
            e, architecture, dataset["toml"], [paths["text_encoder1"], paths["text_encoder2"]], fp8=fp8,
            model_version=model_version, options=opts,
        )  # fmt: skip
        log = Path(dataset["toml"]).with_name(Path(dataset["toml"]).stem + f"_{architecture}_text.log")
        run(
            argv,
            e,
            node_id=cls.hidden.unique_id,
            log_path=log,
            what="text encoder caching",
            cache_dirs=cache_dirs(dataset),
        )
        return io.NodeOutput({**dataset, "text": architecture}, str(log))
