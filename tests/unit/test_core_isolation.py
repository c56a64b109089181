"""The core/adapter rule: logic modules import without ComfyUI.

Every module of the logic subpackages (and the shared helpers) is imported in a fresh
interpreter in which ``comfy``, ``comfy_api``, ``folder_paths``, ``server``, ``nodes`` and
``execution`` cannot be imported, so a stray ComfyUI import in the core fails here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOGIC_PACKAGES = ("usdu", "fbcache", "upscale_cuda", "musubi", "lora_train")
SHARED_MODULES = ("torch_utils", "registry")


def logic_modules() -> list[str]:
    names = [f"speedkit.{m}" for m in SHARED_MODULES]
    for pkg in LOGIC_PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append("speedkit." + ".".join(parts))
    return names


def test_every_logic_module_imports_without_comfyui():
    modules = logic_modules()
    assert "speedkit.torch_utils" in modules and len(modules) >= len(LOGIC_PACKAGES) + 2
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys, types
        BLOCKED = {{"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                    "execution", "latent_preview", "node_helpers"}}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is ComfyUI: logic modules must not import it")
                return None

        sys.meta_path.insert(0, Block())
        pkg = types.ModuleType("speedkit")
        pkg.__path__ = [{str(REPO)!r}]
        sys.modules["speedkit"] = pkg
        failed = []
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
