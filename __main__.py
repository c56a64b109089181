"""Command line of the pack: ``python -m <pack folder> upscale INPUT... -o OUTDIR``.

Run it from the folder that contains the pack (e.g. ``ComfyUI/custom_nodes``); see
``python -m ComfyUI-SpeedKit upscale --help``. The pack's ``__init__`` registers no nodes
outside ComfyUI, so this works without ComfyUI installed (torch, spandrel, pillow needed).
"""

from __future__ import annotations

import sys

from .upscale_cuda.cli import main

if __name__ == "__main__":
    sys.exit(main())
