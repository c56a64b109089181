"""ComfyUI adapters: one module per capability, each exposing ``NODES``.

These are the only modules that import ComfyUI (``comfy_api`` at module level, ``comfy``
and friends lazily inside ``execute``). Logic lives in the sibling subpackages.
"""
