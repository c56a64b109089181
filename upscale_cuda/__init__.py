"""Fast CUDA super-resolution upscaler (spandrel models, torch.compile, autocast, VRAM-aware tiling).

Pure logic: no comfy, folder_paths or server import (see tests/unit/test_core_isolation.py).
"""
