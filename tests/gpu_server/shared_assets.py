"""Build the GPU tier's random-weight checkpoints once and link them into each setting's asset
folder, so settings run side by side (``run_settings.sh``) do not each build and write their own
full-size SDXL (7 GB, built on the GPU) at the same time.

    python tests/gpu_server/shared_assets.py SHARED_DIR SETTING_DIR [SETTING_DIR ...]

Each ``SETTING_DIR/checkpoints`` and ``SETTING_DIR/upscale_models`` then holds links to the files
in ``SHARED_DIR``; the tier's ``gpu_assets`` fixture finds them and builds nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from server_cases import TINY_CKPT, TINY_UPSCALER  # noqa: E402
from test_example_workflows_in_server import SDXL_NAME  # noqa: E402
from tiny_models import build_models, build_sdxl  # noqa: E402

logger = logging.getLogger("shared_assets")


def build(shared: Path, comfy_root: Path) -> list[Path]:
    """The shared files (built where missing), as paths under ``shared``."""
    ckpts, ups = shared / "checkpoints", shared / "upscale_models"
    if not (ckpts / TINY_CKPT).is_file() or not (ups / TINY_UPSCALER).is_file():
        build_models(comfy_root, ckpts / TINY_CKPT, ups / TINY_UPSCALER)
    build_sdxl(comfy_root, ckpts / SDXL_NAME)
    return [ckpts / TINY_CKPT, ups / TINY_UPSCALER, ckpts / SDXL_NAME]


def link(files: list[Path], shared: Path, setting_dir: Path) -> None:
    for file in files:
        target = setting_dir / file.relative_to(shared)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(file)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(argv) < 2:
        logger.error("usage: shared_assets.py SHARED_DIR SETTING_DIR [SETTING_DIR ...]")
        return 2
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not (Path(root) / "main.py").is_file():
        logger.error("COMFYUI_ROOT must point at a ComfyUI checkout")
        return 2
    shared = Path(argv[0]).resolve()
    files = build(shared, Path(root))
    for setting_dir in argv[1:]:
        link(files, shared, Path(setting_dir))
    logger.info("shared GPU tier assets in %s, linked into %d setting folder(s)", shared, len(argv) - 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
