"""Dataset nodes: build or load musubi's dataset TOML and preview what it holds."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ...musubi import dataset as mdataset
from ...musubi import env, media
from .images import to_image
from .paths import config_signature, folder_signature, mtime, work_dir
from .widgets import DatasetT, boolean, check_finite, choice, integer, number, string

logger = logging.getLogger(__name__)


def _frames_list(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"target_frames={text!r} must be integers separated by commas, e.g. 1, 25, 45") from None


class DatasetConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_DatasetConfig",
            display_name="Musubi Dataset Config",
            category="MusubiTuner/data",
            description=(
                "Builds musubi's dataset TOML: [general] settings plus one image or video dataset per node; chain "
                "nodes through 'previous' to add datasets. Validated like musubi's own schema (plus captions and "
                "unique cache folders) and written to output/musubi/datasets/<name>.toml."
            ),
            inputs=[
                DatasetT.Input(
                    "previous",
                    optional=True,
                    tooltip="Another dataset config to append this dataset to (this node's resolution, caption, "
                    "batch and bucket settings then apply to this dataset only).",
                ),
                choice("kind", "image: a folder of images; video: a folder of videos.", ("image", "video")),
                string("directory", "Folder with the images/videos and their captions."),
                string(
                    "jsonl_file",
                    "Instead of a folder: a JSONL file with image_path/video_path and caption.",
                    advanced=True,
                ),
                string(
                    "cache_directory",
                    "Folder for latent/text caches; empty = the data folder. Must differ per dataset.",
                ),
                string(
                    "control_directory",
                    "Control images/videos (Kontext, Qwen-Edit, FramePack 1f, Wan Fun-Control).",
                    advanced=True,
                ),
                integer(
                    "width",
                    "Training resolution width in pixels (multiple of 16). musubi's resolution is [W, H].",
                    960,
                    16,
                    4096,
                ),
                integer("height", "Training resolution height in pixels (multiple of 16).", 544, 16, 4096),
                string("caption_extension", "Caption file extension next to each file.", ".txt"),
                integer("batch_size", "Samples per step.", 1, 1, 256),
                integer("num_repeats", "How often the dataset is repeated per epoch.", 1, 1, 10000),
                boolean("enable_bucket", "Aspect-ratio buckets instead of cropping to one size.", True),
                boolean("bucket_no_upscale", "Never upscale small images into a bucket.", False, advanced=True),
                string(
                    "target_frames",
                    "Video: clip lengths in frames, comma separated, each 4*N+1 (e.g. 1, 25, 45).",
                    "1, 25, 45",
                ),
                choice(
                    "frame_extraction",
                    "Video: how clips are cut (head, chunk, slide, uniform, full).",
                    mdataset.FRAME_EXTRACTIONS,
                ),
                integer("frame_stride", "Video, slide: frames between clip starts.", 1, 1, 1000, advanced=True),
                integer("frame_sample", "Video, uniform: clips per video.", 1, 1, 1000, advanced=True),
                integer("max_frames", "Video, full: longest clip in frames.", 129, 1, 10000, advanced=True),
                number(
                    "source_fps",
                    "Video: fps of the source files; 0 = use every frame (written as a float, e.g. 30.0).",
                    0.0,
                    0.0,
                    240.0,
                    0.001,
                    advanced=True,
                ),
                integer(
                    "fp_latent_window_size",
                    "FramePack latent window size; 0 = musubi's default (9).",
                    0,
                    0,
                    64,
                    advanced=True,
                ),
                string("name", "File name of the TOML (no folder).", "dataset"),
                boolean("check_files", "Check that the folder has media files and every file has a caption.", True),
            ],
            outputs=[
                DatasetT.Output(display_name="dataset", tooltip="The dataset config, for cache and training nodes."),
                io.String.Output(display_name="toml_path", tooltip="Where the TOML was written."),
            ],
        )

    @classmethod
    def execute(cls, kind, directory, jsonl_file, cache_directory, control_directory, width, height,
                caption_extension, batch_size, num_repeats, enable_bucket, bucket_no_upscale, target_frames,
                frame_extraction, frame_stride, frame_sample, max_frames, source_fps, fp_latent_window_size, name,
                check_files, previous=None):  # fmt: skip
        check_finite(cls, source_fps=source_fps)
        stem = env.check_output_name(name, "name")
        general = {
            "resolution": [width, height],
            "caption_extension": caption_extension or None,
            "batch_size": batch_size,
            "num_repeats": num_repeats,
            "enable_bucket": enable_bucket,
            "bucket_no_upscale": bucket_no_upscale,
        }
        ds = {
            f"{kind}_directory": env.native_path(directory) or None,
            f"{kind}_jsonl_file": env.native_path(jsonl_file) or None,
            "cache_directory": env.native_path(cache_directory) or None,
            "control_directory": env.native_path(control_directory) or None,
            "fp_latent_window_size": fp_latent_window_size or None,
        }
        if kind == "video":
            ds.update(
                target_frames=_frames_list(target_frames),
                frame_extraction=frame_extraction,
                frame_stride=frame_stride,
                frame_sample=frame_sample,
                max_frames=max_frames,
                source_fps=float(source_fps) if source_fps > 0 else None,
            )
        if previous:
            # Chained: the first node's settings stay in [general]; this node's go into its own
            # dataset table (musubi accepts them per dataset and they win over [general]).
            ds.update(general)
            general = previous["config"].get("general", {})
            datasets = list(previous["config"]["datasets"])
        else:
            datasets = []
        config = mdataset.build_config(general, [*datasets, ds])
        for w in mdataset.validate_config(config, source="dataset config"):
            logger.warning("%s", w)
        if check_files:
            mdataset.check_dataset_files(config)
        path = mdataset.write_config(config, work_dir("datasets") / f"{stem}.toml")
        return io.NodeOutput({"config": config, "toml": str(path), "signature": config_signature(config)}, str(path))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        # the folders' contents are inputs too: new captions or files must re-run the checks
        return "|".join(folder_signature(kw.get(k, "")) for k in ("directory", "control_directory")) + mtime(
            kw.get("jsonl_file", "")
        )


class DatasetConfigLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_DatasetConfigLoader",
            display_name="Musubi Dataset Config Loader",
            category="MusubiTuner/data",
            description="Loads an existing musubi dataset TOML and validates it (unknown keys, wrong types, "
            "int source_fps, shared cache folders are errors naming the key).",
            inputs=[
                string("toml_path", "Path of the dataset .toml (or .json)."),
                boolean("check_files", "Also check media files and captions on disk.", True),
            ],
            outputs=[
                DatasetT.Output(display_name="dataset", tooltip="The dataset config."),
                io.String.Output(display_name="toml_path", tooltip="The same path, normalised."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, toml_path="", check_files=True):
        try:
            return mtime(toml_path) + config_signature(mdataset.load_toml(env.native_path(toml_path)))
        except (ValueError, OSError):
            return mtime(toml_path)  # execute() reports the problem

    @classmethod
    def execute(cls, toml_path, check_files=True):
        path = env.native_path(toml_path)
        config = mdataset.load_toml(path)
        for w in mdataset.validate_config(config, source=path):
            logger.warning("%s", w)
        if check_files:
            mdataset.check_dataset_files(config)
        return io.NodeOutput({"config": config, "toml": path, "signature": config_signature(config)}, path)


class DatasetViewer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_DatasetViewer",
            display_name="Musubi Dataset Viewer",
            category="MusubiTuner/data",
            description="Shows a few images (or first video frames) of each dataset with their captions, counts per "
            "dataset and the files without a caption.",
            inputs=[
                DatasetT.Input("dataset", tooltip="A dataset config."),
                integer("max_items", "Most items shown per dataset.", 8, 1, 256),
                integer("size", "Preview size in pixels (square, letterboxed).", 256, 64, 1024),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="Previews, one per item."),
                io.String.Output(display_name="report", tooltip="Counts, captions and missing captions."),
            ],
        )

    @classmethod
    def execute(cls, dataset, max_items=8, size=256):
        import numpy as np
        from PIL import Image

        cfg = dataset["config"]
        general = cfg.get("general", {})
        previews, report = [], []
        for i, ds in enumerate(cfg.get("datasets", [])):
            scan = mdataset.scan_dataset(ds, i, general)
            report.append(f"[dataset {i}] {scan.kind}: {scan.count} files in {scan.source}, "
                          f"{len(scan.missing_captions)} without caption")  # fmt: skip
            report += [f"  missing caption: {p.name}" for p in scan.missing_captions[:20]]
            for item in scan.items[:max_items]:
                try:
                    frames, _ = media.read_video(item, max_frames=1, name=f"datasets[{i}] file {item.name}")
                except ValueError as exc:
                    report.append(f"  {item.name}: preview unavailable ({exc})")
                    continue
                img = Image.fromarray(frames[0])
                img.thumbnail((size, size))
                canvas = Image.new("RGB", (size, size))
                canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
                previews.append(np.asarray(canvas))
                report.append(f"  {item.name}: {scan.captions.get(item, '(no caption)')[:200]}")
        if not previews:
            previews.append(np.zeros((size, size, 3), np.uint8))
        return io.NodeOutput(to_image(np.stack(previews)), "\n".join(report))
