"""Every MusubiTuner help page (web/docs/<node_id>.md) lists exactly its node's inputs.

The node schemas are read without ComfyUI: ``nodes/musubi/`` is imported against a small
stand-in for ``comfy_api.latest.io`` that only records what ``define_schema()`` declares
(input ids, order, optional / advanced flags, tooltips). The integration tier compares the
same schemas with what a real ComfyUI server reports.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
ITEM = re.compile(r"^- \*\*(\w+)\*\*(?: \(([^)]*)\))?: (.+)$")


class _Socket:
    """Stands in for io.String, io.Custom("X")...: records Input(...) / Output(...) calls."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def Input(self, id_: str, optional: bool = False, tooltip: str = "", advanced: bool = False, **kw):  # noqa: N802
        return SimpleNamespace(id=id_, optional=optional, tooltip=tooltip, advanced=advanced, kind=self.kind)

    def Output(self, display_name: str = "", tooltip: str = "", **kw):  # noqa: N802
        return SimpleNamespace(display_name=display_name, tooltip=tooltip)


def _fake_io() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest.io")
    for kind in ("String", "Int", "Float", "Boolean", "Combo", "Image"):
        setattr(io, kind, _Socket(kind))
    io.Custom = _Socket
    io.Schema = lambda **kw: SimpleNamespace(**{"inputs": [], "outputs": [], **kw})
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = lambda *a, **kw: (a, kw)
    io.Hidden = SimpleNamespace(unique_id="UNIQUE_ID")
    return io


@pytest.fixture(scope="module")
def schemas() -> dict[str, SimpleNamespace]:
    io = _fake_io()
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    fakes = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "comfy_api.latest.io": io}
    name = "speedkit.nodes.musubi"
    adapter = [k for k in sys.modules if k == name or k.startswith(name + ".")]
    saved = {k: sys.modules.get(k) for k in [*fakes, *adapter]}
    sys.modules.update(fakes)
    for key in adapter:
        sys.modules.pop(key)
    try:
        module = importlib.import_module(name)
        return {s.node_id: s for s in (cls.define_schema() for cls in module.NODES)}
    finally:
        # leave sys.modules as found: later tests must not see the stand-in
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            sys.modules.pop(key)  # the package and its submodules, imported against the stand-in
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def _page_items(path: Path, section: str) -> list[tuple[str, str, str]]:
    """(name, marker, text) of each ``- **name** (marker): text`` line under ``## <section>``."""
    items, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == section
            continue
        m = ITEM.match(line) if inside else None
        if m:
            items.append((m.group(1), m.group(2) or "", m.group(3)))
    return items


def _marker(inp: SimpleNamespace) -> str:
    return ", ".join(w for w, on in (("optional", inp.optional), ("advanced", inp.advanced)) if on)


def test_every_musubi_node_has_a_help_page(schemas):
    pages = {p.stem for p in DOCS.glob("MusubiTuner_*.md")}
    assert pages == set(schemas), (
        f"pages without node: {pages - set(schemas)}; nodes without page: {set(schemas) - pages}"
    )


@pytest.mark.parametrize("node_id", sorted(p.stem for p in DOCS.glob("MusubiTuner_*.md")))
def test_help_page_lists_exactly_the_node_inputs(schemas, node_id):
    schema = schemas[node_id]
    page = DOCS / f"{node_id}.md"
    listed = _page_items(page, "Inputs")
    declared = [(i.id, _marker(i)) for i in schema.inputs]
    assert [(n, m) for n, m, _ in listed] == declared, (
        f"{page.name}: '## Inputs' must list the node's inputs in schema order as "
        f"'- **id** (optional/advanced): ...'\n page: {[(n, m) for n, m, _ in listed]}\n node: {declared}"
    )
    outputs = [o.display_name for o in schema.outputs]
    assert [n for n, _, _ in _page_items(page, "Outputs")] == outputs, f"{page.name}: '## Outputs' != {outputs}"
    title = page.read_text(encoding="utf-8").splitlines()[0]
    assert title == f"# {schema.display_name}", f"{page.name}: first line must be '# {schema.display_name}'"


def test_every_musubi_input_has_a_tooltip(schemas):
    missing = [f"{node_id}.{i.id}" for node_id, s in schemas.items() for i in s.inputs if not i.tooltip]
    assert not missing, f"inputs without tooltip: {missing}"
