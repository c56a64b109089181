"""The front-end extension: every web/js module parses, imports only ComfyUI's public scripts,
and registers one extension; every help page is named after a registered node id."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "web" / "js").glob("*.js"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_module_parses_and_registers_an_extension(path: Path):
    source = path.read_text()
    imports = re.findall(r"^import .* from [\"']([^\"']+)[\"'];?$", source, re.MULTILINE)
    assert imports and all(i.startswith("../../../scripts/") for i in imports), imports
    assert source.count("app.registerExtension(") == 1
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: syntax not checked")
    proc = subprocess.run([node, "--input-type=module", "--check"], input=source, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_pages_belong_to_declared_nodes():
    declared = set()
    for path in (REPO / "nodes").rglob("*.py"):
        declared.update(re.findall(r"node_id\s*=\s*[\"'](\w+)[\"']", path.read_text()))
    pages = {p.stem for p in (REPO / "web" / "docs").glob("*.md")}
    assert pages and pages <= declared, pages - declared
