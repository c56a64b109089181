"""ComfyUI adapter for musubi/: nodes that drive kohya-ss/musubi-tuner's CLI scripts.

musubi is never imported here: every node builds an argument list with
:mod:`speedkit.musubi.commands` and runs it in musubi's own venv through
:func:`speedkit.musubi.runner.run_command`, which streams progress into ComfyUI's
progress bar and the node's live log (``web/js/musubi.js``) and kills the process tree on
Cancel.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path

from comfy_api.latest import io

from ..musubi import arch as archs
from ..musubi import commands, configs, env, lora_file, media, monitor, runner
from ..musubi import dataset as mdataset
from ..musubi.runner import MusubiRunError, run_command
from ..torch_utils import check_file_name
from . import comfy_bridge

logger = logging.getLogger(__name__)

LOG_EVENT = "speedkit.musubi.log"
CONFIG_FILE_NAME = "musubi.toml"

MusubiEnvT = io.Custom("MUSUBI_ENV")
DatasetT = io.Custom("MUSUBI_DATASET")
TrainingT = io.Custom("MUSUBI_TRAINING_CONFIG")
OptimizerT = io.Custom("MUSUBI_OPTIMIZER_CONFIG")
SamplingT = io.Custom("MUSUBI_SAMPLING_CONFIG")
MemoryT = io.Custom("MUSUBI_MEMORY_CONFIG")


# --- small input helpers -----------------------------------------------------------------


def _s(id_, tip, default="", **kw):
    return io.String.Input(id_, default=default, tooltip=tip, **kw)


def _i(id_, tip, default, lo=0, hi=1 << 20, **kw):
    return io.Int.Input(id_, default=default, min=lo, max=hi, tooltip=tip, **kw)


FLOAT_EXAMPLES: dict[str, float] = {}
"""Default of every float input by name: the example a NaN/Inf error suggests."""


def _f(id_, tip, default, lo=0.0, hi=1e6, step=0.01, **kw):
    FLOAT_EXAMPLES.setdefault(id_, default)
    return io.Float.Input(id_, default=default, min=lo, max=hi, step=step, tooltip=tip, **kw)


def _finite(**values) -> None:
    """NaN/Inf in float inputs pass ComfyUI's min/max checks (comparisons with NaN are false): refuse them here."""
    floats = {k: v for k, v in values.items() if isinstance(v, float)}
    if any(not math.isfinite(v) for v in floats.values()) and not FLOAT_EXAMPLES:
        for node in NODES:
            node.define_schema()  # each _f() records its default as the example to suggest
    configs.check_finite(floats, FLOAT_EXAMPLES)


def _b(id_, tip, default=False, **kw):
    return io.Boolean.Input(id_, default=default, tooltip=tip, **kw)


def _c(id_, tip, options, default=None, **kw):
    return io.Combo.Input(id_, options=list(options), default=default or options[0], tooltip=tip, **kw)


def ENV_IN():  # noqa: N802 - reads like the constant it replaces
    return MusubiEnvT.Input(
        "musubi_env",
        optional=True,
        tooltip="From MusubiTuner Environment. Unplugged: the settings file <ComfyUI user dir>/speedkit/musubi.toml "
        "(or SPEEDKIT_MUSUBI_CONFIG) and the MUSUBI_TUNER_ROOT / MUSUBI_TUNER_PYTHON variables are used.",
    )


def EXTRA_IN():  # noqa: N802
    return _s(
        "extra_args",
        "Expert: more flags for the musubi script, e.g. --flash3 --compile. Split like a shell would, never run by one.",
        advanced=True,
    )


# --- bridges to ComfyUI ------------------------------------------------------------------


def _config_path() -> Path | None:
    if os.environ.get(env.CONFIG_ENV_VAR):
        return Path(os.environ[env.CONFIG_ENV_VAR])
    try:
        import folder_paths

        return Path(folder_paths.get_user_directory()) / "speedkit" / CONFIG_FILE_NAME
    except (ImportError, AttributeError):
        return None


def _env(value, scripts: tuple[str, ...] = (), accelerate: bool = False) -> env.MusubiEnv:
    e = value if isinstance(value, env.MusubiEnv) else env.resolve_env(config_path=_config_path())
    env.validate_env(e, scripts, check_accelerate=accelerate)
    return e


def _send(node_id, payload: dict) -> None:
    """Push a live-log message to the browser; silent when there is no server (tests, CLI)."""
    if node_id is not None:
        comfy_bridge.send_event(LOG_EVENT, {"node": str(node_id), **payload})


def _run(argv, e: env.MusubiEnv, *, node_id, log_path, expected=(), what="musubi-tuner", done_line="", run_dirs=(),
         cache_dirs=()):  # fmt: skip
    """Run with ComfyUI's progress bar, interrupt and the node's live log.

    A failed or cancelled run renames what it wrote to ``<name>.partial`` (see the runner), so
    a half-written LoRA or video never sits under its final name next to finished ones.
    """
    import comfy.model_management as mm
    import comfy.utils

    bar = {"pbar": None}
    buffer: list[str] = []
    last_send = [0.0]

    def flush(summary: str) -> None:
        if buffer:
            _send(node_id, {"lines": list(buffer), "summary": summary})
            buffer.clear()

    def on_line(line: str) -> None:
        buffer.append(line)
        if time.monotonic() - last_send[0] > 0.25:
            last_send[0] = time.monotonic()
            flush("")

    def on_event(ev, state) -> None:
        if state.total:
            if bar["pbar"] is None:
                bar["pbar"] = comfy.utils.ProgressBar(state.total, node_id=node_id)
            # raises InterruptProcessingException after Cancel: the runner then kills the tree
            bar["pbar"].update_absolute(state.step, state.total)
        if ev.kind in ("steps", "epoch", "checkpoint", "saved"):
            _send(node_id, {"summary": state.summary()})

    _send(node_id, {"reset": True, "summary": f"starting {what}", "lines": [commands_str(argv)]})
    try:
        result = run_command(
            argv,
            cwd=e.root,
            env=e.run_env(),
            log_path=log_path,
            expected_outputs=expected,
            on_line=on_line,
            on_event=on_event,
            should_cancel=mm.processing_interrupted,
            what=what,
            done_line=done_line,
            set_aside_partial=True,
            run_dirs=run_dirs,
            cache_dirs=cache_dirs,
        )
    except Exception as exc:
        flush(f"failed: {type(exc).__name__}")
        if type(exc).__name__ == "MusubiCancelled":
            mm.throw_exception_if_processing_interrupted()
        raise
    flush(f"done: {result.state.summary()}")
    return result


def commands_str(argv) -> str:
    from ..musubi.runner import format_command

    return "$ " + format_command(argv)


