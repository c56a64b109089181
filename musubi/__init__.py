"""Musubi Tuner: configs, argv builders and a subprocess runner for kohya-ss/musubi-tuner's CLI scripts.

Pure logic: no comfy, folder_paths or server import (see tests/unit/test_core_isolation.py).
"""
