"""Where probe nodes save what they received: ``output/probe/<name>.safetensors`` (float, CPU)."""

from __future__ import annotations

import os


def save_probe_tensor(save_name: str, key: str, tensor) -> str:
    """Save ``tensor`` under ``key`` in the server's ``output/probe/<save_name>.safetensors``; returns the path."""
    import folder_paths
    from safetensors.torch import save_file

    folder = os.path.join(folder_paths.get_output_directory(), "probe")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, save_name + ".safetensors")
    save_file({key: tensor.detach().to("cpu").contiguous().clone()}, path)
    return path
