"""Real ComfyUI v0.19.3 loads the pack cleanly and runs its nodes through the HTTP API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import PACK_DIR_NAME, REPO_ROOT

pytestmark = pytest.mark.integration


def declared_schemas(comfy_root: Path) -> dict:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run(
        [python, str(Path(__file__).with_name("dump_schemas.py"))],
        cwd=comfy_root,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout)


def test_every_node_registered_with_declared_inputs(comfy_server):
    declared = declared_schemas(comfy_server.root)
    assert "SpeedKit_ImageRangeNormalize" in declared
    info = comfy_server.pack_nodes(comfy_server.object_info())
    assert set(info) == set(declared), "nodes the server lists differ from the nodes the pack declares"
    for node_id, schema in declared.items():
        entry = info[node_id]
        server_inputs = list(entry["input"].get("required", {})) + list(entry["input"].get("optional", {}))
        assert sorted(server_inputs) == sorted(schema["inputs"]), node_id
        assert entry["category"].startswith(("SpeedKit/", "MusubiTuner/")), node_id
        assert all(schema["tooltips"].values()), f"{node_id}: every input needs a tooltip"


def test_log_has_no_error_or_warning_from_the_pack(comfy_server):
    comfy_server.object_info()  # the server has finished loading custom nodes
    log = comfy_server.log_text()
    assert "IMPORT FAILED" not in log or PACK_DIR_NAME not in log.split("IMPORT FAILED")[1][:500]
    pack_lines = [
        line for line in log.splitlines() if re.search(r"speedkit|" + re.escape(str(REPO_ROOT)), line, re.IGNORECASE)
    ]
    bad = [line for line in pack_lines if re.search(r"warning|error|traceback|exception", line, re.IGNORECASE)]
    assert not bad, "\n".join(bad)
    # A traceback anywhere in the log that passes through the pack's files.
    assert str(REPO_ROOT) not in "".join(log.split("Traceback")[1:]), log[-4000:]


def test_normalize_node_through_the_api(comfy_server):
    rng = np.random.default_rng(0)
    pixels = rng.integers(40, 200, size=(48, 64, 3), dtype=np.uint8)  # a washed-out range
    Image.fromarray(pixels).save(comfy_server.input_dir / "speedkit_lowcontrast.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "speedkit_lowcontrast.png"}},
        "2": {
            "class_type": "SpeedKit_ImageRangeNormalize",
            "inputs": {"image": ["1", 0], "mode": "minmax", "low_percentile": 0.5, "high_percentile": 99.5},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "speedkit_norm"}},
    }
    entry = comfy_server.run_prompt(prompt)
    saved = entry["outputs"]["3"]["images"][0]
    result = np.asarray(Image.open(comfy_server.output_dir / saved["subfolder"] / saved["filename"]))
    lo, hi = pixels.min(), pixels.max()
    expected = np.clip(np.round((pixels.astype(np.float64) - lo) / (hi - lo) * 255.0), 0, 255)
    assert result.min() == 0 and result.max() == 255
    assert np.abs(result.astype(np.int32) - expected.astype(np.int32)).max() <= 1