def _work_dir(*parts: str) -> Path:
    import folder_paths

    p = Path(folder_paths.get_output_directory(), "musubi", *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _default_lora_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / "musubi"


def _register_loras(folder: Path) -> None:
    """Make trained files show up in every LoRA loader."""
    import folder_paths

    known = [os.path.normcase(os.path.abspath(p)) for p in folder_paths.get_folder_paths("loras")]
    target = os.path.normcase(os.path.abspath(folder))
    if not any(target == k or target.startswith(k + os.sep) for k in known):
        folder_paths.add_model_folder_path("loras", str(folder))


def _output_file(value: str, input_name: str) -> Path:
    """A ``.safetensors`` output path: absolute as typed, or relative to ComfyUI's output
    folder (never resolved against the server's working folder, and never leaving the
    output folder through ``..``)."""
    import folder_paths

    text = env.native_path(value)
    if not text or Path(text).suffix != ".safetensors":
        raise ValueError(f"{input_name}={value!r} must be a .safetensors file path, e.g. /path/to/merged.safetensors")
    path = Path(text)
    if not path.is_absolute():
        if ".." in Path(value.strip()).parts or ".." in path.parts:
            raise ValueError(
                f"{input_name}={value!r}: a relative path is taken inside ComfyUI's output folder and may not "
                "contain '..'; give an absolute path to write elsewhere"
            )
        path = Path(folder_paths.get_output_directory()) / path
    return path


def _output_folder(path: Path, input_name: str) -> Path:
    """Create the folder an output goes to; an error naming the input instead of an OSError traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"{input_name}: could not create the folder {str(path)!r} ({exc.strerror or exc}): pick a writable "
            "folder (a file of that name, or a missing drive, also stops it)"
        ) from exc
    return path


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (after ~, .. and case folding where the OS ignores case)."""
    norm = lambda p: os.path.normcase(os.path.abspath(env.native_path(p)))  # noqa: E731
    if norm(a) == norm(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _not_an_input(output: Path, output_name: str, inputs: dict[str, str]) -> None:
    """The script would overwrite (or read while writing) one of its own inputs: refuse before it runs."""
    for name, path in inputs.items():
        if path and _same_file(output, path):
            raise ValueError(
                f"{output_name}: {str(output)!r} is the same file as {name}; the run would overwrite its own input: "
                "pick another output path"
            )


def _lora_path(name: str, input_name: str) -> str:
    """A LoRA given as a path or as a name from models/loras."""
    raw = env.native_path(name)
    if not raw:
        return ""
    if os.path.isfile(raw):
        return raw
    import folder_paths

    full = folder_paths.get_full_path("loras", name.strip())
    if full:
        return full
    raise ValueError(f"{input_name} {name!r} is neither a file nor a name in models/loras: check the path")


def _to_numpy(image):
    """A ComfyUI IMAGE (torch tensor) as float32 numpy, unchecked."""
    import numpy as np

    return np.asarray(image.detach().float().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32)


def _image_frames(image, name: str):
    """A ComfyUI IMAGE as float32 numpy [T, H, W, 3], checked (NaN, empty, channels, range) and named."""
    arr = _to_numpy(image)
    media.check_frames(arr, name)
    return arr


def _image_to_png(frames, folder: Path, name: str) -> str:
    """First frame of checked float frames (see :func:`_image_frames`) as ``<folder>/<name>.png``."""
    from PIL import Image

    path = folder / f"{name}.png"
    Image.fromarray(media.frames_to_uint8(frames[:1], name)[0]).save(path)
    return str(path)


def _frames_to_image(frames):
    import torch

    from .comfy_bridge import to_intermediate

    return to_intermediate(torch.from_numpy(frames).float() / 255.0)


def _mtime(path: str) -> str:
    """Path and modification time (or 'missing'): a cheap change marker for fingerprints."""
    p = env.native_path(path or "")
    if not p:
        return ""
    try:
        return f"{p}@{os.path.getmtime(p)}"
    except OSError:
        return f"{p}@missing"


def _folder_signature(path: str) -> str:
    """Count and newest mtime of a folder's files: changes when files are added, removed or edited."""
    p = env.native_path(path or "")
    if not p or not os.path.isdir(p):
        return _mtime(path)
    newest, count = 0.0, 0
    with os.scandir(p) as entries:
        for entry in entries:
            if entry.is_file():
                count += 1
                newest = max(newest, entry.stat().st_mtime)
    return f"{p}:{count}@{newest}"


def _config_signature(config: dict) -> str:
    """Change marker of every dataset's files, carried in the dataset object so cache and
    training nodes downstream re-run when the data changes."""
    parts = []
    for d in config.get("datasets", []):
        for key in ("image_directory", "video_directory", "control_directory"):
            if d.get(key):
                parts.append(_folder_signature(d[key]))
        for key in ("image_jsonl_file", "video_jsonl_file"):
            if d.get(key):
                parts.append(_mtime(d[key]))
    return "|".join(parts)


# --- Environment -------------------------------------------------------------------------


class Environment(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_Environment",
            display_name="Musubi Tuner Environment",
            category="MusubiTuner/setup",
            description=(
                "Where musubi-tuner is: its checkout folder and its venv's Python (musubi runs there, never inside "
                "ComfyUI). Checked on run: the folder, the interpreter, the scripts and accelerate. Empty fields fall "
                "back to <ComfyUI user dir>/speedkit/musubi.toml (musubi_root, python, [env]) and MUSUBI_TUNER_ROOT / "
                "MUSUBI_TUNER_PYTHON."
            ),
            inputs=[
                _s("musubi_root", "The musubi-tuner checkout folder (holds pyproject.toml and src/musubi_tuner)."),
                _s(
                    "python",
                    "musubi's venv folder or its interpreter: <venv>\\Scripts\\python.exe (Windows) or <venv>/bin/python. "
                    "Empty: <musubi_root>/.venv or venv.",
                ),
                _s(
                    "extra_env",
                    "Extra environment variables, one KEY=VALUE per line, e.g. CUDA_VISIBLE_DEVICES=0.",
                    multiline=True,
                ),
                _b("check_accelerate", "Start the venv's Python once to check that accelerate is installed.", True),
            ],
            outputs=[MusubiEnvT.Output(display_name="musubi_env", tooltip="Connect to every MusubiTuner node.")],
        )

    @classmethod
    def execute(cls, musubi_root, python, extra_env, check_accelerate=True):
        e = env.resolve_env(musubi_root, python, extra_env, config_path=_config_path())
        env.validate_env(e, ("cache_latents",), check_accelerate=check_accelerate)
        return io.NodeOutput(e)


# --- Dataset -----------------------------------------------------------------------------


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
                _c("kind", "image: a folder of images; video: a folder of videos.", ("image", "video")),
                _s("directory", "Folder with the images/videos and their captions."),
                _s(
                    "jsonl_file",
                    "Instead of a folder: a JSONL file with image_path/video_path and caption.",
                    advanced=True,
                ),
                _s(
                    "cache_directory",
                    "Folder for latent/text caches; empty = the data folder. Must differ per dataset.",
                ),
                _s(
                    "control_directory",
                    "Control images/videos (Kontext, Qwen-Edit, FramePack 1f, Wan Fun-Control).",
                    advanced=True,
                ),
                _i(
                    "width",
                    "Training resolution width in pixels (multiple of 16). musubi's resolution is [W, H].",
                    960,
                    16,
                    4096,
                ),
                _i("height", "Training resolution height in pixels (multiple of 16).", 544, 16, 4096),
                _s("caption_extension", "Caption file extension next to each file.", ".txt"),
                _i("batch_size", "Samples per step.", 1, 1, 256),
                _i("num_repeats", "How often the dataset is repeated per epoch.", 1, 1, 10000),
                _b("enable_bucket", "Aspect-ratio buckets instead of cropping to one size.", True),
                _b("bucket_no_upscale", "Never upscale small images into a bucket.", False, advanced=True),
                _s(
                    "target_frames",
                    "Video: clip lengths in frames, comma separated, each 4*N+1 (e.g. 1, 25, 45).",
                    "1, 25, 45",
                ),
                _c(
                    "frame_extraction",
                    "Video: how clips are cut (head, chunk, slide, uniform, full).",
                    mdataset.FRAME_EXTRACTIONS,
                ),
                _i("frame_stride", "Video, slide: frames between clip starts.", 1, 1, 1000, advanced=True),
                _i("frame_sample", "Video, uniform: clips per video.", 1, 1, 1000, advanced=True),
                _i("max_frames", "Video, full: longest clip in frames.", 129, 1, 10000, advanced=True),
                _f(
                    "source_fps",
                    "Video: fps of the source files; 0 = use every frame (written as a float, e.g. 30.0).",
                    0.0,
                    0.0,
                    240.0,
                    0.001,
                    advanced=True,
                ),
                _i(
                    "fp_latent_window_size",
                    "FramePack latent window size; 0 = musubi's default (9).",
                    0,
                    0,
                    64,
                    advanced=True,
                ),
                _s("name", "File name of the TOML (no folder).", "dataset"),
                _b("check_files", "Check that the folder has media files and every file has a caption.", True),
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
        _finite(source_fps=source_fps)
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
        path = mdataset.write_config(config, _work_dir("datasets") / f"{stem}.toml")
        return io.NodeOutput({"config": config, "toml": str(path), "signature": _config_signature(config)}, str(path))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        # the folders' contents are inputs too: new captions or files must re-run the checks
        return "|".join(_folder_signature(kw.get(k, "")) for k in ("directory", "control_directory")) + _mtime(
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
                _s("toml_path", "Path of the dataset .toml (or .json)."),
                _b("check_files", "Also check media files and captions on disk.", True),
            ],
            outputs=[
                DatasetT.Output(display_name="dataset", tooltip="The dataset config."),
                io.String.Output(display_name="toml_path", tooltip="The same path, normalised."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, toml_path="", check_files=True):
        try:
            return _mtime(toml_path) + _config_signature(mdataset.load_toml(env.native_path(toml_path)))
        except (ValueError, OSError):
            return _mtime(toml_path)  # execute() reports the problem

    @classmethod
    def execute(cls, toml_path, check_files=True):
        path = env.native_path(toml_path)
        config = mdataset.load_toml(path)
        for w in mdataset.validate_config(config, source=path):
            logger.warning("%s", w)
        if check_files:
            mdataset.check_dataset_files(config)
        return io.NodeOutput({"config": config, "toml": path, "signature": _config_signature(config)}, path)


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
                _i("max_items", "Most items shown per dataset.", 8, 1, 256),
                _i("size", "Preview size in pixels (square, letterboxed).", 256, 64, 1024),
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
        return io.NodeOutput(_frames_to_image(np.stack(previews)), "\n".join(report))


# --- Caching -----------------------------------------------------------------------------


def _cache_dirs(dataset: dict) -> list[str]:
    """Where musubi writes this dataset's caches: a cancelled run's cut-short files there are set aside."""
    return [d for d in map(mdataset.effective_cache_dir, dataset["config"].get("datasets", [])) if d]


def _cache_common_inputs():
    return [
        _i("batch_size", "Items per batch; 0 = musubi's default.", 0, 0, 1024),
        _i("num_workers", "Data loader workers; 0 = musubi's default.", 0, 0, 64, advanced=True),
        _b("skip_existing", "Keep caches that already exist (faster reruns).", True),
        _b("keep_cache", "Keep cache files of items no longer in the dataset.", False, advanced=True),
        _s("device", "Device, e.g. cuda or cuda:1; empty = musubi's default.", advanced=True),
        EXTRA_IN(),
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
                ENV_IN(),
                DatasetT.Input("dataset", tooltip="The dataset config to cache."),
                _c("architecture", "Model family the caches are for.", tuple(archs.ARCHS)),
                _s("vae", "VAE checkpoint path."),
                _s(
                    "image_encoder",
                    "FramePack / HunyuanVideo 1.5 I2V: SigLIP image encoder; Wan2.1 I2V: CLIP model. Else empty.",
                ),
                _b("i2v", "Wan / HunyuanVideo 1.5: cache image features for image-to-video training."),
                _b("vae_tiling", "HunyuanVideo-family VAEs: spatial tiling (less VRAM)."),
                _i(
                    "vae_chunk_size",
                    "HunyuanVideo-family VAEs: causal conv chunk size; 0 = off (32 or 16 save VRAM).",
                    0,
                    0,
                    1024,
                ),
                _i(
                    "vae_spatial_tile_sample_min_size",
                    "Tile size in pixels with tiling; 0 = default (256).",
                    0,
                    0,
                    4096,
                    advanced=True,
                ),
                _b("vae_cache_cpu", "Wan: keep the VAE's internal cache on the CPU (less VRAM).", advanced=True),
                _b("one_frame", "Wan / FramePack: cache for one-frame training.", advanced=True),
                _b("f1", "FramePack: cache for the F1 model.", advanced=True),
                _s("model_version", "Qwen-Image only: original, edit, edit-2509, edit-2511, layered.", advanced=True),
                *_cache_common_inputs(),
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
        e = _env(musubi_env, (spec.cache_latents,))
        paths = commands.require_paths({"vae": vae, "image_encoder": image_encoder}, optional=("image_encoder",))
        opts = commands.CacheOptions(batch_size, num_workers, skip_existing, keep_cache, device, extra_args)
        argv = commands.cache_latents_argv(
            e, architecture, dataset["toml"], paths["vae"], extra_model=paths["image_encoder"], i2v=i2v,
            vae_tiling=vae_tiling, vae_chunk_size=vae_chunk_size,
            vae_spatial_tile_sample_min_size=vae_spatial_tile_sample_min_size, vae_cache_cpu=vae_cache_cpu,
            one_frame=one_frame, f1=f1, model_version=model_version, options=opts,
        )  # fmt: skip
        log = Path(dataset["toml"]).with_name(Path(dataset["toml"]).stem + f"_{architecture}_latents.log")
        _run(argv, e, node_id=cls.hidden.unique_id, log_path=log, what="latent caching",
             cache_dirs=_cache_dirs(dataset))  # fmt: skip
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
                ENV_IN(),
                DatasetT.Input("dataset", tooltip="The dataset config (usually after Cache Latents)."),
                _c("architecture", "Model family the caches are for.", tuple(archs.ARCHS)),
                _s(
                    "text_encoder1",
                    "HunyuanVideo/FramePack: LLM (llava); Wan: T5; Kontext: T5; Qwen-Image/Z-Image/HV1.5: Qwen VL.",
                ),
                _s("text_encoder2", "HunyuanVideo/FramePack/Kontext: CLIP-L; HunyuanVideo 1.5: byT5. Else empty."),
                _b("fp8", "Run the big text encoder in fp8 (--fp8_llm / --fp8_t5 / --fp8_vl): less VRAM."),
                _s("model_version", "Qwen-Image only: original, edit, edit-2509, edit-2511, layered.", advanced=True),
                *_cache_common_inputs(),
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
        e = _env(musubi_env, (spec.cache_text_encoder,))
        paths = commands.require_paths(
            {"text_encoder1": text_encoder1, "text_encoder2": text_encoder2}, optional=("text_encoder2",)
        )
        opts = commands.CacheOptions(batch_size, num_workers, skip_existing, keep_cache, device, extra_args)
        argv = commands.cache_text_encoder_argv(
            e, architecture, dataset["toml"], [paths["text_encoder1"], paths["text_encoder2"]], fp8=fp8,
            model_version=model_version, options=opts,
        )  # fmt: skip
        log = Path(dataset["toml"]).with_name(Path(dataset["toml"]).stem + f"_{architecture}_text.log")
        _run(argv, e, node_id=cls.hidden.unique_id, log_path=log, what="text encoder caching",
             cache_dirs=_cache_dirs(dataset))  # fmt: skip
        return io.NodeOutput({**dataset, "text": architecture}, str(log))


# --- Training configs --------------------------------------------------------------------


class TrainingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = configs.TrainingConfig()
        return io.Schema(
            node_id="MusubiTuner_TrainingConfig",
            display_name="Musubi Training Config",
            category="MusubiTuner/train",
            description="Network, schedule and precision settings for the LoRA trainers. Unplugged, the trainers use "
            "these defaults (dim 32, alpha 16, lr 2e-4, 16 epochs, bf16, sdpa, shift 3.0).",
            inputs=[
                _i("network_dim", "LoRA rank.", d.network_dim, 1, 1024),
                _f("network_alpha", "LoRA alpha; scale = alpha / dim.", d.network_alpha, 0.0001, 1024.0),
                _c(
                    "network_type",
                    "lora, or LyCORIS loha / lokr (networks.loha / networks.lokr).",
                    ("lora", "loha", "lokr"),
                ),
                _f("learning_rate", "Learning rate.", d.learning_rate, 1e-8, 1.0, 1e-6),
                _i("max_train_epochs", "Epochs; 0 = use max_train_steps.", d.max_train_epochs, 0, 100000),
                _i("max_train_steps", "Steps, used when max_train_epochs is 0.", 1600, 0, 10_000_000),
                _i(
                    "save_every_n_epochs",
                    "Save a checkpoint every n epochs; 0 = off.",
                    d.save_every_n_epochs,
                    0,
                    100000,
                ),
                _i("save_every_n_steps", "Save a checkpoint every n steps; 0 = off.", 0, 0, 10_000_000),
                _i("seed", "Random seed.", d.seed, 0, 2**31 - 1),
                _c("mixed_precision", "Compute precision (also passed to accelerate).", ("bf16", "fp16", "no")),
                _b("gradient_checkpointing", "Recompute activations: much less VRAM, ~20-30% slower.", True),
                _b("fp8_base", "Keep the base DiT in fp8 (less VRAM).", False),
                _i(
                    "blocks_to_swap",
                    "DiT blocks offloaded to CPU; 0 = off (max 36 HV/FramePack, 39 Wan 14B).",
                    0,
                    0,
                    60,
                ),
                _c(
                    "attention",
                    "Attention kernel (must be installed in musubi's venv except sdpa).",
                    tuple(configs.ATTENTION_FLAGS),
                ),
                _c("timestep_sampling", "Timestep sampling.", configs.TIMESTEP_SAMPLINGS),
                _f(
                    "discrete_flow_shift",
                    "Flow shift for 'shift' sampling (HV 7.0, Wan/FramePack 3.0 in the docs).",
                    3.0,
                    0.0,
                    100.0,
                ),
                _c("weighting_scheme", "Loss weighting.", configs.WEIGHTING_SCHEMES, advanced=True),
                _s(
                    "network_args",
                    "Extra network args, space separated key=value (e.g. loraplus_lr_ratio=4).",
                    advanced=True,
                ),
                _f("network_dropout", "Dropout on LoRA outputs; 0 = off.", 0.0, 0.0, 0.99, advanced=True),
                _i("gradient_accumulation_steps", "Steps per optimizer update.", 1, 1, 1024, advanced=True),
                _i(
                    "save_last_n_epochs",
                    "Keep only the last n epoch checkpoints; 0 = keep all.",
                    0,
                    0,
                    100000,
                    advanced=True,
                ),
                _c(
                    "save_precision",
                    "LoRA file precision (default: musubi's, fp32).",
                    configs.SAVE_PRECISIONS,
                    advanced=True,
                ),
                _i("max_data_loader_n_workers", "Data loader workers.", 2, 0, 64, advanced=True),
                _b("save_state", "Also save optimizer state (to resume).", False, advanced=True),
                _s("network_weights", "Continue from this LoRA file.", advanced=True),
                _b(
                    "log_tensorboard",
                    "Write TensorBoard logs to <output_dir>/logs (needs tensorboard in musubi's venv).",
                    False,
                    advanced=True,
                ),
            ],
            outputs=[TrainingT.Output(display_name="training_config", tooltip="For a TrainLoRA node.")],
        )

    @classmethod
    def execute(cls, **kw):
        _finite(**kw)
        if kw.get("max_train_epochs", 0) > 0:
            kw["max_train_steps"] = 0
        kw["network_weights"] = env.native_path(kw.get("network_weights", ""))
        if kw["network_weights"] and not os.path.isfile(kw["network_weights"]):
            raise ValueError(
                f"network_weights {kw['network_weights']!r} does not exist: give a LoRA file or leave it empty"
            )
        if kw["network_weights"]:
            # an empty or cut-short LoRA would fail only after the DiT is loaded
            keys, _ = lora_file.read_safetensors_keys(kw["network_weights"], "network_weights")
            lora_file.inspect_lora(keys, "network_weights")
        cfg = configs.TrainingConfig(**kw)
        cfg.validate()
        return io.NodeOutput(cfg)


class OptimizerConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_OptimizerConfig",
            display_name="Musubi Optimizer Config",
            category="MusubiTuner/train",
            description="Optimizer, its arguments, learning-rate schedule with warmup, and gradient clipping.",
            inputs=[
                _c(
                    "optimizer_type",
                    "AdamW8bit needs bitsandbytes in musubi's venv; custom: a class path below.",
                    configs.OPTIMIZERS,
                ),
                _s("custom_optimizer", "optimizer_type custom: full class path, e.g. prodigyopt.Prodigy."),
                _s("optimizer_args", "Space separated key=value, e.g. weight_decay=0.01 betas=0.9,0.999."),
                _c("lr_scheduler", "Learning-rate schedule.", configs.LR_SCHEDULERS),
                _f("lr_warmup_steps", "Warmup: >= 1 = steps, < 1 = fraction of all steps, 0 = none.", 0.0, 0.0, 1e6),
                _i("lr_scheduler_num_cycles", "cosine_with_restarts: number of restarts.", 1, 1, 1000, advanced=True),
                _f("lr_scheduler_power", "polynomial: power.", 1.0, 0.0, 100.0, advanced=True),
                _f(
                    "lr_scheduler_min_lr_ratio",
                    "Lowest LR as a fraction of the start LR; 0 = scheduler default.",
                    0.0,
                    0.0,
                    1.0,
                    advanced=True,
                ),
                _f("max_grad_norm", "Gradient clipping norm; 0 = off.", 1.0, 0.0, 1000.0),
            ],
            outputs=[OptimizerT.Output(display_name="optimizer_config", tooltip="For a TrainLoRA node.")],
        )

    @classmethod
    def execute(cls, **kw):
        _finite(**kw)
        cfg = configs.OptimizerConfig(**kw)
        cfg.args()
        return io.NodeOutput(cfg)


class SamplingConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_SamplingConfig",
            display_name="Musubi Sampling Config",
            category="MusubiTuner/train",
            description="Sample videos rendered during training (to <output_dir>/sample). One prompt per line; per-line "
            "options such as --w 832 --h 480 --f 25 --s 20 --d 42 win over the defaults below.",
            inputs=[
                _s("prompts", "Prompts, one per line; # starts a comment.", multiline=True),
                _i("sample_every_n_epochs", "Render every n epochs; 0 = off.", 1, 0, 100000),
                _i("sample_every_n_steps", "Render every n steps; 0 = off.", 0, 0, 10_000_000),
                _b("sample_at_first", "Render once before training starts."),
                _i("width", "Default width (--w); 0 = musubi's default.", 0, 0, 4096),
                _i("height", "Default height (--h); 0 = musubi's default.", 0, 0, 4096),
                _i("frames", "Default frame count (--f); 0 = musubi's default.", 0, 0, 1024),
                _i("steps", "Default sampling steps (--s); 0 = musubi's default.", 0, 0, 1000),
                _i("seed", "Default seed (--d); -1 = random.", -1, -1, 2**31 - 1),
            ],
            outputs=[SamplingT.Output(display_name="sampling_config", tooltip="For a TrainLoRA node.")],
        )

    @classmethod
    def execute(cls, **kw):
        cfg = configs.SamplingConfig(**kw)
        cfg.validate()
        return io.NodeOutput(cfg)


class MemoryOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_MemoryOptimizer",
            display_name="Musubi Memory Optimizer",
            category="MusubiTuner/train",
            description="VRAM savers (block swap, fp8, VAE tiling/chunking, split attention) that override the "
            "training config. mode 'suggest' picks values from the free VRAM (a heuristic starting point).",
            inputs=[
                _c("mode", "suggest: from free VRAM; manual: the values below.", ("suggest", "manual")),
                _c("architecture", "For the suggestion.", archs.TRAINABLE),
                _c("model_size", "Wan: 14B or 1.3B (for the suggestion).", ("14B", "1.3B")),
                _f("vram_gb", "Free VRAM in GiB for the suggestion; 0 = measure GPU 0 now.", 0.0, 0.0, 1024.0),
                _i("blocks_to_swap", "manual: blocks offloaded to CPU; 0 = off.", 0, 0, 60),
                _b("use_pinned_memory_for_block_swap", "manual: pinned RAM for faster swaps.", False),
                _b("fp8_base", "manual: base DiT in fp8."),
                _b("fp8_scaled", "manual: scaled fp8 (Wan / FramePack; better quality than plain fp8)."),
                _b("fp8_text_encoder", "manual: text encoder in fp8 (for sampling)."),
                _b("gradient_checkpointing", "manual: recompute activations.", True),
                _b("split_attn", "manual: attention in chunks (less peak VRAM)."),
                _b("vae_tiling", "manual: VAE tiling (HunyuanVideo / FramePack sampling)."),
                _i("vae_chunk_size", "manual: VAE chunk size; 0 = off.", 0, 0, 1024),
                _i(
                    "vae_spatial_tile_sample_min_size", "manual: VAE tile size; 0 = default.", 0, 0, 4096, advanced=True
                ),
                _b("vae_cache_cpu", "manual: Wan VAE cache on CPU.", advanced=True),
            ],
            outputs=[
                MemoryT.Output(display_name="memory_config", tooltip="For a TrainLoRA node."),
                io.String.Output(display_name="explanation", tooltip="What was chosen and why."),
            ],
        )

    @classmethod
    def execute(cls, mode, architecture, model_size, vram_gb, **manual):
        _finite(vram_gb=vram_gb)
        if mode == "manual":
            cfg = configs.MemoryConfig(**manual, note="manual settings")
            return io.NodeOutput(cfg, cfg.note)
        if vram_gb <= 0:
            import torch

            if not torch.cuda.is_available():
                raise ValueError("vram_gb is 0 and no CUDA GPU is visible to ComfyUI: type the free VRAM in GiB")
            vram_gb = torch.cuda.mem_get_info(0)[0] / 2**30
        cfg = configs.suggest_memory(architecture, vram_gb, model_size)
        return io.NodeOutput(cfg, cfg.note)


# --- LoRA trainers -----------------------------------------------------------------------


def _train_inputs(extra):
    return [
        ENV_IN(),
        DatasetT.Input("dataset", tooltip="Cached dataset (after Cache Latents and Cache Text Encoder)."),
        TrainingT.Input("training_config", optional=True, tooltip="Unplugged: TrainingConfig defaults."),
        OptimizerT.Input("optimizer_config", optional=True, tooltip="Unplugged: AdamW8bit, constant LR."),
        SamplingT.Input("sampling_config", optional=True, tooltip="Sample videos during training."),
        MemoryT.Input("memory_config", optional=True, tooltip="Overrides the memory settings of training_config."),
        _s("dit", "Base DiT checkpoint path."),
        *extra,
        _s("output_name", "LoRA file name without folder or extension.", "my_lora"),
        _s("output_dir", "Folder for the LoRA; empty = models/loras/musubi (shows up in LoRA loaders)."),
        _s("gpu_ids", "accelerate --gpu_ids, e.g. 0 or 1; empty = default.", advanced=True),
        EXTRA_IN(),
    ]


def TRAIN_OUTPUTS():  # noqa: N802
    return [
        io.String.Output(display_name="lora_path", tooltip="The final LoRA .safetensors."),
        io.String.Output(display_name="checkpoints", tooltip="Intermediate checkpoints, one path per line."),
        io.String.Output(display_name="log_path", tooltip="Full console log of the run."),
    ]


def _train(cls, arch: str, dataset, dit, output_name, output_dir, gpu_ids, extra_args, musubi_env, models: dict,
           training_config=None, optimizer_config=None, sampling_config=None, memory_config=None, **job_kw):  # fmt: skip
    spec = archs.ARCHS[arch]
    e = _env(musubi_env, (spec.train,), accelerate=True)
    paths = commands.require_paths({"dit": dit, **models}, optional=tuple(models))
    env.check_output_name(output_name)
    if sampling_config is not None:
        sampling_config.validate()
    out_dir = _output_folder(Path(env.native_path(output_dir)) if output_dir.strip() else _default_lora_dir(),
                             "output_dir")  # fmt: skip
    job = commands.TrainJob(
        arch=arch,
        models=commands.TrainModels(**paths),
        dataset_config=dataset["toml"],
        output_dir=str(out_dir),
        output_name=output_name,
        training=training_config or configs.TrainingConfig(),
        optimizer=optimizer_config or configs.OptimizerConfig(),
        sampling=sampling_config,
        memory=memory_config,
        gpu_ids=gpu_ids.strip(),
        extra=extra_args,
        **job_kw,
    )
    prompt_file = sampling_config.write_prompt_file(job.prompt_file) if sampling_config else None
    argv = commands.train_argv(e, job, prompt_file)
    _register_loras(out_dir)
    result = _run(argv, e, node_id=cls.hidden.unique_id, log_path=job.log_path, expected=[job.final_path],
                  what=f"{spec.label} LoRA training")  # fmt: skip
    ckpts = [p for p in result.state.kept_checkpoints if os.path.exists(p)]
    return io.NodeOutput(str(job.final_path), "\n".join(ckpts), str(job.log_path))


def _train_fingerprint(kw: dict) -> str:
    """Training is expensive: queueing the same inputs again reuses the finished run.

    The dataset object carries a signature of the data files, so new or edited files retrain;
    so does changing any input (e.g. seed or output_name). A failed run is never reused.
    """
    return f"{env.native_path(str(kw.get('output_dir', '')))}|{kw.get('output_name', '')}"


def _generate_fingerprint(kw: dict):
    """A fixed seed gives the same video: reuse it. seed -1 (random) always runs again."""
    seed = kw.get("seed", -1)
    return float("nan") if not isinstance(seed, int) or seed < 0 else "seeded"


class TrainLoRAHunyuanVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_TrainLoRA_HunyuanVideo",
            display_name="Musubi Train LoRA (HunyuanVideo)",
            category="MusubiTuner/train",
            description="Trains a HunyuanVideo LoRA with accelerate launch hv_train_network.py in musubi's venv. "
            "Streams progress and a live log; succeeds only if the final .safetensors was written. Queued again "
            "with unchanged inputs and data, the finished run is reused.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=_train_inputs(
                [
                    _s("vae", "VAE (only needed for sampling during training)."),
                    _s("text_encoder1", "LLM text encoder (only for sampling)."),
                    _s("text_encoder2", "CLIP-L text encoder (only for sampling)."),
                ]
            ),
            outputs=TRAIN_OUTPUTS(),
        )

    @classmethod
    def execute(cls, dataset, dit, vae, text_encoder1, text_encoder2, output_name, output_dir, gpu_ids, extra_args,
                musubi_env=None, **cfgs):  # fmt: skip
        models = {"vae": vae, "text_encoder1": text_encoder1, "text_encoder2": text_encoder2}
        return _train(cls, "hunyuan_video", dataset, dit, output_name, output_dir, gpu_ids, extra_args, musubi_env,
                      models, **cfgs)  # fmt: skip

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return _train_fingerprint(kw)


