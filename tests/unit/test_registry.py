"""Node registration: duplicate ids, missing optional dependencies, broken adapters."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from speedkit import registry

REPO = Path(__file__).resolve().parents[2]


def make_pack(tmp_path: Path, name: str, modules: dict[str, str]) -> str:
    pkg = tmp_path / name
    (pkg / "nodes").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nodes" / "__init__.py").write_text("")
    for mod, body in modules.items():
        (pkg / "nodes" / f"{mod}.py").write_text(textwrap.dedent(body))
    sys.path.insert(0, str(tmp_path))
    return name


NODE_TEMPLATE = """
from types import SimpleNamespace

class Node{n}:
    REQUIRES = {requires!r}

    @classmethod
    def define_schema(cls):
        return SimpleNamespace(node_id={node_id!r}, display_name="Node {n}")

NODES = [Node{n}]
"""


@pytest.fixture
def fake_pack(tmp_path, monkeypatch):
    created = []

    def _make(modules: dict[str, str]) -> str:
        name = f"fakepack_{len(created)}_{tmp_path.name.replace('-', '_')}"
        created.append(name)
        return make_pack(tmp_path, name, modules)

    yield _make
    for name in created:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    sys.path.remove(str(tmp_path)) if str(tmp_path) in sys.path else None


def test_collects_ids_and_display_names(fake_pack):
    pkg = fake_pack({"a": NODE_TEMPLATE.format(n=1, node_id="SpeedKit_A", requires=())})
    classes, names = registry.collect_nodes(pkg, ["a"])
    assert list(classes) == ["SpeedKit_A"] and names == {"SpeedKit_A": "Node 1"}


def test_duplicate_ids_raise(fake_pack):
    pkg = fake_pack(
        {
            "a": NODE_TEMPLATE.format(n=1, node_id="SpeedKit_A", requires=()),
            "b": NODE_TEMPLATE.format(n=2, node_id="SpeedKit_A", requires=()),
        }
    )
    with pytest.raises(ValueError, match="duplicate node id 'SpeedKit_A'"):
        registry.collect_nodes(pkg, ["a", "b"])


def test_unprefixed_id_raises(fake_pack):
    pkg = fake_pack({"a": NODE_TEMPLATE.format(n=1, node_id="Upscale", requires=())})
    with pytest.raises(ValueError, match="must start with"):
        registry.collect_nodes(pkg, ["a"])


def test_missing_optional_dependency_skips_only_that_node(fake_pack, caplog):
    pkg = fake_pack(
        {
            "a": NODE_TEMPLATE.format(n=1, node_id="SpeedKit_A", requires=("no_such_package_xyz",)),
            "b": NODE_TEMPLATE.format(n=2, node_id="SpeedKit_B", requires=("json",)),
        }
    )
    with caplog.at_level(logging.WARNING):
        classes, _ = registry.collect_nodes(pkg, ["a", "b"])
    assert list(classes) == ["SpeedKit_B"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SpeedKit_A" in warnings[0] and "pip install no_such_package_xyz" in warnings[0]


def test_broken_adapter_module_disables_only_itself(fake_pack, caplog):
    pkg = fake_pack(
        {
            "a": "import no_such_package_xyz\n" + NODE_TEMPLATE.format(n=1, node_id="SpeedKit_Lost", requires=()),
            "b": NODE_TEMPLATE.format(n=2, node_id="SpeedKit_B", requires=()),
        }
    )
    with caplog.at_level(logging.WARNING):
        classes, _ = registry.collect_nodes(pkg, ["a", "b"])
    assert list(classes) == ["SpeedKit_B"]
    assert any(
        "the a nodes (SpeedKit_Lost) are disabled" in r.getMessage() and "no_such_package_xyz" in r.getMessage()
        for r in caplog.records
    )


def run_pack_import(tmp_path: Path, fake_comfy: bool) -> subprocess.CompletedProcess:
    """Import the real package in a fresh Python, optionally next to an old ComfyUI (no comfy_api)."""
    if fake_comfy:
        (tmp_path / "comfy").mkdir()
        (tmp_path / "comfy" / "__init__.py").write_text("")
    script = textwrap.dedent(
        f"""
        import importlib.util, logging, sys
        sys.path.insert(0, {str(tmp_path)!r})
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        spec = importlib.util.spec_from_file_location(
            "speedkit_no_comfy", {str(REPO / "__init__.py")!r}, submodule_search_locations=[{str(REPO)!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        assert mod.NODE_CLASS_MAPPINGS == {{}} and mod.WEB_DIRECTORY == "./web"
        """
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_pack_import_on_old_comfyui_logs_the_needed_version(tmp_path):
    """A ComfyUI without comfy_api: no crash, one warning naming the version needed."""
    proc = run_pack_import(tmp_path, fake_comfy=True)
    assert proc.returncode == 0, proc.stderr
    assert "needs ComfyUI 0.19.3 or newer" in proc.stderr
    assert proc.stdout == ""  # nothing printed at import


def test_pack_import_outside_comfyui_is_silent(tmp_path):
    """Outside ComfyUI (e.g. the command-line tools) importing the pack logs nothing."""
    proc = run_pack_import(tmp_path, fake_comfy=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "WARNING" not in proc.stderr
