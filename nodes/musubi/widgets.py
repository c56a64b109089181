"""Input declarations shared by the MusubiTuner nodes: socket types, one-line widget helpers
and the conversion of an architecture table row (:class:`musubi.arch.NodeInput`) into a widget.

Each helper keeps a node's input list readable as one line per input: name, tooltip, then the
default and range.
"""

from __future__ import annotations

import math

from comfy_api.latest import io

from ...musubi import configs
from ...musubi.arch import NodeInput

MusubiEnvT = io.Custom("MUSUBI_ENV")
DatasetT = io.Custom("MUSUBI_DATASET")
TrainingT = io.Custom("MUSUBI_TRAINING_CONFIG")
OptimizerT = io.Custom("MUSUBI_OPTIMIZER_CONFIG")
SamplingT = io.Custom("MUSUBI_SAMPLING_CONFIG")
MemoryT = io.Custom("MUSUBI_MEMORY_CONFIG")


def string(id_: str, tip: str, default: str = "", **kw):
    return io.String.Input(id_, default=default, tooltip=tip, **kw)


def integer(id_: str, tip: str, default: int, lo: int = 0, hi: int = 1 << 20, **kw):
    return io.Int.Input(id_, default=default, min=lo, max=hi, tooltip=tip, **kw)


def number(id_: str, tip: str, default: float, lo: float = 0.0, hi: float = 1e6, step: float = 0.01, **kw):
    return io.Float.Input(id_, default=default, min=lo, max=hi, step=step, tooltip=tip, **kw)


def boolean(id_: str, tip: str, default: bool = False, **kw):
    return io.Boolean.Input(id_, default=default, tooltip=tip, **kw)


def choice(id_: str, tip: str, options, default: str | None = None, **kw):
    return io.Combo.Input(id_, options=list(options), default=default or options[0], tooltip=tip, **kw)


def env_input():
    return MusubiEnvT.Input(
        "musubi_env",
        optional=True,
        tooltip="From MusubiTuner Environment. Unplugged: the settings file <ComfyUI user dir>/speedkit/musubi.toml "
        "(or SPEEDKIT_MUSUBI_CONFIG) and the MUSUBI_TUNER_ROOT / MUSUBI_TUNER_PYTHON variables are used.",
    )


def extra_args_input():
    return string(
        "extra_args",
        "Expert: more flags for the musubi script, e.g. --flash3 --compile. Split like a shell would, never run by one.",
        advanced=True,
    )


def from_table(row: NodeInput):
    """The widget for one architecture-specific input of the table in ``musubi/arch.py``."""
    extra = {"advanced": True} if row.advanced else {}
    if row.kind == "path":
        return string(row.name, row.tooltip, **extra)
    if row.kind == "bool":
        return boolean(row.name, row.tooltip, bool(row.default), **extra)
    if row.kind == "int":
        return integer(row.name, row.tooltip, int(row.default), int(row.low), int(row.high), **extra)
    if row.kind == "float":
        return number(row.name, row.tooltip, float(row.default), row.low, row.high, **extra)
    if row.kind == "choice":
        return choice(row.name, row.tooltip, row.choices, str(row.default), **extra)
    raise ValueError(f"musubi/arch.py: input {row.name!r} has the unknown kind {row.kind!r}")


def check_finite(node_cls, **values) -> None:
    """Refuse NaN/Inf in float inputs, suggesting the input's default.

    ComfyUI checks min/max by comparing, and every comparison with NaN is false, so NaN (and
    Inf where max is large) reaches the node.
    """
    floats = {k: v for k, v in values.items() if isinstance(v, float)}
    if all(math.isfinite(v) for v in floats.values()):
        return
    defaults = {
        i.id: i.default for i in node_cls.define_schema().inputs if isinstance(getattr(i, "default", None), float)
    }
    configs.check_finite(floats, defaults)