class TrainLoRAWan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_TrainLoRA_Wan",
            display_name="Musubi Train LoRA (Wan 2.1 / 2.2)",
            category="MusubiTuner/train",
            description="Trains a Wan LoRA (t2v / i2v / Fun-Control; Wan2.2 A14B with high- and low-noise DiTs) "
            "with accelerate launch wan_train_network.py in musubi's venv. Queued again with unchanged inputs and "
            "data, the finished run is reused.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=_train_inputs(
                [
                    _c("task", "Model task; *-FC = Fun-Control, *-A14B = Wan2.2.", archs.ARCHS["wan"].tasks),
                    _s("dit_high_noise", "Wan2.2: the high-noise DiT (dit is the low-noise one); empty = low only."),
                    _i(
                        "timestep_boundary",
                        "Wan2.2: high/low switch timestep (0-1000); 0 = musubi's default.",
                        0,
                        0,
                        1000,
                        advanced=True,
                    ),
                    _b(
                        "offload_inactive_dit",
                        "Wan2.2: park the inactive DiT on CPU (not with block swap).",
                        advanced=True,
                    ),
                    _b("one_frame", "One-frame training (image pairs).", advanced=True),
                    _s("vae", "Wan VAE (only for sampling)."),
                    _s("t5", "T5 text encoder (only for sampling)."),
                    _s("clip", "Wan2.1 I2V: CLIP model (only for sampling).", advanced=True),
                ]
            ),
            outputs=TRAIN_OUTPUTS(),
        )

    @classmethod
    def execute(cls, dataset, dit, task, dit_high_noise, timestep_boundary, offload_inactive_dit, one_frame, vae, t5,
                clip, output_name, output_dir, gpu_ids, extra_args, musubi_env=None, **cfgs):  # fmt: skip
        models = {"vae": vae, "text_encoder1": t5, "image_encoder": clip, "dit_high_noise": dit_high_noise}
        return _train(cls, "wan", dataset, dit, output_name, output_dir, gpu_ids, extra_args, musubi_env, models,
                      task=task, timestep_boundary=timestep_boundary, offload_inactive_dit=offload_inactive_dit,
                      one_frame=one_frame, **cfgs)  # fmt: skip

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return _train_fingerprint(kw)


