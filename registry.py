"""Collects the node classes of every adapter module into ComfyUI's mappings.

Kept apart from ``__init__`` so it can be unit-tested without ComfyUI: it only needs
``importlib`` and duck-typed node classes (anything with ``define_schema()``).

Rules:
- an adapter module that cannot be imported disables only its own nodes, with one
  WARNING naming the module and the reason;
- a node whose optional dependency (class attribute ``REQUIRES``, module names) is
  missing is skipped with one WARNING naming the node and the package to install;
- two nodes with the same id is a programming error and raises at import, so it is
  caught by the tests instead of silently shadowing a node in users' workflows.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

ID_PREFIXES: tuple[str, ...] = ("SpeedKit_", "MusubiTuner_")

MIN_COMFYUI = "0.19.3"
"""Oldest ComfyUI the pack is tested with (it needs ``comfy_api.latest``)."""


def missing_modules(names: Iterable[str]) -> list[str]:
    """The module names in ``names`` that cannot be found on this Python."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def declared_node_ids(module_name: str) -> list[str]:
    """Node ids written in an adapter module's source (``node_id="..."``), without importing it.

    Used to name the nodes a broken module takes down with it.
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    # an adapter package (nodes/musubi/) declares its nodes in its submodules
    files = sorted(Path(spec.origin).parent.rglob("*.py")) if spec.submodule_search_locations else [Path(spec.origin)]
    try:
        source = "\n".join(f.read_text(encoding="utf-8") for f in files)
    except OSError:
        return []
    return re.findall(r"node_id\s*=\s*[\"']([A-Za-z0-9_]+)[\"']", source)


def collect_nodes(package: str, module_names: Iterable[str]) -> tuple[dict[str, type], dict[str, str]]:
    """Import ``<package>.nodes.<name>`` for each name and merge their ``NODES`` lists.

    Returns ``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` keyed by schema node id.
    """
    classes: dict[str, type] = {}
    display: dict[str, str] = {}
    for name in module_names:
        module_name = f"{package}.nodes.{name}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            lost = declared_node_ids(module_name)
            logger.warning(
                "ComfyUI-SpeedKit: the %s nodes (%s) are disabled: %s",
                name,
                ", ".join(lost) or "none declared",
                exc,
            )
            continue
        for node_cls in getattr(module, "NODES", []):
            schema = node_cls.define_schema()
            node_id = schema.node_id
            if not node_id.startswith(ID_PREFIXES):
                raise ValueError(f"node id {node_id!r} must start with one of {ID_PREFIXES}")
            if node_id in classes:
                raise ValueError(f"duplicate node id {node_id!r} in nodes/{name}.py and another adapter module")
            missing = missing_modules(getattr(node_cls, "REQUIRES", ()))
            if missing:
                logger.warning(
                    "ComfyUI-SpeedKit: node %s is disabled: missing optional package(s) %s "
                    "(install with: pip install %s)",
                    node_id,
                    ", ".join(missing),
                    " ".join(missing),
                )
                continue
            classes[node_id] = node_cls
            display[node_id] = schema.display_name or node_id
    return classes, display
