"""Print every SpeedKit node's declared inputs as JSON, using ComfyUI's own ``comfy_api``.

Run with the ComfyUI checkout as the working directory (``COMFYUI_ROOT``); the
integration test compares this with what the running server reports in /object_info.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    sys.path.insert(0, str(Path.cwd()))
    # Same device setup as the test server (--cpu): model_management must not probe CUDA.
    from comfy.cli_args import args

    args.cpu = True
    spec = importlib.util.spec_from_file_location(
        "speedkit_schema_probe", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = {}
    for node_id, cls in module.NODE_CLASS_MAPPINGS.items():
        schema = cls.define_schema()
        result[node_id] = {
            "inputs": [i.id for i in schema.inputs],
            "outputs": len(schema.outputs),
            "category": schema.category,
            "tooltips": {i.id: bool(i.tooltip) for i in schema.inputs},
        }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
