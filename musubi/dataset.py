"""musubi-tuner dataset config (``--dataset_config`` TOML): build, validate, write, scan.

The schema mirrors musubi's ``dataset/config_utils.py`` ``ConfigSanitizer`` (voluptuous):
top-level ``[general]`` and ``[[datasets]]`` only, every key optional, no unknown keys,
types checked with ``isinstance`` (so ``source_fps = 30`` is rejected: it must be a float),
``resolution`` an int or ``[W, H]``; a dataset is a *video* dataset iff it has
``video_directory`` or ``video_jsonl_file``. On top of that we check what musubi only
finds later (or too late): a source for each dataset, captions, unique cache folders,
resolutions the models can use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import tomlio

# (type, description) per key; "res" = int or [int, int], "ints" = list of int
ASCENDABLE_KEYS: dict[str, str] = {
    "caption_extension": "str",
    "batch_size": "int",
    "num_repeats": "int",
    "resolution": "res",
    "enable_bucket": "bool",
    "bucket_no_upscale": "bool",
}
IMAGE_KEYS: dict[str, str] = {
    **ASCENDABLE_KEYS,
    "image_directory": "str",
    "image_jsonl_file": "str",
    "cache_directory": "str",
    "control_directory": "str",
    "multiple_target": "bool",
    "fp_latent_window_size": "int",
    "fp_1f_clean_indices": "ints",
    "fp_1f_target_index": "int",
    "fp_1f_no_post": "bool",
    "no_resize_control": "bool",
    "control_resolution": "res",
}
VIDEO_KEYS: dict[str, str] = {
    **ASCENDABLE_KEYS,
    "video_directory": "str",
    "video_jsonl_file": "str",
    "control_directory": "str",
    "target_frames": "ints",
    "frame_extraction": "str",
    "frame_stride": "int",
    "frame_sample": "int",
    "max_frames": "int",
    "cache_directory": "str",
    "source_fps": "float",
    "fp_latent_window_size": "int",
}
GENERAL_KEYS = ASCENDABLE_KEYS
FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".webm", ".mkv")
RESOLUTION_MULTIPLE = 16
"""HunyuanVideo, Wan and FramePack latents are 1/8 of the pixels and patchified by 2."""

_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "bool": "true or false",
    "float": "a float (write 30.0, not 30)",
    "res": "an integer or [width, height]",
    "ints": "a list of integers, e.g. [1, 25, 45]",
}


class DatasetConfigError(ValueError):
    """The dataset config breaks musubi's schema or cannot work; ``problems`` lists each one."""

    def __init__(self, problems: list[str], source: str = "dataset config"):
        self.problems = problems
        super().__init__(f"{source} is invalid:\n- " + "\n- ".join(problems))


CAPTION_EXTENSION_RULE = (
    'must be a file ending with its dot, e.g. ".txt": musubi appends it to each file name without its '
    'extension, so "txt" would look for img0txt'
)


def caption_extension_ok(ext: object) -> bool:
    """An ending musubi can append to a file stem: has a dot, no folder separators or control characters."""
    return isinstance(ext, str) and "." in ext and not any(c in ext for c in "/\\") and all(ord(c) >= 32 for c in ext)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(kind: str, value) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return _is_int(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "float":
        return isinstance(value, float)
    if kind == "res":
        return _is_int(value) or (isinstance(value, list | tuple) and len(value) == 2 and all(map(_is_int, value)))
    if kind == "ints":
        return isinstance(value, list | tuple) and all(map(_is_int, value))
    raise AssertionError(kind)


def is_video_dataset(ds: Mapping) -> bool:
    """musubi's rule: a dataset with a video source is validated as video, anything else as image."""
    return "video_directory" in ds or "video_jsonl_file" in ds


def _check_table(table: Mapping, allowed: Mapping[str, str], where: str, problems: list[str]) -> None:
    for key, value in table.items():
        if key not in allowed:
            hint = ""
            if key in VIDEO_KEYS and key not in IMAGE_KEYS:
                hint = " (a video-only key: this dataset has no video_directory / video_jsonl_file)"
            elif key in IMAGE_KEYS and key not in VIDEO_KEYS:
                hint = " (an image-only key in a video dataset)"
            elif key == "cache_directory":
                hint = " (cache_directory must be set per dataset, not in [general])"
            problems.append(f"{where}.{key}: unknown key{hint}; allowed keys: {', '.join(sorted(allowed))}")
            continue
        kind = allowed[key]
        if not _type_ok(kind, value):
            problems.append(f"{where}.{key} = {value!r} must be {_TYPE_NAMES[kind]}")


def resolution_wh(value) -> tuple[int, int]:
    """``resolution`` as (width, height): an int means a square."""
    return (value, value) if _is_int(value) else (int(value[0]), int(value[1]))


def effective_cache_dir(ds: Mapping) -> str | None:
    """Where musubi writes this dataset's caches: cache_directory, else the source folder."""
    raw = ds.get("cache_directory") or ds.get("image_directory") or ds.get("video_directory")
    return os.path.normcase(os.path.abspath(raw)) if raw else None


def validate_config(config: Mapping, source: str = "dataset config", strict: bool = True) -> list[str]:
    """Check ``config`` (a parsed TOML dict); raise :class:`DatasetConfigError` on problems.

    ``strict`` adds the checks musubi only makes when it builds the datasets (a source per
    dataset, captions extension, unique cache folders, resolution multiple of 16, valid
    frame_extraction). Returns warnings (e.g. target_frames musubi will round down).
    """
    problems: list[str] = []
    warnings: list[str] = []
    if not isinstance(config, Mapping):
        raise DatasetConfigError([f"the top level must be a table, got {type(config).__name__}"], source)
    for key in config:
        if key not in ("general", "datasets"):
            problems.append(f"{key}: unknown top-level key; only [general] and [[datasets]] are allowed")
    general = config.get("general", {})
    if not isinstance(general, Mapping):
        problems.append("general must be a table ([general])")
        general = {}
    _check_table(general, GENERAL_KEYS, "general", problems)
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, Mapping) for d in datasets):
        problems.append("datasets must be an array of tables ([[datasets]])")
        datasets = []
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}]"
        _check_table(ds, VIDEO_KEYS if is_video_dataset(ds) else IMAGE_KEYS, where, problems)
    if strict and not problems:
        _strict_checks(general, datasets, problems, warnings)
    if problems:
        raise DatasetConfigError(problems, source)
    return warnings