class TrainLoRAFramePack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_TrainLoRA_FramePack",
            display_name="Musubi Train LoRA (FramePack)",
            category="MusubiTuner/train",
            description="Trains a FramePack (or F1 / one-frame) LoRA with accelerate launch fpack_train_network.py "
            "in musubi's venv. Queued again with unchanged inputs and data, the finished run is reused.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=_train_inputs(
                [
                    _s("vae", "HunyuanVideo VAE."),
                    _s("text_encoder1", "LLM text encoder (llava)."),
                    _s("text_encoder2", "CLIP-L text encoder."),
                    _s("image_encoder", "SigLIP image encoder."),
                    _b("f1", "FramePack-F1 (forward sampling) model."),
                    _b("one_frame", "One-frame (kisekaeichi-style) training.", advanced=True),
                    _i("latent_window_size", "Latent window size; 0 = default (9).", 0, 0, 64, advanced=True),
                ]
            ),
            outputs=TRAIN_OUTPUTS(),
        )

    @classmethod
    def execute(cls, dataset, dit, vae, text_encoder1, text_encoder2, image_encoder, f1, one_frame,
                latent_window_size, output_name, output_dir, gpu_ids, extra_args, musubi_env=None, **cfgs):  # fmt: skip
        models = {"vae": vae, "text_encoder1": text_encoder1, "text_encoder2": text_encoder2,
                  "image_encoder": image_encoder}  # fmt: skip
        return _train(cls, "framepack", dataset, dit, output_name, output_dir, gpu_ids, extra_args, musubi_env, models,
                      f1=f1, one_frame=one_frame, latent_window_size=latent_window_size, **cfgs)  # fmt: skip


