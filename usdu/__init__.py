"""Ultimate SD Upscale for Nunchaku: tiled img2img upscaling with range normalisation and no sys.modules tricks.

Pure logic: no comfy, folder_paths or server import (see tests/unit/test_core_isolation.py).
"""
