"""On-disk cache of frozen text-encoder outputs (safetensors, one file per distinct caption text).

A cache entry holds the raw encoder outputs for one text: ``cond`` [1, 77*k, context_dim] and, for
families with a pooled output (SDXL), ``pooled`` [1, pooled_dim], in the dtype the encoder produced
them, so a hit is bit-identical to encoding again. The per-image SDXL size conditioning is not
cached (it is cheap and differs per image); only what depends on the text and the encoder.

An entry is valid only for the same text, the same encoder fingerprint (see
:func:`encoder_fingerprint`) and the same layout (family name and tensor widths). The file name is
a hash of all three, and the file's metadata repeats them: a file that cannot be read, or whose
metadata or shapes do not match, is ignored, logged and rewritten. Writes go to a temporary file
in the same folder first and are renamed into place, so a crash never leaves a half-written entry.
Nothing is pickled.

Plain PyTorch: the caller supplies ``encode_text(text) -> {"cond": ..., "pooled": ...}``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FORMAT = "speedkit-lora-te-cache/1"
TOKEN_CHUNK = 77


@dataclass(frozen=True)
class Layout:
    """What a valid entry looks like: ``cond`` [1, 77*k, context_dim]; ``pooled`` [1, pooled_dim]
    when ``pooled_dim`` > 0 (absent otherwise)."""

    family: str
    context_dim: int
    pooled_dim: int = 0

    def describe(self) -> str:
        return f"{self.family}|cond:{self.context_dim}|pooled:{self.pooled_dim}"

    def check(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """``None`` when ``tensors`` fit this layout, else what is wrong."""
        expected = {"cond"} | ({"pooled"} if self.pooled_dim else set())
        if set(tensors) != expected:
            return f"tensors {sorted(tensors)} instead of {sorted(expected)}"
        cond = tensors["cond"]
        if cond.ndim != 3 or cond.shape[0] != 1 or cond.shape[2] != self.context_dim or cond.shape[1] % TOKEN_CHUNK:
            return f"cond shape {list(cond.shape)} is not [1, 77*k, {self.context_dim}]"
        if self.pooled_dim and list(tensors["pooled"].shape) != [1, self.pooled_dim]:
            return f"pooled shape {list(tensors['pooled'].shape)} is not [1, {self.pooled_dim}]"
        return None


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]], samples: int = 4096) -> str:
    """A cheap fingerprint of named tensors: names, shapes, dtypes and up to ``samples`` evenly
    strided values of each (exact bytes). Any fine-tune changes sampled values; hashing every byte
    of a multi-GB encoder would cost seconds for no practical gain."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        try:
            flat = t.reshape(-1)
            if flat.numel() > samples:
                flat = flat[:: -(-flat.numel() // samples)]
            flat = flat.to("cpu").contiguous()
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        except (RuntimeError, TypeError, NotImplementedError):  # meta/quantized tensor subclasses
            h.update(b"<values unreadable>")  # shapes/dtypes still count; the probe output covers values
    return h.hexdigest()


def encoder_fingerprint(
    weights: Iterable[tuple[str, torch.Tensor]], probe: dict[str, torch.Tensor] | None = None, extra: str = ""
) -> str:
    """Fingerprint of a text encoder: a digest of its weights plus, optionally, of its output for a
    fixed probe text (which also covers what the weights alone miss: pending weight patches such as
    a LoRA applied to the CLIP, the clip-skip layer, the encoder's compute dtype) and ``extra``."""
    h = hashlib.sha256(tensor_digest(weights).encode())
    if probe is not None:
        h.update(tensor_digest(sorted(probe.items())).encode())
    h.update(extra.encode())
    return h.hexdigest()


class TextEncoderCache:
    """``get(text)`` returns the encoder outputs for ``text``: from ``folder`` when a valid entry is
    there, else from ``encode_text`` (then written to ``folder``). ``hits``/``misses`` count calls."""

    def __init__(
        self,
        folder: str | Path,
        encode_text: Callable[[str], dict[str, torch.Tensor]],
        fingerprint: str,
        layout: Layout,
    ) -> None:
        if not fingerprint:
            raise ValueError("TextEncoderCache needs a non-empty encoder fingerprint")
        self.folder = Path(folder)
        self.encode_text = encode_text
        self.fingerprint = fingerprint
        self.layout = layout
        self.hits = 0
        self.misses = 0

    def path_for(self, text: str) -> Path:
        key = f"{FORMAT}\n{self.layout.describe()}\n{self.fingerprint}\n{text}"
        return self.folder / f"te-{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"

    def _metadata(self, text: str) -> dict[str, str]:
        return {"format": FORMAT, "layout": self.layout.describe(), "fingerprint": self.fingerprint, "text": text}

    def _load(self, path: Path, text: str) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # unreadable/corrupt file of any kind: re-encode and rewrite
            logger.warning("LoRA text cache: ignoring unreadable %s (%s); re-encoding", path.name, exc)
            return None
        if meta != self._metadata(text):
            logger.warning("LoRA text cache: %s belongs to another text/encoder/layout; re-encoding", path.name)
            return None
        problem = self.layout.check(tensors)
        if problem is not None:
            logger.warning("LoRA text cache: %s has %s; re-encoding", path.name, problem)
            return None
        return tensors

    def _store(self, path: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), self._metadata(text)
            )
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk must not stop training: the cache is optional
            logger.warning("LoRA text cache: could not write %s (%s); continuing without it", path, exc)
            tmp.unlink(missing_ok=True)

    def get(self, text: str) -> dict[str, torch.Tensor]:
        path = self.path_for(text)
        if path.is_file():
            tensors = self._load(path, text)
            if tensors is not None:
                self.hits += 1
                return tensors
        self.misses += 1
        with torch.no_grad():
            tensors = {k: v.detach() for k, v in self.encode_text(text).items()}
        problem = self.layout.check(tensors)
        if problem is not None:
            raise ValueError(f"the text encoder returned {problem} for layout {self.layout.describe()}")
        self._store(path, text, tensors)
        return tensors