# --- Generation --------------------------------------------------------------------------


def _gen_inputs(arch: str, extra):
    spec = archs.ARCHS[arch]
    return [
        ENV_IN(),
        _s("prompt", "What the video shows.", multiline=True),
        _s("negative_prompt", "What to avoid (where the model uses CFG).", multiline=True),
        _s("dit", "DiT checkpoint path."),
        _s("vae", "VAE path."),
        *extra,
        _i("width", "Width in pixels (multiple of 16).", 832 if arch == "wan" else 960, 16, 4096, step=16),
        _i("height", "Height in pixels (multiple of 16).", 480 if arch == "wan" else 544, 16, 4096, step=16),
        _i(
            "frames",
            "Frame count (4*N+1 for HunyuanVideo/Wan; FramePack: seconds = frames / fps).",
            81 if arch == "wan" else 25,
            1,
            2048,
        ),
        _i("fps", f"Frames per second; 0 = {spec.fps}.", 0, 0, 120),
        _i("steps", "Sampling steps; 0 = musubi's default.", 0, 0, 1000),
        _i("seed", "Seed; -1 = random.", 42, -1, 2**31 - 1),
        _f("guidance_scale", "CFG / guidance scale; 0 = musubi's default.", 0.0, 0.0, 100.0, 0.1),
        _f("flow_shift", "Flow shift; 0 = musubi's default.", 0.0, 0.0, 100.0, 0.1),
        io.Image.Input("image", optional=True, tooltip="Start image for image-to-video (first frame used)."),
        *(
            [io.Image.Input("end_image", optional=True, tooltip="End image (Wan FLF2V / FramePack), first frame used.")]
            if arch != "hunyuan_video"
            else []
        ),
        _s("lora_1", "LoRA path or name in models/loras; empty = none."),
        _f("strength_1", "Multiplier of lora_1.", 1.0, -10.0, 10.0),
        _s("lora_2", "Second LoRA; empty = none.", advanced=True),
        _f("strength_2", "Multiplier of lora_2.", 1.0, -10.0, 10.0, advanced=True),
        _s("lora_3", "Third LoRA; empty = none.", advanced=True),
        _f("strength_3", "Multiplier of lora_3.", 1.0, -10.0, 10.0, advanced=True),
        _c("attn_mode", "Attention kernel.", ("sdpa", "torch", "flash", "sageattn", "xformers")),
        _b("fp8", "DiT in fp8 (less VRAM)."),
        _b("fp8_text_encoder", "Text encoder in fp8."),
        _i("blocks_to_swap", "DiT blocks on CPU; 0 = off.", 0, 0, 60),
        EXTRA_IN(),
    ]


