"""First Block Cache: skip the middle blocks of a diffusion step when the first blocks' residual barely changed.

Pure logic: no comfy, folder_paths or server import (see tests/unit/test_core_isolation.py).
"""

from .calibration import Calibration
from .conditioning import conditioning_on_device
from .families import Family, resolve_family, unet_first_level
from .forecast import HIT_RESIDUALS
from .holder import CACHE_MODES, HOLDER_KEY, FBCacheHolder, validate_settings
from .hooks import (
    SkipRemainingBlocks,
    cached_span,
    clamp_blocks,
    dit_diffusion_wrapper,
    make_block_replacement,
    step_apply_model_wrapper,
    unet_diffusion_wrapper,
    unet_input_block_patch,
    unet_output_block_patch,
    whole_step_apply_model_wrapper,
)
from .quality_check import measured_psnr

__all__ = [
    "CACHE_MODES",
    "HIT_RESIDUALS",
    "HOLDER_KEY",
    "Calibration",
    "FBCacheHolder",
    "Family",
    "SkipRemainingBlocks",
    "cached_span",
    "clamp_blocks",
    "conditioning_on_device",
    "dit_diffusion_wrapper",
    "make_block_replacement",
    "measured_psnr",
    "resolve_family",
    "step_apply_model_wrapper",
    "unet_diffusion_wrapper",
    "whole_step_apply_model_wrapper",
    "unet_first_level",
    "unet_input_block_patch",
    "unet_output_block_patch",
    "validate_settings",
]
