"""Example workflows parse and refer only to node ids the pack declares.

Core ComfyUI node types and widget values are checked against a real server in
tests/integration/test_example_workflows_fit.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
OUR_PREFIXES = ("SpeedKit_", "MusubiTuner_")


def declared_node_ids() -> set[str]:
    ids = set()
    for path in (REPO / "nodes").rglob("*.py"):
        ids.update(re.findall(r"node_id\s*=\s*[\"']([\w]+)[\"']", path.read_text()))
    return ids


def test_there_are_example_workflows():
    assert WORKFLOWS, "example_workflows/ is empty"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_ui_format_with_known_pack_nodes(path):
    data = json.loads(path.read_text())
    assert isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list), "not a UI-format workflow"
    declared = declared_node_ids()
    node_ids = {n["id"] for n in data["nodes"]}
    for node in data["nodes"]:
        if node["type"].startswith(OUR_PREFIXES):
            assert node["type"] in declared, f"{path.name}: node type {node['type']} is not declared in nodes/"
    for link in data["links"]:
        _, src, _, dst, _, _ = link
        assert src in node_ids and dst in node_ids, f"{path.name}: link {link} points at a missing node"
    assert (path.with_suffix(".jpg")).is_file(), f"{path.name} needs a .jpg thumbnail for the template browser"