def GEN_OUTPUTS():  # noqa: N802
    return [
        io.Image.Output(display_name="frames", tooltip="The generated frames as an IMAGE batch."),
        io.String.Output(display_name="path", tooltip="The MP4 musubi saved (its frames are in a folder beside it)."),
    ]


def _generate(cls, arch: str, kw: dict, models: dict, **job_kw):
    import folder_paths

    spec = archs.ARCHS[arch]
    e = _env(kw.pop("musubi_env", None), (spec.generate,))
    _finite(**kw, **job_kw)
    optional = tuple(k for k in models if k not in ("text_encoder1",))
    paths = commands.require_paths({"dit": kw["dit"], "vae": kw["vae"], **models}, optional=optional)
    images = {k: _image_frames(kw[k], k) for k in ("image", "end_image") if kw.get(k) is not None}
    loras = []
    for i in (1, 2, 3):
        if kw[f"lora_{i}"].strip():
            path = _lora_path(kw[f"lora_{i}"], f"lora_{i}")
            # workflows saved before the Wan target inputs existed apply every LoRA to `dit`
            loras.append((f"lora_{i}", path, kw[f"strength_{i}"], kw.get(f"lora_{i}_target") or "dit"))
    low, high = commands.split_wan_loras(loras)
    # LoHa / LoKr: the script's own loader or the LyCORIS library (--lycoris), per architecture
    infos = lora_file.inspect_files({n: p for n, p, _, _ in loras})
    lora_file.require_musubi_layout(arch, infos, "generation")
    lycoris = lora_file.generate_lycoris(arch, infos)
    # every check before the run folder exists: a refused input leaves no folder behind
    out = Path(folder_paths.get_output_directory(), "musubi", "generated",
               f"{arch}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}")  # fmt: skip
    image_paths = {k: str(out / f"{'start_image' if k == 'image' else k}.png") for k in images}
    job = commands.GenerateJob(
        arch=arch, prompt=kw["prompt"], negative_prompt=kw["negative_prompt"], save_path=str(out), **paths,
        width=kw["width"], height=kw["height"], frames=kw["frames"], fps=kw["fps"], steps=kw["steps"],
        seed=kw["seed"], guidance_scale=kw["guidance_scale"], flow_shift=kw["flow_shift"],
        image_path=image_paths.get("image", ""), end_image_path=image_paths.get("end_image", ""),
        loras=low, loras_high_noise=high, attn_mode=kw["attn_mode"], fp8=kw["fp8"], fp8_text_encoder=kw["fp8_text_encoder"],
        blocks_to_swap=kw["blocks_to_swap"], output_type="both", extra=kw["extra_args"], lycoris=lycoris, **job_kw,
    )  # fmt: skip
    argv = commands.generate_argv(e, job)
    if lycoris:
        env.validate_env(e, modules=("lycoris",))
    _output_folder(out, "the output folder")
    for k, arr in images.items():
        _image_to_png(arr, out, Path(image_paths[k]).stem)
    log = out / "generate.log"
    _run(argv, e, node_id=cls.hidden.unique_id, log_path=log, what=f"{spec.label} generation", run_dirs=[out])
    frames = [p for p in media.collect_frames(out) if p.name not in ("start_image.png", "end_image.png")]
    if not frames:
        moved = runner.set_aside([], [out])
        where = moved[0][1] if moved else out
        raise MusubiRunError(
            f"{spec.label} generation exited with code 0 but wrote no frames; its folder was renamed to {where} so it "
            f"is not taken for a finished video. Full log: {where / log.name}",
            returncode=0, tail=[], log_path=where / log.name,
        )  # fmt: skip
    videos = sorted(out.glob("*.mp4"))
    return io.NodeOutput(_frames_to_image(media.load_images(frames)), str(videos[0] if videos else out))


class GenerateVideoHunyuanVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_GenerateVideo_HunyuanVideo",
            display_name="Musubi Generate Video (HunyuanVideo)",
            category="MusubiTuner/generate",
            description="Text/image/video-to-video with musubi's hv_generate_video.py (LoRAs applied by musubi).",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=_gen_inputs(
                "hunyuan_video",
                [
                    _s("text_encoder1", "LLM text encoder."),
                    _s("text_encoder2", "CLIP-L text encoder."),
                    _s("video_path", "Video-to-video: input video path; empty = off.", advanced=True),
                    _f("strength", "Video-to-video strength.", 0.8, 0.0, 1.0, advanced=True),
                ],
            ),
            outputs=GEN_OUTPUTS(),
        )

    @classmethod
    def execute(cls, text_encoder1, text_encoder2, video_path, strength, **kw):
        models = {"text_encoder1": text_encoder1, "text_encoder2": text_encoder2}
        video = commands.require_paths({"video_path": video_path}, optional=("video_path",))["video_path"]
        return _generate(cls, "hunyuan_video", kw, models, video_path=video, strength=strength)

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return _generate_fingerprint(kw)


class GenerateVideoWan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_GenerateVideo_Wan",
            display_name="Musubi Generate Video (Wan 2.1 / 2.2)",
            category="MusubiTuner/generate",
            description="Text/image-to-video with musubi's wan_generate_video.py (Wan2.2 with high-noise DiT; each LoRA "
            "applied to the DiT its lora_N_target names).",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=_gen_inputs(
                "wan",
                [
                    _c("task", "Model task.", archs.ARCHS["wan"].tasks, "t2v-1.3B"),
                    _s("t5", "T5 text encoder."),
                    _s("clip", "Wan2.1 I2V: CLIP model; else empty."),
                    _s(
                        "dit_high_noise",
                        "Wan2.2: high-noise DiT; empty = none. LoRAs apply to it through lora_N_target.",
                        advanced=True,
                    ),
                    _b("fp8_scaled", "Scaled fp8 DiT (better than plain fp8)."),
                    _s("video_path", "Video-to-video: input video path; empty = off.", advanced=True),
                    _s("control_video", "Fun-Control tasks (*-FC): control video path; empty = off.", advanced=True),
                ],
            )
            # after every older input, and optional: saved workflows keep their widget values and apply
            # their LoRAs to `dit` as before
            + [
                _c(
                    f"lora_{i}_target",
                    f"Which DiT lora_{i} is applied to: dit (Wan2.1's DiT, Wan2.2's low-noise DiT), dit_high_noise "
                    "(Wan2.2), or both (a LoRA trained on both Wan2.2 DiTs in one run).",
                    commands.WAN_LORA_TARGETS,
                    optional=True,
                    advanced=i > 1,
                )
                for i in (1, 2, 3)
            ],
            outputs=GEN_OUTPUTS(),
        )

    @classmethod
    def execute(cls, task, t5, clip, dit_high_noise, fp8_scaled, video_path, control_video, **kw):
        models = {"text_encoder1": t5, "image_encoder": clip, "dit_high_noise": dit_high_noise}
        extra = commands.require_paths(
            {"video_path": video_path, "control_video": control_video}, optional=("video_path", "control_video")
        )
        return _generate(cls, "wan", kw, models, task=task, fp8_scaled=fp8_scaled, video_path=extra["video_path"],
                         control_path=extra["control_video"])  # fmt: skip

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return _generate_fingerprint(kw)


