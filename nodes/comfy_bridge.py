"""Small, lazily-imported bridges to ComfyUI internals shared by every adapter.

Each helper imports ComfyUI inside the function so importing the adapter modules only
needs ``comfy_api`` (present in every ComfyUI new enough to run the pack).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def to_intermediate(image: torch.Tensor) -> torch.Tensor:
    """Move an IMAGE to ComfyUI's intermediate device and dtype (CPU fp32 by default)."""
    import comfy.model_management as mm

    return image.to(device=mm.intermediate_device(), dtype=mm.intermediate_dtype())


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def progress_bar(total: int, node_id: str | None = None):
    """A ``comfy.utils.ProgressBar`` for ``total`` steps (its ``update`` may raise on cancel)."""
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)


def _prompt_server():
    """The running ``PromptServer``, or None (tests, the CLI, a server not started yet)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """Push a custom event to the browser; silently skipped without a server.

    A UI hiccup must never stop a run, so send errors are logged at debug level only.
    """
    server = _prompt_server()
    if server is None:
        return
    try:
        server.send_sync(event, data)
    except Exception as exc:  # noqa: BLE001
        logger.debug("UI event %s not sent: %s", event, exc)


def send_progress_text(text: str, node_id: str | None) -> None:
    """Show ``text`` under the node (ComfyUI's progress text); skipped without a server or node id."""
    server = _prompt_server()
    if server is None or not node_id:
        return
    try:
        server.send_progress_text(text, node_id)
    except Exception as exc:  # noqa: BLE001
        logger.debug("progress text not sent: %s", exc)
