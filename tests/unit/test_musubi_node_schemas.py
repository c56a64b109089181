"""The MusubiTuner node ids, inputs and outputs are frozen: saved workflows depend on them.

A workflow stores widget values by position and API prompts name inputs, so an id, an input's
name, order, type, default or range, or an output, must not change by accident (the Train LoRA
and Generate Video nodes are built from the table in ``musubi/arch.py``, where a reordered row
would silently move a widget). ``musubi_node_schemas.json`` next to this file is the frozen
copy; tooltips and descriptions are left out (their wording may change). After an intended
change (new inputs go last and are optional), rewrite it with
``SPEEDKIT_UPDATE_SCHEMAS=1 pytest tests/unit/test_musubi_node_schemas.py`` and review the diff.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

SNAPSHOT = Path(__file__).with_name("musubi_node_schemas.json")
ADAPTER = "speedkit.nodes.musubi"
PINNED = ("default", "min", "max", "step", "options", "multiline", "optional", "advanced", "control_after_generate")
"""The input properties a saved workflow's values depend on (``control_after_generate`` adds a widget value)."""


class _Socket:
    """Stands in for io.String, io.Custom("X")...: records each Input(...) / Output(...) call."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def Input(self, id_: str, **kw):  # noqa: N802 - ComfyUI's name
        return SimpleNamespace(id=id_, kind=self.kind, **kw)

    def Output(self, **kw):  # noqa: N802
        return SimpleNamespace(kind=self.kind, **kw)


def _fake_io() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest.io")
    for kind in ("String", "Int", "Float", "Boolean", "Combo", "Image"):
        setattr(io, kind, _Socket(kind.upper()))
    io.Custom = _Socket
    io.Schema = lambda **kw: SimpleNamespace(**{"inputs": [], "outputs": [], **kw})
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = lambda *a, **kw: (a, kw)
    io.Hidden = SimpleNamespace(unique_id="UNIQUE_ID")
    return io


def _frozen(schema: SimpleNamespace, cls: type) -> dict:
    """What a saved workflow depends on, in declaration order."""
    inputs = []
    for i in schema.inputs:
        props = {k: getattr(i, k) for k in PINNED if getattr(i, k, None) not in (None, False)}
        inputs.append({"name": i.id, "type": i.kind, **props})
    outputs = [
        {"name": o.display_name, "type": o.kind, **({"list": True} if getattr(o, "is_output_list", False) else {})}
        for o in schema.outputs
    ]
    return {
        "class": cls.__name__,
        "display_name": schema.display_name,
        "category": schema.category,
        "output_node": bool(getattr(schema, "is_output_node", False)),
        "inputs": inputs,
        "outputs": outputs,
    }


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    io = _fake_io()
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    fakes = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "comfy_api.latest.io": io}
    adapter = [k for k in sys.modules if k == ADAPTER or k.startswith(ADAPTER + ".")]
    saved = {k: sys.modules.get(k) for k in [*fakes, *adapter]}
    sys.modules.update(fakes)
    for key in adapter:
        sys.modules.pop(key)
    try:
        module = importlib.import_module(ADAPTER)
        return {s.node_id: _frozen(s, cls) for cls in module.NODES for s in [cls.define_schema()]}
    finally:
        # leave sys.modules as found: later tests must not see the stand-in
        for key in [k for k in sys.modules if k == ADAPTER or k.startswith(ADAPTER + ".")]:
            sys.modules.pop(key)
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def _dump(data: dict) -> str:
    """One line per input, so a diff shows exactly which input changed."""
    lines = ["{"]
    for n, (node_id, node) in enumerate(data.items()):
        head = {k: v for k, v in node.items() if k not in ("inputs", "outputs")}
        lines.append(f"  {json.dumps(node_id)}: {{")
        lines += [f"    {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        lines.append('    "inputs": [')
        lines += [
            f"      {json.dumps(i)}{',' if j < len(node['inputs']) - 1 else ''}" for j, i in enumerate(node["inputs"])
        ]
        lines.append("    ],")
        lines.append(f'    "outputs": {json.dumps(node["outputs"])}')
        lines.append("  }" + ("," if n < len(data) - 1 else ""))
    return "\n".join([*lines, "}"]) + "\n"


def test_snapshot_exists(schemas):
    if os.environ.get("SPEEDKIT_UPDATE_SCHEMAS") == "1":
        SNAPSHOT.write_text(_dump(schemas), encoding="utf-8")
    assert SNAPSHOT.is_file(), f"{SNAPSHOT.name} is missing: run with SPEEDKIT_UPDATE_SCHEMAS=1 once"


def test_node_ids_are_frozen(schemas):
    frozen = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert list(schemas) == list(frozen), (
        f"node ids changed: new {sorted(set(schemas) - set(frozen))}, gone {sorted(set(frozen) - set(schemas))}"
    )


@pytest.mark.parametrize(
    "node_id", sorted(json.loads(SNAPSHOT.read_text(encoding="utf-8"))) if SNAPSHOT.is_file() else []
)
def test_inputs_and_outputs_are_frozen(schemas, node_id):
    frozen = json.loads(SNAPSHOT.read_text(encoding="utf-8"))[node_id]
    now = schemas[node_id]
    names = [i["name"] for i in now["inputs"]]
    assert names == [i["name"] for i in frozen["inputs"]], f"{node_id}: input names or order changed: {names}"
    for old, new in zip(frozen["inputs"], now["inputs"], strict=True):
        assert new == old, f"{node_id}.{old['name']} changed: {old} -> {new}"
    assert {k: v for k, v in now.items() if k != "inputs"} == {k: v for k, v in frozen.items() if k != "inputs"}