def _strict_checks(general: Mapping, datasets: list, problems: list[str], warnings: list[str]) -> None:
    if not datasets:
        problems.append("datasets: no [[datasets]] entry; add at least one image or video dataset")
    seen: dict[str, int] = {}
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}]"
        merged = {**general, **ds}
        video = is_video_dataset(ds)
        prefix = "video" if video else "image"
        directory, jsonl = ds.get(f"{prefix}_directory"), ds.get(f"{prefix}_jsonl_file")
        if not directory and not jsonl:
            problems.append(f"{where}: set {prefix}_directory (or {prefix}_jsonl_file)")
        if directory and jsonl:
            problems.append(f"{where}: set only one of {prefix}_directory and {prefix}_jsonl_file")
        if jsonl and not ds.get("cache_directory"):
            problems.append(
                f"{where}.cache_directory is required with {prefix}_jsonl_file: add a folder for the caches"
            )
        if directory and not merged.get("caption_extension"):
            problems.append(
                f'{where}.caption_extension is not set (here or in [general]): add caption_extension = ".txt"'
            )
        ext = merged.get("caption_extension")
        if ext and not caption_extension_ok(ext):
            problems.append(f"{where}.caption_extension = {ext!r} {CAPTION_EXTENSION_RULE}")
        for key in ("resolution", "control_resolution"):
            if key in merged:
                w, h = resolution_wh(merged[key])
                if w <= 0 or h <= 0 or w % RESOLUTION_MULTIPLE or h % RESOLUTION_MULTIPLE:
                    fix_w = max(RESOLUTION_MULTIPLE, round(w / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)
                    fix_h = max(RESOLUTION_MULTIPLE, round(h / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)
                    problems.append(
                        f"{where}.{key} = [{w}, {h}] (width, height): both must be positive multiples of "
                        f"{RESOLUTION_MULTIPLE}, e.g. [{fix_w}, {fix_h}]"
                    )
        for key in ("batch_size", "num_repeats", "frame_stride", "frame_sample", "max_frames"):
            if key in merged and merged[key] < 1:
                problems.append(f"{where}.{key} = {merged[key]} must be >= 1")
        if video:
            fe = ds.get("frame_extraction")
            if fe is not None and fe not in FRAME_EXTRACTIONS:
                problems.append(f"{where}.frame_extraction = {fe!r} must be one of {', '.join(FRAME_EXTRACTIONS)}")
            for n in ds.get("target_frames", []):
                if n < 1:
                    problems.append(f"{where}.target_frames contains {n}: frame counts must be >= 1")
                elif (n - 1) % 4:
                    warnings.append(f"{where}.target_frames {n} is not 4*N+1; musubi will use {(n - 1) // 4 * 4 + 1}")
            fps = ds.get("source_fps")
            if fps is not None and (not math.isfinite(fps) or fps <= 0):
                problems.append(f"{where}.source_fps = {fps} must be a positive float, e.g. 30.0")
        cache = effective_cache_dir(ds)
        if cache is not None:
            if cache in seen:
                problems.append(
                    f"{where}.cache_directory: datasets[{seen[cache]}] and {where} share the cache folder {cache!r} "
                    "(it defaults to the image/video folder); give each dataset its own cache_directory"
                )
            else:
                seen[cache] = i


def build_config(general: Mapping | None, datasets: Iterable[Mapping]) -> dict:
    """A config dict from ``[general]`` values and dataset tables, dropping ``None`` values."""
    clean = lambda d: {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v is not None}  # noqa: E731
    config: dict = {}
    g = clean(general or {})
    if g:
        config["general"] = g
    config["datasets"] = [clean(d) for d in datasets]
    return config


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written to a dataset config")
        return repr(value)  # keeps the ".0" musubi's float check needs
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # TOML basic string escapes are JSON's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def to_toml(config: Mapping) -> str:
    """Serialise a (validated) config as musubi reads it."""
    out = ["# musubi-tuner dataset config written by ComfyUI-SpeedKit (resolution is [width, height])"]
    if config.get("general"):
        out.append("[general]")
        out += [f"{k} = {_toml_value(v)}" for k, v in config["general"].items()]
    for ds in config.get("datasets", []):
        out += ["", "[[datasets]]"]
        out += [f"{k} = {_toml_value(v)}" for k, v in ds.items()]
    return "\n".join(out) + "\n"


def load_toml(path: str | os.PathLike) -> dict:
    """Parse a dataset TOML (musubi also accepts .json)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"dataset config {str(p)!r} does not exist: check the path (a .toml file)")
    if p.suffix.lower() not in (".toml", ".json"):
        raise ValueError(f"dataset config {str(p)!r} must be a .toml or .json file (musubi rejects other extensions)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"dataset config {str(p)!r} could not be read as UTF-8 text ({exc}): save it as UTF-8"
        ) from exc
    try:
        return json.loads(text) if p.suffix.lower() == ".json" else tomlio.loads(text)
    except (ValueError, tomlio.TOMLError) as exc:
        raise ValueError(f"dataset config {str(p)!r} is not valid TOML/JSON: {exc}") from exc


def write_config(config: Mapping, path: str | os.PathLike) -> Path:
    """Validate (schema only) and write ``config`` to ``path``; returns the path."""
    validate_config(config, source=str(path), strict=False)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_toml(config), encoding="utf-8")
    return p


@dataclass
class DatasetScan:
    """What is on disk for one dataset."""

    index: int
    kind: str  # "image" | "video"
    source: str
    items: list[Path] = field(default_factory=list)
    captions: dict[Path, str] = field(default_factory=dict)
    missing_captions: list[Path] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.items)


def scan_dataset(ds: Mapping, index: int = 0, general: Mapping | None = None) -> DatasetScan:
    """List the media files of one dataset and read their captions."""
    general = general or {}
    video = is_video_dataset(ds)
    kind = "video" if video else "image"
    exts = VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
    directory, jsonl = ds.get(f"{kind}_directory"), ds.get(f"{kind}_jsonl_file")
    if jsonl:
        scan = DatasetScan(index, kind, str(jsonl))
        p = Path(jsonl)
        if not p.is_file():
            raise ValueError(f"datasets[{index}].{kind}_jsonl_file {str(p)!r} does not exist: check the path")
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{p} line {number} is not JSON: {exc}") from exc
            item = Path(entry.get(f"{kind}_path", ""))
            scan.items.append(item)
            if entry.get("caption"):
                scan.captions[item] = entry["caption"]
            else:
                scan.missing_captions.append(item)
        return scan
    scan = DatasetScan(index, kind, str(directory))
    folder = Path(directory or "")
    if not directory or not folder.is_dir():
        raise ValueError(f"datasets[{index}].{kind}_directory {str(directory)!r} is not a folder: check the path")
    ext = ds.get("caption_extension", general.get("caption_extension", ".txt"))
    if not caption_extension_ok(ext):
        raise ValueError(f"datasets[{index}].caption_extension = {ext!r} {CAPTION_EXTENSION_RULE}")
    for item in sorted(folder.iterdir()):
        if item.suffix.lower() in exts and item.is_file():
            scan.items.append(item)
            cap = item.with_name(item.stem + ext)  # musubi: os.path.splitext(path)[0] + caption_extension
            if cap.is_file():
                scan.captions[item] = cap.read_text(encoding="utf-8", errors="replace").strip()
            else:
                scan.missing_captions.append(item)
    return scan


def check_dataset_files(config: Mapping, require_captions: bool = True) -> list[DatasetScan]:
    """Scan every dataset; raise if one has no media or (optionally) lacks captions."""
    general = config.get("general", {})
    scans, problems = [], []
    for i, ds in enumerate(config.get("datasets", [])):
        try:
            scan = scan_dataset(ds, i, general)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        scans.append(scan)
        if not scan.items:
            exts = VIDEO_EXTENSIONS if scan.kind == "video" else IMAGE_EXTENSIONS
            problems.append(
                f"datasets[{i}].{scan.kind}_directory {scan.source!r} has no {scan.kind}s ({', '.join(exts)}): "
                "put the training files there or fix the path"
            )
        elif require_captions and scan.missing_captions:
            ext = ds.get("caption_extension", general.get("caption_extension", ".txt"))
            names = ", ".join(p.name for p in scan.missing_captions[:5])
            more = f" and {len(scan.missing_captions) - 5} more" if len(scan.missing_captions) > 5 else ""
            problems.append(
                f"datasets[{i}]: {len(scan.missing_captions)} of {scan.count} {scan.kind}s have no caption "
                f"({names}{more}): write a {ext} file with the same name next to each, or fix caption_extension"
            )
    if problems:
        raise DatasetConfigError(problems, "dataset files")
    return scans
