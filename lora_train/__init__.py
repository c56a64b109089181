"""SD1.5/SDXL LoRA trainer that works on the models ComfyUI already loaded.

Pure logic: no comfy, folder_paths or server import (see tests/unit/test_core_isolation.py).
"""
