"""Recognise a LoRA file and its key format from the safetensors header (no tensors loaded).

Besides plain LoRA (``lora_down/up``, or ``lora_A/B`` in the diffusers-style "other" layout)
musubi trains LoHa and LoKr (``--network_module networks.loha / networks.lokr``, and the
LyCORIS library's ``lycoris.kohya`` writes the same names): ``<module>.hada_w1_a ...`` and
``<module>.lokr_w1 ...``. What each musubi script can do with those files (v0.3.4, read from
its code and docs/loha_lokr.md) is encoded in the ``*_lycoris`` / ``check_*`` functions below.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER = 100 * 1024 * 1024

LORA_TENSORS = {
    "lora_down.weight": "default",
    "lora_up.weight": "default",
    "lora_A.weight": "other",
    "lora_B.weight": "other",
}
"""Plain-LoRA tensor names and the layout they belong to."""

LYCORIS_TENSORS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
"""LoHa / LoKr tensor names (musubi's networks.loha / networks.lokr and LyCORIS)."""

NOT_READ_BY_MUSUBI = ("hada_t1", "hada_t2", "lokr_w1_a", "lokr_w1_b", "lokr_t2", "dora_scale")
"""Tensors musubi's own LoHa/LoKr loader (lora_utils + networks/loha.py, lokr.py) skips: LyCORIS's
Tucker (CP) factors, a decomposed LoKr w1 and DoRA scales. Only the LyCORIS library applies them."""

BUILTIN_LYCORIS_GENERATE = ("wan", "framepack", "hunyuan_video_1_5", "flux_2", "qwen_image", "zimage")
"""Generate scripts that merge musubi-layout LoHa/LoKr at load time without ``--lycoris``
(docs/loha_lokr.md "built-in support"; HunyuanVideo and FLUX.1 Kontext need ``--lycoris``)."""


REDO_HINT = "save or download it again (an interrupted copy, download or training leaves such files), or pick another"


def _read_header(path: Path, name: str) -> dict:
    """The JSON header of a .safetensors file; ValueError naming ``name`` when the file is not whole.

    Checked: the 8-byte header size, the JSON table itself and that the file is as long as the
    last tensor's end offset says (a copy or save cut short passes the header but not this).
    """
    what = f"{name}: {str(path)!r}"
    size_on_disk = path.stat().st_size
    if size_on_disk == 0:
        raise ValueError(f"{what} is empty (0 bytes), not a .safetensors file: {REDO_HINT}")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{what} is not a .safetensors file (too short: {size_on_disk} bytes): {REDO_HINT}")
        (size,) = struct.unpack("<Q", raw)
        if size <= 0 or size > MAX_HEADER:
            raise ValueError(f"{what} is not a .safetensors file (bad header size {size}): {REDO_HINT}")
        if 8 + size > size_on_disk:
            raise ValueError(
                f"{what} is not a .safetensors file (truncated: its header needs {8 + size} bytes, the file has "
                f"{size_on_disk}): {REDO_HINT}"
            )
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ValueError(f"{what} is not a .safetensors file (unreadable header: {exc}): {REDO_HINT}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{what} is not a .safetensors file (its header is not a table): {REDO_HINT}")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{what} is not a .safetensors file (tensor {key!r} has no data_offsets): {REDO_HINT}")
        end = max(end, offsets[1])
    if 8 + size + end > size_on_disk:
        raise ValueError(
            f"{what} is truncated: its tensors need {8 + size + end} bytes, the file has {size_on_disk} "
            f"(cut short while it was written or copied): {REDO_HINT}"
        )
    return header


def read_safetensors_keys(path: str | os.PathLike, name: str = "LoRA file") -> tuple[list[str], dict]:
    """Tensor names and ``__metadata__`` of a .safetensors file, from its header only.

    ``name`` is the node input the path came from: every error starts with it. An empty,
    truncated or non-safetensors file is refused here, before musubi spends minutes loading a model.
    """
    p = Path(path)
    if not os.fspath(path) or not p.is_file():
        hint = "it is a folder; give the file inside" if p.is_dir() else "check the path"
        raise ValueError(f"{name}: {str(p)!r} does not exist as a file: {hint}")
    header = _read_header(p, name)
    meta = header.pop("__metadata__", {}) or {}
    return sorted(header), meta if isinstance(meta, dict) else {}


def safetensors_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole .safetensors file (header readable, every tensor's bytes present)."""
    try:
        _read_header(Path(path), "file")
    except (OSError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA-like file holds, from its tensor names."""

    name: str  # the node input it came from, for messages
    layout: str  # "default" (musubi/kohya: lora_unet_<module>.<tensor>) or "other" (<prefix>.<module>.<tensor>)
    kinds: frozenset[str]  # of "lora", "loha", "lokr"
    not_read_by_musubi: tuple[str, ...] = ()  # tensor names from NOT_READ_BY_MUSUBI present in the file

    @property
    def kind(self) -> str:
        """``lora``, ``loha``, ``lokr`` or ``mixed``."""
        return next(iter(self.kinds)) if len(self.kinds) == 1 else "mixed"

    @property
    def label(self) -> str:
        return {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}.get(self.kind, "mixed LoRA/LoHa/LoKr")

    @property
    def is_lycoris(self) -> bool:
        """LoHa / LoKr tensors are present (plain-LoRA loaders ignore them)."""
        return bool(self.kinds - {"lora"})

    @property
    def musubi_reads_all(self) -> bool:
        """musubi's own (non-``--lycoris``) LoHa/LoKr merge reads every tensor of this file."""
        return len(self.kinds) == 1 and not self.not_read_by_musubi


def _tensor_kind(key: str) -> tuple[str, str] | None:
    """(kind, layout) of one tensor name, or None for alpha, dora_scale and non-LoRA tensors."""
    for suffix, layout in LORA_TENSORS.items():
        if key.endswith("." + suffix):
            return "lora", layout
    module, _, tensor = key.rpartition(".")
    for kind, names in LYCORIS_TENSORS.items():
        if tensor in names:
            # musubi/kohya names the module lora_unet_<path with underscores>; the "other" layout keeps dots
            return kind, "default" if module.startswith("lora_") and "." not in module else "other"
    return None


def inspect_lora(keys: Sequence[str], name: str = "lora") -> LoraInfo:
    """Kinds and layout of a LoRA / LoHa / LoKr file; a ValueError naming ``name`` when it is none of them."""
    kinds: dict[str, int] = {}
    layouts = {"default": 0, "other": 0}
    for key in keys:
        found = _tensor_kind(key)
        if found:
            kinds[found[0]] = kinds.get(found[0], 0) + 1
            layouts[found[1]] += 1
    if not kinds:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise ValueError(
            f"{name} is not a LoRA: none of its {len(keys)} tensors are LoRA (lora_down/lora_up, lora_A/lora_B), "
            f"LoHa (hada_w1_a ...) or LoKr (lokr_w1 ...) weights (e.g. {sample}). Pick a LoRA .safetensors file, "
            "not a model checkpoint"
        )
    extra = tuple(sorted({k.rpartition(".")[2] for k in keys} & set(NOT_READ_BY_MUSUBI)))
    layout = "default" if layouts["default"] >= layouts["other"] else "other"
    return LoraInfo(name=name, layout=layout, kinds=frozenset(kinds), not_read_by_musubi=extra)


def detect_lora_format(keys: Sequence[str], name: str = "lora") -> str:
    """``"default"`` (musubi/kohya: ``lora_unet_*``) or ``"other"`` (diffusers style, e.g. ``lora_A/B``).

    Raises a ValueError when the keys are not a LoRA, LoHa or LoKr (e.g. a full checkpoint).
    """
    return inspect_lora(keys, name).layout


def _musubi_layout_only(infos: Sequence[LoraInfo], why: str) -> None:
    for info in infos:
        if info.is_lycoris and info.layout != "default":
            raise ValueError(
                f"{info.name} is a {info.label} in the diffusers-style 'other' layout ({why} reads LoHa/LoKr only "
                "in musubi's layout, lora_unet_<module>.hada_*/lokr_*): convert it with Musubi Convert LoRA "
                "(direction to_musubi) and use the converted file"
            )


READS_OTHER_LAYOUT = ("framepack",)
"""Architectures whose script converts diffusers-style ("other") LoRA keys itself
(fpack_generate_video.py's ``convert_lora_for_framepack``, used for generation and merging)."""


def require_musubi_layout(arch: str, infos: Sequence[LoraInfo], purpose: str) -> None:
    """Refuse "other"-layout files where musubi would silently apply nothing.

    musubi's LoRA network (and the LyCORIS library) find modules by musubi's ``lora_unet_*``
    names; only FramePack's script converts the diffusers-style layout first. Anywhere else a
    ``diffusion_model.<module>.lora_A/B`` file matches no module and the run "succeeds" without it.
    """
    if arch in READS_OTHER_LAYOUT:
        return
    for info in infos:
        if info.layout != "default":
            raise ValueError(
                f"{info.name} is a {info.label} in the diffusers-style 'other' layout (lora_A/lora_B under module "
                f"paths): musubi's {arch} {purpose} matches modules by its own names (lora_unet_*) and would apply "
                "nothing from it. Convert it with Musubi Convert LoRA (direction to_musubi) and use the converted file"
            )


def generate_lycoris(arch: str, infos: Sequence[LoraInfo]) -> bool:
    """Whether ``<arch>``'s generate script needs ``--lycoris`` (the LyCORIS library) for these files.

    Wan and FramePack merge musubi-layout LoHa/LoKr themselves; HunyuanVideo's plain path
    ignores their tensors, and files with tensors musubi's loader skips (Tucker factors, a
    decomposed LoKr w1, DoRA) need the library anywhere. ``--lycoris`` applies to every LoRA of
    the run, so all of them must then be in musubi's layout.
    """
    # LoHa/LoKr, and plain LoRAs with tensors musubi's plain loader skips (DoRA's dora_scale)
    lycoris = [i for i in infos if i.is_lycoris or i.not_read_by_musubi]
    if not lycoris:
        return False
    _musubi_layout_only(lycoris, "generation")
    if arch in BUILTIN_LYCORIS_GENERATE and all(i.musubi_reads_all for i in lycoris):
        return False
    _lycoris_needs_musubi_layout(infos)
    return True


def _lycoris_needs_musubi_layout(infos: Sequence[LoraInfo], why: str = "a LoHa/LoKr of this run needs") -> None:
    # the LyCORIS library finds modules by musubi's lora_unet_* names only: other keys would merge nothing
    for info in infos:
        if info.layout != "default":
            raise ValueError(
                f"{info.name} is in the diffusers-style 'other' layout, but {why} musubi's --lycoris path, which "
                "reads only musubi's layout (lora_unet_*) and would silently apply nothing: convert it with Musubi "
                "Convert LoRA (direction to_musubi) first"
            )


def merge_lycoris(arch: str, infos: Sequence[LoraInfo], always: bool) -> bool:
    """Whether Merge LoRA passes ``--lycoris`` for ``arch`` (``always``: the script saves only on that path).

    HunyuanVideo's ``merge_lora.py`` merges plain LoRA only (docs/loha_lokr.md), so a LoHa/LoKr
    there is an error; FLUX.1 Kontext's merge needs ``--lycoris`` for them.
    """
    lycoris = [i for i in infos if i.is_lycoris]
    if lycoris:
        _musubi_layout_only(lycoris, "merging")
    dora = [i for i in infos if not i.is_lycoris and i.not_read_by_musubi]
    if arch == "hunyuan_video":
        if dora:
            raise ValueError(
                f"{dora[0].name} has {', '.join(dora[0].not_read_by_musubi)} tensors (DoRA), which musubi's "
                "merge_lora.py (HunyuanVideo) ignores: the merged DiT would not match the LoRA. Use it unmerged in "
                "Musubi Generate Video (HunyuanVideo), which applies it through LyCORIS (--lycoris)"
            )
        if lycoris:
            raise ValueError(
                f"{lycoris[0].name} is a {lycoris[0].label}: musubi's merge_lora.py (HunyuanVideo) merges plain LoRA "
                "only (lora_down/lora_up). Use it unmerged in Musubi Generate Video (HunyuanVideo), which applies "
                "LoHa/LoKr through LyCORIS (--lycoris), or train a LoRA"
            )
        return False
    if dora and not lycoris:
        lycoris = dora  # the plain path would drop dora_scale; LyCORIS applies it
    if always or lycoris:
        why = "a LoHa/LoKr of this run needs" if lycoris else f"merging into a {arch} DiT saves only through"
        _lycoris_needs_musubi_layout(infos, why)
        return True
    return False


def check_convertible(info: LoraInfo) -> None:
    """convert_lora.py converts LoRA, LoHa and LoKr tensors; other tensors it drops or garbles."""
    if "dora_scale" in info.not_read_by_musubi:
        raise ValueError(
            f"{info.name} has DoRA tensors (dora_scale): musubi's convert_lora.py drops them (to_other) or writes "
            "broken names (to_musubi), so the converted file would not be the same model. Use the file as it is"
        )
    if info.kind == "mixed":
        raise ValueError(
            f"{info.name} mixes {', '.join(sorted(info.kinds))} modules: musubi's convert_lora.py handles files of "
            "one kind (LoRA, LoHa or LoKr). Use the file as it is"
        )


def check_same_tensors(checkpoints: Sequence[tuple[str, Sequence[str]]]) -> None:
    """lora_post_hoc_ema.py averages tensor by tensor: every checkpoint must hold the same names.

    It works for LoRA, LoHa and LoKr alike, but stops with a KeyError on a name the first
    file lacks (and silently keeps the first file's value for a name a later file lacks).
    """
    if not checkpoints:
        return
    first_name, first = checkpoints[0][0], set(checkpoints[0][1])
    for name, keys in checkpoints[1:]:
        diff = sorted(set(keys) ^ first)
        if diff:
            raise ValueError(
                f"{name} does not have the same tensors as {first_name} ({len(diff)} differ, e.g. {diff[0]}): "
                "post-hoc EMA averages checkpoints of one training run (same network type, dim and modules)"
            )


def inspect_files(paths: Mapping[str, str]) -> list[LoraInfo]:
    """:func:`inspect_lora` for each ``{input name: path}``."""
    return [inspect_lora(read_safetensors_keys(p, name)[0], name) for name, p in paths.items()]
