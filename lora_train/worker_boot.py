"""Main script of Train LoRA's worker process (``python worker_boot.py ...``); never imported.

It runs in a fresh interpreter of its own, not in ComfyUI's. It registers the pack's package
under the name it has in the host (ComfyUI names a custom-node package by its folder path), so
objects the host pickled resolve to the same modules, without running the pack's ``__init__``
(which registers ComfyUI nodes); puts the host's import paths first (ComfyUI's root, for the
``comfy`` modules of the UNet); then runs ``lora_train.worker.child_main``.

argv: package name, pack folder, JSON list of import paths, job folder.
"""

import importlib
import json
import sys
import types


def main() -> int:
    name, root, paths, job = sys.argv[1:5]
    sys.path[:0] = json.loads(paths)
    package = types.ModuleType(name)
    package.__path__ = [root]
    sys.modules[name] = package
    return importlib.import_module(name + ".lora_train.worker").child_main(job)


if __name__ == "__main__":
    sys.exit(main())
