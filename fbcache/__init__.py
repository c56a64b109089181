"""First Block Cache: skip the remaining blocks of a diffusion step when the first block's residual barely changed.

Pure logic: no comfy, folder_paths or server import (see tests/unit/test_core_isolation.py).
"""