class GenerateVideoFramePack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_GenerateVideo_FramePack",
            display_name="Musubi Generate Video (FramePack)",
            category="MusubiTuner/generate",
            description="Image-to-video with musubi's fpack_generate_video.py.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=_gen_inputs(
                "framepack",
                [
                    _s("text_encoder1", "LLM text encoder."),
                    _s("text_encoder2", "CLIP-L text encoder."),
                    _s("image_encoder", "SigLIP image encoder."),
                    _b("fp8_scaled", "Scaled fp8 DiT."),
                ],
            ),
            outputs=GEN_OUTPUTS(),
        )

    @classmethod
    def execute(cls, text_encoder1, text_encoder2, image_encoder, fp8_scaled, **kw):
        models = {"text_encoder1": text_encoder1, "text_encoder2": text_encoder2, "image_encoder": image_encoder}
        return _generate(cls, "framepack", kw, models, fp8_scaled=fp8_scaled)

    # --- LoRA utilities ----------------------------------------------------------------------

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return _generate_fingerprint(kw)


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
                ENV_IN(),
                _s("lora", "LoRA .safetensors path or name in models/loras."),
                _c(
                    "direction",
                    "auto: from the keys; to_other: musubi -> other; to_musubi: other -> musubi.",
                    ("auto", "to_other", "to_musubi"),
                ),  # fmt: skip
                _s("output_name", "Output file name (no folder); empty = <input>_<format>.", advanced=True),
                _s("diffusers_prefix", "Key prefix for the other format; empty = musubi's default.", advanced=True),
            ],
            outputs=[io.String.Output(display_name="lora_path", tooltip="The converted file (next to the input).")],
        )

    @classmethod
    def execute(cls, lora, direction, output_name, diffusers_prefix, musubi_env=None):
        e = _env(musubi_env, ("convert_lora",))
        if not lora.strip():
            raise ValueError("lora is empty: give a LoRA .safetensors path or a name from models/loras")
        src = Path(_lora_path(lora, "lora"))
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
        _run(argv, e, node_id=cls.hidden.unique_id, log_path=dst.with_suffix(".log"), expected=[dst],
             what="LoRA conversion")  # fmt: skip
        return io.NodeOutput(str(dst))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return _mtime(kw.get("lora", ""))


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
                ENV_IN(),
                _s("dit", "Base DiT checkpoint (.safetensors; HunyuanVideo also the original .pt)."),
                _s("lora_1", "LoRA path or name in models/loras."),
                _f("strength_1", "Multiplier of lora_1.", 1.0, -10.0, 10.0),
                _s("lora_2", "Optional second LoRA."),
                _f("strength_2", "Multiplier of lora_2.", 1.0, -10.0, 10.0),
                _s("lora_3", "Optional third LoRA."),
                _f("strength_3", "Multiplier of lora_3.", 1.0, -10.0, 10.0),
                _s("output_path", "Merged checkpoint path (.safetensors)."),
                _c("device", "Where the merge (and the text encoder run before it) is computed.", ("cpu", "cuda")),
                _c(
                    "architecture",
                    "Model family of the DiT and LoRAs. hunyuan_video runs merge_lora.py; the others their "
                    "generate script in merge-only mode.",
                    tuple(commands.MERGE_SPECS),
                    optional=True,
                ),
                _c(
                    "task",
                    "Wan only: the DiT's task. Wan2.2 A14B: merge the low-noise and the high-noise DiT in two runs, "
                    "each with its own LoRAs.",
                    archs.ARCHS["wan"].tasks,
                    optional=True,
                ),
                _s(
                    "vae",
                    "VAE path: Wan i2v / Fun-Control, FramePack, FLUX.1 Kontext (AE), Qwen-Image. Else empty.",
                    optional=True,
                ),
                _s(
                    "text_encoder1",
                    "Text encoder the script loads before merging: Wan T5; FramePack LLM (llava); Kontext T5; "
                    "Qwen-Image Qwen2.5-VL; Z-Image Qwen3; HunyuanVideo 1.5 Qwen2.5-VL. Empty for HunyuanVideo.",
                    optional=True,
                ),
                _s("text_encoder2", "FramePack / Kontext: CLIP-L; HunyuanVideo 1.5: byT5. Else empty.", optional=True),
                _s("image_encoder", "FramePack: SigLIP; Wan2.1 i2v tasks: CLIP. Else empty.", optional=True),
                _s(
                    "include_pattern",
                    "Regex: merge only LoRA modules whose name matches (every LoRA); empty = all. Not for HunyuanVideo.",
                    optional=True,
                    advanced=True,
                ),
                _s(
                    "exclude_pattern",
                    "Regex: skip LoRA modules whose name matches (every LoRA); empty = none. Not for HunyuanVideo.",
                    optional=True,
                    advanced=True,
                ),
            ],
            outputs=[io.String.Output(display_name="model_path", tooltip="The merged DiT.")],
        )

    @classmethod
    def execute(cls, dit, output_path, device, architecture="hunyuan_video", task="t2v-14B", vae="",
                text_encoder1="", text_encoder2="", image_encoder="", include_pattern="", exclude_pattern="",
                musubi_env=None, **kw):  # fmt: skip
        spec = commands.merge_spec(architecture)
        e = _env(musubi_env, (spec.script,))
        _finite(**kw)
        named = {f"lora_{i}": _lora_path(kw[f"lora_{i}"], f"lora_{i}") for i in (1, 2, 3) if kw[f"lora_{i}"].strip()}
        loras = [(path, kw[f"strength_{name[-1]}"]) for name, path in named.items()]
        infos = lora_file.inspect_files(named)
        lora_file.require_musubi_layout(architecture, infos, "merge")
        lycoris = lora_file.merge_lycoris(architecture, infos, always=spec.lycoris)
        out = _output_file(output_path, "output_path")
        models = {"vae": vae, "text_encoder1": text_encoder1, "text_encoder2": text_encoder2,
                  "image_encoder": image_encoder}  # fmt: skip
        paths = commands.require_paths({"dit": dit, **models}, optional=tuple(models))
        job = commands.MergeJob(
            arch=architecture, dit=paths.pop("dit"), loras=tuple(loras), output=str(out), device=device,
            task=task if architecture == "wan" else "", include_pattern=include_pattern.strip(),
            exclude_pattern=exclude_pattern.strip(), prompt_file=str(out.with_suffix(".prompt.txt")),
            lycoris=lycoris and not spec.lycoris, **paths,
        )  # fmt: skip
        argv = commands.merge_argv(e, job)  # checks the inputs before musubi's venv is started
        _not_an_input(out, "output_path", {"dit": job.dit, **named, **{k: v for k, v in paths.items() if v}})
        if lycoris:
            env.validate_env(e, modules=("lycoris",))
        _output_folder(out.parent, "output_path")
        prompt_file = Path(job.prompt_file)
        if spec.prompt_file:
            # batch mode needs a prompt: it is text-encoded (musubi does that before merging), never sampled
            prompt_file.write_text("merge\n", encoding="utf-8")
        try:
            _run(argv, e, node_id=cls.hidden.unique_id, log_path=out.with_suffix(".log"), expected=[out],
                 what="LoRA merge", done_line=commands.MERGE_SAVED_LINE if spec.exits_nonzero_after_save else "")  # fmt: skip
        finally:
            if spec.prompt_file:
                prompt_file.unlink(missing_ok=True)
        return io.NodeOutput(str(out))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return "|".join(_mtime(kw.get(k, "")) for k in ("dit", "lora_1", "lora_2", "lora_3"))


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
                ENV_IN(),
                _s(
                    "checkpoints",
                    "Checkpoint paths, one per line (e.g. a trainer's checkpoints output).",
                    multiline=True,
                ),
                _f("beta", "EMA decay.", 0.95, 0.0001, 0.9999, 0.001),
                _f("beta2", "Ramp beta linearly to this; 0 = constant beta.", 0.0, 0.0, 0.9999, 0.001),
                _f("sigma_rel", "Power-function EMA (overrides beta); 0 = off, e.g. 0.2.", 0.0, 0.0, 10.0, 0.01),
                _b("no_sort", "Keep the given order instead of sorting by file time.", advanced=True),
                _s("output_path", "Output .safetensors path."),
            ],
            outputs=[io.String.Output(display_name="lora_path", tooltip="The averaged LoRA.")],
        )

    @classmethod
    def execute(cls, checkpoints, beta, beta2, sigma_rel, no_sort, output_path, musubi_env=None):
        e = _env(musubi_env, ("lora_post_hoc_ema",))
        _finite(beta=beta, beta2=beta2, sigma_rel=sigma_rel)
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
        out = _output_file(output_path, "output_path")
        _not_an_input(out, "output_path", {f"checkpoints line {i + 1}": p for i, p in enumerate(paths)})
        argv = commands.post_hoc_ema_argv(e, paths, str(out), beta, beta2, sigma_rel, no_sort)
        _output_folder(out.parent, "output_path")
        _run(argv, e, node_id=cls.hidden.unique_id, log_path=out.with_suffix(".log"), expected=[out],
             what="post-hoc EMA")  # fmt: skip
        return io.NodeOutput(str(out))

    # --- Video in/out, batch, monitors -------------------------------------------------------

    @classmethod
    def fingerprint_inputs(cls, **kw):
        paths = [p for p in str(kw.get("checkpoints", "")).splitlines() if p.strip()]
        return "|".join(_mtime(p) for p in paths)


