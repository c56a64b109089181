"""Every example workflow uses registered node types with widget values that fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_server import REPO_ROOT, widget_specs

pytestmark = pytest.mark.integration
# Combos listing model files depend on what the user (or an earlier test) installed, not on the workflow.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".gguf", ".sft", ".onnx")
WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))


def check_value(node_type: str, name: str, kind: str, opts: dict, value) -> str | None:
    where = f"{node_type}.{name}={value!r}"
    is_file_choice = isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES)
    if kind == "COMBO" and not (opts.get("image_upload") or is_file_choice) and value not in opts["options"]:
        return f"{where} not in {opts['options'][:10]}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{where} is not a number"
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"{where} outside [{opts.get('min')}, {opts.get('max')}]"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{where} is not a boolean"
    if kind == "STRING" and not isinstance(value, str):
        return f"{where} is not a string"
    return None


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_fits_the_running_comfyui(comfy_server, path: Path):
    info = comfy_server.object_info()
    problems = []
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] not in info:
            problems.append(f"node type {node['type']} is not registered")
            continue
        specs = widget_specs(info[node["type"]])
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some nodes save widgets by name
            values = [values.get(name) for name, _, _ in specs]
        if len(values) != len(specs):
            problems.append(f"{node['type']}: {len(values)} widget values for {len(specs)} widgets {specs}")
            continue
        for (name, kind, opts), value in zip(specs, values, strict=True):
            if kind != "EXTRA" and (msg := check_value(node["type"], name, kind, opts, value)):
                problems.append(msg)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
