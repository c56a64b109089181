"""Writing LoRA files (kohya format) and resumable training state, atomically.

LoRA file: safetensors with only ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and
``<name>.alpha`` tensors, plus ``ss_*`` (sd-scripts) and ``modelspec.*`` (SAI model spec)
string metadata. Training state: a safetensors file (fp32 LoRA weights + optimizer tensors) and
a JSON file (step, optimizer hyper-parameters, grad-scaler, loss history). No pickle anywhere.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..torch_utils import check_file_name

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
LORA_SUFFIX = ".safetensors"
STATE_FORMAT = "speedkit-lora-train-state/1"
STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{6,})\.safetensors$")


def validate_output_name(name: str) -> str:
    """A file-name stem without path separators or parent references.

    A trailing ``.safetensors`` is dropped (logged): the extension is added when saving, and
    keeping it would write ``name.safetensors.safetensors``.
    """
    stripped = check_file_name(name, "output_name", "my_style")
    stem = stripped
    while stem.lower().endswith(LORA_SUFFIX):
        stem = stem[: -len(LORA_SUFFIX)].strip()
    check_file_name(stem, "output_name", "my_style")
    if stem != stripped:
        logger.info("output_name: %r ends in %s; saving as %s%s", name, LORA_SUFFIX, stem, LORA_SUFFIX)
    return stem


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``; on any failure the old file is untouched."""
    _atomic_write_all([(path, write)])


def _atomic_write_all(files: list[tuple[Path, Callable[[Path], object]]]) -> None:
    """Write every file under a temporary name first and rename them only when all are on disk.

    A failed or interrupted write leaves every previous file as it was; a crash can only fall
    between the final renames (microseconds), which :func:`read_state_info` detects for states.
    """
    written: list[tuple[Path, Path]] = []
    current = files[0][0]
    try:
        for path, write in files:
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            written.append((path, tmp))
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for path, tmp in written:
            current = path
            os.replace(tmp, path)
    except OSError as exc:
        for _, tmp in written:
            tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OSError(
                exc.errno, f"disk full while saving {current}: the previous file is intact; free space and resume"
            ) from exc
        raise
    except BaseException:
        for _, tmp in written:
            tmp.unlink(missing_ok=True)
        raise


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya-format LoRA (``tensors`` already in the save dtype) atomically."""
    from safetensors.torch import save_file

    bad = [k for k in tensors if not re.search(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", k)]
    if bad:
        raise ValueError(f"not a kohya LoRA key: {bad[0]}")
    meta = {k: str(v) for k, v in metadata.items()}
    path = Path(path)
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def step_path(folder: Path, name: str, step: int) -> Path:
    return folder / f"{name}-step{step:06d}.safetensors"


def prune_step_files(folder: Path, name: str, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``<name>-stepNNNNNN.safetensors`` files (0 keeps all)."""
    if keep_last <= 0:
        return []
    found = []
    for p in folder.glob(f"{glob_escape(name)}-step*.safetensors"):
        m = STEP_FILE.match(p.name)
        if m and m.group("name") == name:
            found.append((int(m.group("step")), p))
    removed = []
    for _, p in sorted(found)[:-keep_last]:
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def state_paths(base: str | Path) -> tuple[Path, Path]:
    """(tensor file, json file) of a training state; ``base`` may end in either suffix or neither."""
    p = Path(base)
    name = p.name
    for suffix in ("-state.json", "-state.safetensors", ".json", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith("-state"):
        name = name[: -len("-state")]
    return p.with_name(f"{name}-state.safetensors"), p.with_name(f"{name}-state.json")


def save_state(
    base: str | Path,
    lora_tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
) -> tuple[Path, Path]:
    """Write the resumable state: fp32 LoRA tensors, optimizer tensors, and JSON ``info``.

    Both files carry the same ``save_id``, so a pair mixed from two saves is recognised on resume.
    """
    from safetensors.torch import save_file

    tensors = {f"lora/{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_tensors.items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt/{index}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    save_id = uuid.uuid4().hex
    payload = dict(info, optimizer_class=type(optimizer).__name__, optimizer_groups=groups, optimizer_scalars=scalars)
    payload["save_id"] = save_id
    meta = {"format": STATE_FORMAT, "save_id": save_id, "step": str(info.get("step", ""))}
    tensor_path, json_path = state_paths(base)
    # the JSON is renamed last: it is what a resume reads first
    _atomic_write_all(
        [
            (tensor_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta)),
            (json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=float))),
        ]
    )
    return tensor_path, json_path