class VideoInput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_VideoInput",
            display_name="Musubi Video Input",
            category="MusubiTuner/video",
            description="Loads a video file into frames. GIF/WebP need nothing extra; MP4/WebM/MOV need PyAV.",
            inputs=[
                _s("video_path", "Video file path."),
                _i("frame_stride", "Keep every n-th frame.", 1, 1, 1000),
                _i("max_frames", "Most frames kept (after the stride); 0 = all.", 0, 0, 100000),
                _i("start_frame", "First frame index.", 0, 0, 10_000_000),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Frames as an IMAGE batch."),
                io.Float.Output(display_name="fps", tooltip="Frame rate after the stride (0 if unknown)."),
                io.Int.Output(display_name="frame_count", tooltip="Number of frames returned."),
            ],
        )

    @classmethod
    def execute(cls, video_path, frame_stride, max_frames, start_frame):
        frames, fps = media.read_video(env.native_path(video_path), frame_stride, max_frames, start_frame, "video_path")
        return io.NodeOutput(_frames_to_image(frames), float(fps), int(frames.shape[0]))


class VideoOutput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_VideoOutput",
            display_name="Musubi Video Output",
            category="MusubiTuner/video",
            description="Saves frames as animated WebP or GIF (Pillow only) or MP4/WebM (needs PyAV) in the output folder.",
            is_output_node=True,
            inputs=[
                io.Image.Input("frames", tooltip="Frames to save."),
                _f("fps", "Frames per second.", 16.0, 0.1, 240.0),
                _c("format", "webp and gif work without ffmpeg/PyAV.", media.VIDEO_FORMATS),
                _i("quality", "Quality 1-100 (webp 100 = lossless).", 90, 1, 100),
                _s("filename_prefix", "File name prefix in the output folder.", "musubi/video"),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The saved file.")],
        )

    @classmethod
    def execute(cls, frames, fps, format, quality, filename_prefix):
        import folder_paths

        _finite(fps=fps)
        prefix = check_file_name(filename_prefix or "musubi/video", "filename_prefix", "musubi/video", subfolders=True)
        arr = media.frames_to_uint8(_to_numpy(frames), "frames")
        out_dir = Path(folder_paths.get_output_directory())
        stem = f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:4]}"
        _output_folder((out_dir / stem).parent, "filename_prefix")
        path = media.write_video(arr, out_dir / stem, fps, format, quality)
        rel = path.relative_to(out_dir)
        preview = {
            "filename": rel.name,
            "subfolder": rel.parent.as_posix() if rel.parent != Path(".") else "",
            "type": "output",
        }
        # ComfyUI's front end plays an output in a <video> element only when it is flagged animated and
        # is not .webp/.png (like core's SaveVideo); webp/gif animate in a plain <img>.
        ui = {"images": [preview], "animated": [format in ("mp4", "webm")]}
        return io.NodeOutput(str(path), ui=ui)


class BatchProcessor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_BatchProcessor",
            display_name="Musubi Batch Prompts",
            category="MusubiTuner/generate",
            description="Runs a list of prompts through a connected Generate Video node one after another "
            "(ComfyUI runs the downstream node once per list item) and collects the outputs.",
            inputs=[_s("prompts", "One prompt per line; # starts a comment.", multiline=True)],
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


class TrainingMonitor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_TrainingMonitor",
            display_name="Musubi Training Monitor",
            category="MusubiTuner/monitor",
            description="Plots the loss curve from a training log (avr_loss per step), or, with tensorboard_dir, the "
            "per-step scalars (loss/current, loss/average, lr/*) of the newest TensorBoard run there (needs the "
            "tensorboard package); loss/epoch goes to the summary.",
            not_idempotent=True,
            inputs=[
                _s("log_path", "A trainer's log_path output (<name>_train.log)."),
                _s(
                    "tensorboard_dir",
                    "Optional: <output_dir>/logs of a run with log_tensorboard (needs the tensorboard package). "
                    "Several runs there: the newest is plotted.",
                    advanced=True,
                ),
                _i("width", "Plot width in pixels.", 768, 128, 4096),
                _i("height", "Plot height in pixels.", 384, 128, 4096),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="The curves as an image."),
                io.String.Output(display_name="summary", tooltip="Last values."),
            ],
        )

    @classmethod
    def execute(cls, log_path, tensorboard_dir, width, height):
        import numpy as np

        notes = []
        if tensorboard_dir.strip():
            tb = monitor.read_tensorboard(env.native_path(tensorboard_dir))
            series, per_epoch = monitor.split_epoch_series(tb.series)
            if len(tb.runs) > 1:
                notes.append(f"run {tb.run} (the newest of {len(tb.runs)} under {tensorboard_dir.strip()})")
            # musubi logs these at step = epoch number, not on the optimizer-step axis of the plot
            notes += [f"{k}: last {v[-1][1]:.5g} at epoch {v[-1][0]}" for k, v in per_epoch.items() if v]
        else:
            series = {"avr_loss": monitor.loss_from_log(env.native_path(log_path))}
        img = monitor.plot_series(series, width, height)
        summary = "\n".join(
            [f"{k}: {len(v)} points, last {v[-1][1]:.5g} at step {v[-1][0]}" for k, v in series.items() if v] + notes
        )
        return io.NodeOutput(_frames_to_image(img[np.newaxis]), summary or "no data yet")


class ResourceMonitor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_ResourceMonitor",
            display_name="Musubi Resource Monitor",
            category="MusubiTuner/monitor",
            description="GPU memory, utilisation, temperature and per-process memory from nvidia-smi.",
            not_idempotent=True,
            is_output_node=True,
            inputs=[_b("fail_without_nvidia_smi", "Error (instead of a message) when nvidia-smi is missing.", False)],
            outputs=[io.String.Output(display_name="report", tooltip="One line per GPU and per process.")],
        )

    @classmethod
    def execute(cls, fail_without_nvidia_smi):
        try:
            gpus, procs = monitor.nvidia_smi()
        except ValueError as exc:
            if fail_without_nvidia_smi:
                raise
            return io.NodeOutput(str(exc), ui={"text": [str(exc)]})
        report = monitor.format_status(gpus, procs)
        return io.NodeOutput(report, ui={"text": [report]})


NODES: list[type[io.ComfyNode]] = [
    Environment,
    DatasetConfig,
    DatasetConfigLoader,
    DatasetViewer,
    CacheLatents,
    CacheTextEncoder,
    TrainingConfig,
    OptimizerConfig,
    SamplingConfig,
    MemoryOptimizer,
    TrainLoRAHunyuanVideo,
    TrainLoRAWan,
    TrainLoRAFramePack,
    GenerateVideoHunyuanVideo,
    GenerateVideoWan,
    GenerateVideoFramePack,
    ConvertLoRA,
    MergeLoRA,
    PostHocEMA,
    VideoInput,
    VideoOutput,
    BatchProcessor,
    TrainingMonitor,
    ResourceMonitor,
]
