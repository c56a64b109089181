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
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{6,})\.safetensors$")


def validate_output_name(name: str) -> str:
    """A file-name stem without path separators or parent references."""
    stripped = name.strip()
    if not stripped or stripped in (".", "..") or any(c in stripped for c in "/\\:") or "\x00" in stripped:
        raise ValueError(
            f"output_name={name!r} must be a plain file name (no '/', '\\\\', ':' or '..'); "
            f"the LoRA is written to ComfyUI's models/loras folder, e.g. output_name=my_style"
        )
    return stripped


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``; on any failure the old file is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OSError(
                exc.errno, f"disk full while saving {path}: the previous file is intact; free space and resume"
            ) from exc
        raise
    except BaseException:
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
    """Write the resumable state: fp32 LoRA tensors, optimizer tensors, and JSON ``info``."""
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
    payload = dict(info, optimizer_class=type(optimizer).__name__, optimizer_groups=groups, optimizer_scalars=scalars)
    tensor_path, json_path = state_paths(base)
    _atomic_write(tensor_path, lambda tmp: save_file(tensors, str(tmp)))
    _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=float)))
    return tensor_path, json_path


def load_state(base: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a state written by :func:`save_state`: ``(lora_tensors, optimizer_state_dict_parts, info)``.

    The optimizer parts are ``{"state": {...}, "param_groups": [...]}`` ready for ``load_state_dict``.
    """
    from safetensors.torch import load_file

    tensor_path, json_path = state_paths(base)
    if not tensor_path.is_file() or not json_path.is_file():
        raise ValueError(
            f"resume_from={str(base)!r}: expected {tensor_path.name} and {json_path.name} next to each other "
            f"(written by a previous run with save_every > 0 or on cancel)"
        )
    info = json.loads(json_path.read_text())
    tensors = load_file(str(tensor_path))
    lora = {k[len("lora/") :]: v for k, v in tensors.items() if k.startswith("lora/")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in info.get("optimizer_scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return lora, {"state": state, "param_groups": info["optimizer_groups"]}, info
