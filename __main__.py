"""Command line of the pack: ``python -m <pack folder> upscale INPUT... -o OUTDIR``.

Run it from the folder that contains the pack (e.g. ``ComfyUI/custom_nodes``); see
``python -m ComfyUI-SpeedKit upscale --help``. The pack's ``__init__`` registers no nodes
outside ComfyUI, so this works without ComfyUI installed (torch, spandrel, pillow needed).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# Third-party packages the command line imports; a missing one is a setup step, not a bug.
REQUIRED = {"torch": "torch", "spandrel": "spandrel", "numpy": "numpy", "PIL": "pillow", "safetensors": "safetensors"}


def run() -> int:
    """Import the CLI only here, so a missing dependency is one line with the fix, not a traceback."""
    try:
        from .upscale_cuda.cli import main
    except ModuleNotFoundError as exc:
        package = REQUIRED.get((exc.name or "").split(".")[0])
        if package is None:
            raise
        logging.basicConfig(format="%(levelname)s %(message)s", stream=sys.stderr)
        logging.getLogger(__name__).error(
            "the upscale command needs the Python package %r, which is not installed for %s; "
            "install the pack's requirements: %s -m pip install -r %s",
            package, sys.executable, sys.executable, Path(__file__).resolve().parent / "requirements.txt",
        )  # fmt: skip
        return 2
    return main()


if __name__ == "__main__":
    sys.exit(run())
