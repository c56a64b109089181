"""Where the MusubiTuner nodes read and write: ComfyUI's folders, the musubi environment,
output paths checked before a run, and change markers for ComfyUI's cache.

ComfyUI (``folder_paths``) is imported inside each function, so the schemas can be read
without a running ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...musubi import dataset as mdataset
from ...musubi import env

CONFIG_FILE_NAME = "musubi.toml"


# --- the musubi environment ----------------------------------------------------------------


def config_path() -> Path | None:
    """The pack's musubi settings file: SPEEDKIT_MUSUBI_CONFIG, else <ComfyUI user dir>/speedkit/musubi.toml."""
    if os.environ.get(env.CONFIG_ENV_VAR):
        return Path(os.environ[env.CONFIG_ENV_VAR])
    try:
        import folder_paths

        return Path(folder_paths.get_user_directory()) / "speedkit" / CONFIG_FILE_NAME
    except (ImportError, AttributeError):
        return None


def checked_env(value, scripts: tuple[str, ...] = (), accelerate: bool = False) -> env.MusubiEnv:
    """The connected environment, or the one from the settings file and variables; checked for ``scripts``."""
    e = value if isinstance(value, env.MusubiEnv) else env.resolve_env(config_path=config_path())
    env.validate_env(e, scripts, check_accelerate=accelerate)
    return e


# --- ComfyUI folders -----------------------------------------------------------------------


def work_dir(*parts: str) -> Path:
    """``<ComfyUI output>/musubi/<parts>``, created."""
    import folder_paths

    p = Path(folder_paths.get_output_directory(), "musubi", *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def output_directory() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def default_lora_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / "musubi"


def default_model_dir() -> Path:
    """Where full fine-tunes go by default: ``models/diffusion_models/musubi`` (model loaders list it)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("diffusion_models")[0]) / "musubi"


def register_loras(folder: Path) -> None:
    """Make trained files show up in every LoRA loader."""
    import folder_paths

    known = [os.path.normcase(os.path.abspath(p)) for p in folder_paths.get_folder_paths("loras")]
    target = os.path.normcase(os.path.abspath(folder))
    if not any(target == k or target.startswith(k + os.sep) for k in known):
        folder_paths.add_model_folder_path("loras", str(folder))


def lora_path(name: str, input_name: str) -> str:
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


# --- output paths --------------------------------------------------------------------------


def output_file(value: str, input_name: str, suffix: str = ".safetensors") -> Path:
    """A ``.safetensors`` (or ``suffix``) output path: absolute as typed, or relative to ComfyUI's
    output folder (never resolved against the server's working folder, and never leaving the
    output folder through ``..``)."""
    text = env.native_path(value)
    if not text or Path(text).suffix != suffix:
        raise ValueError(f"{input_name}={value!r} must be a {suffix} file path, e.g. /path/to/output{suffix}")
    path = Path(text)
    if not path.is_absolute():
        if ".." in Path(value.strip()).parts or ".." in path.parts:
            raise ValueError(
                f"{input_name}={value!r}: a relative path is taken inside ComfyUI's output folder and may not "
                "contain '..'; give an absolute path to write elsewhere"
            )
        path = output_directory() / path
    return path


def output_folder(path: Path, input_name: str) -> Path:
    """Create the folder an output goes to; an error naming the input instead of an OSError traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"{input_name}: could not create the folder {str(path)!r} ({exc.strerror or exc}): pick a writable "
            "folder (a file of that name, or a missing drive, also stops it)"
        ) from exc
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (after ~, .. and case folding where the OS ignores case)."""

    def norm(p: str | os.PathLike) -> str:
        return os.path.normcase(os.path.abspath(env.native_path(p)))

    if norm(a) == norm(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def not_an_input(output: Path, output_name: str, inputs: dict[str, str]) -> None:
    """The script would overwrite (or read while writing) one of its own inputs: refuse before it runs."""
    for name, path in inputs.items():
        if path and same_file(output, path):
            raise ValueError(
                f"{output_name}: {str(output)!r} is the same file as {name}; the run would overwrite its own input: "
                "pick another output path"
            )


# --- change markers (fingerprint_inputs) ---------------------------------------------------


def mtime(path: str) -> str:
    """Path and modification time (or 'missing'): a cheap change marker for fingerprints."""
    p = env.native_path(path or "")
    if not p:
        return ""
    try:
        return f"{p}@{os.path.getmtime(p)}"
    except OSError:
        return f"{p}@missing"


def folder_signature(path: str) -> str:
    """Count and newest mtime of a folder's files: changes when files are added, removed or edited."""
    p = env.native_path(path or "")
    if not p or not os.path.isdir(p):
        return mtime(path)
    newest, count = 0.0, 0
    with os.scandir(p) as entries:
        for entry in entries:
            if entry.is_file():
                count += 1
                newest = max(newest, entry.stat().st_mtime)
    return f"{p}:{count}@{newest}"


def config_signature(config: dict) -> str:
    """Change marker of every dataset's files, carried in the dataset object so cache and
    training nodes downstream re-run when the data changes."""
    parts = []
    for d in config.get("datasets", []):
        for key in ("image_directory", "video_directory", "control_directory"):
            if d.get(key):
                parts.append(folder_signature(d[key]))
        for key in ("image_jsonl_file", "video_jsonl_file"):
            if d.get(key):
                parts.append(mtime(d[key]))
    return "|".join(parts)


def cache_dirs(dataset: dict) -> list[str]:
    """Where musubi writes this dataset's caches: a cancelled run's cut-short files there are set aside."""
    return [d for d in map(mdataset.effective_cache_dir, dataset["config"].get("datasets", [])) if d]