def _damaged(path: Path, detail: str) -> ValueError:
    """The error for a state file that exists but cannot be used (nothing has been written yet)."""
    return ValueError(
        f"resume_from: the saved training state {path} is damaged ({detail}); no file was changed. "
        f"Point resume_from at an intact <name>-state.json, or clear resume_from to start a new run"
    )


def read_state_info(base: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """Check a saved state without reading its tensor data: ``(tensor file, json file, info)``.

    Cheap enough to run before any model or image work, so a missing, truncated, zero-byte or
    garbage state (or a pair from two different saves) fails at once with a ``ValueError``
    naming ``resume_from``, the file and the fix, instead of a raw ``JSONDecodeError`` or
    ``SafetensorError`` after minutes of encoding.
    """
    from safetensors import safe_open

    tensor_path, json_path = state_paths(base)
    missing = [p.name for p in (tensor_path, json_path) if not p.is_file()]
    if missing:
        raise ValueError(
            f"resume_from: {str(base)!r} has no saved training state: {' and '.join(missing)} not found in "
            f"{json_path.parent} (a run writes {tensor_path.name} and {json_path.name} side by side when "
            f"save_every > 0 or on cancel). Check the path or output_name, or clear resume_from to start a new run"
        )
    raw = json_path.read_bytes()
    if not raw.strip():
        raise _damaged(json_path, f"empty file, {len(raw)} bytes")
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(json_path, f"not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise _damaged(json_path, f"holds a JSON {type(info).__name__}, not a training state")
    step = info.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _damaged(json_path, f"step is {step!r}, not a step count")
    groups = info.get("optimizer_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise _damaged(json_path, "no optimizer parameter groups")
    for key, kind in (("config", dict), ("losses", list), ("optimizer_scalars", dict)):
        if key in info and not isinstance(info[key], kind):
            raise _damaged(json_path, f"{key} is a {type(info[key]).__name__}, expected a {kind.__name__}")
    numbers = [*info.get("losses", []), *([info["grad_scale"]] if info.get("grad_scale") is not None else [])]
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in numbers):
        raise _damaged(json_path, "losses or grad_scale hold non-numbers")
    try:
        with safe_open(str(tensor_path), "pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
    except Exception as exc:  # SafetensorError (header too large/small, incomplete) or OSError
        raise _damaged(tensor_path, f"not a readable safetensors file: {exc}") from exc
    if not any(k.startswith("lora/") for k in keys):
        raise _damaged(tensor_path, "it holds no LoRA tensors")
    if "save_id" in meta and "save_id" in info and meta["save_id"] != info["save_id"]:
        raise _damaged(
            json_path,
            f"{tensor_path.name} (step {meta.get('step', '?')}) and {json_path.name} (step {step}) come from two "
            f"different saves; a save was interrupted between them",
        )
    return tensor_path, json_path, info


def load_state(base: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a state written by :func:`save_state`: ``(lora_tensors, optimizer_state_dict_parts, info)``.

    The optimizer parts are ``{"state": {...}, "param_groups": [...]}`` ready for ``load_state_dict``.
    Every unusable file is a ``ValueError`` naming ``resume_from`` and the file (see :func:`read_state_info`).
    """
    from safetensors.torch import load_file

    tensor_path, json_path, info = read_state_info(base)
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # the header was fine but the data is not (changed since the check)
        raise _damaged(tensor_path, f"not a readable safetensors file: {exc}") from exc
    lora = {k[len("lora/") :]: v for k, v in tensors.items() if k.startswith("lora/")}
    bad = next((k for k, v in lora.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise _damaged(tensor_path, f"{bad} holds NaN/Inf values: the saved run had diverged")
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("opt/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in info.get("optimizer_scalars", {}).items():
            state.setdefault(int(index), {}).update(values)
    except (ValueError, TypeError, AttributeError) as exc:
        raise _damaged(tensor_path, f"malformed optimizer entries: {exc}") from exc
    return lora, {"state": state, "param_groups": info["optimizer_groups"]}, info
