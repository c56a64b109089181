"""Which hook fits which diffusion network, decided from the class and its block lists.

Pure logic: the network object is only inspected (class names along its MRO, attributes),
never imported from ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Networks whose forward offers ``patches_replace["dit"][(kind, i)]`` around every block, with the
# block lists in execution order. The replacement receives the block's tensors in a dict and must
# return a dict of the same streams ("img", "txt"), which is all the cache needs.
DIT_STACKS: dict[str, tuple[tuple[str, str], ...]] = {
    "Flux": (("double_block", "double_blocks"), ("single_block", "single_blocks")),
    "Chroma": (("double_block", "double_blocks"), ("single_block", "single_blocks")),
    "HunyuanVideo": (("double_block", "double_blocks"), ("single_block", "single_blocks")),
    "WanModel": (("double_block", "blocks"),),
    "QwenImageTransformer2DModel": (("double_block", "transformer_blocks"),),
    "MMDiT": (("double_block", "joint_blocks"),),
    "LTXVModel": (("double_block", "transformer_blocks"),),
}

# Subclasses that pass different tensors to their block replacements (audio+video streams):
# handled one level up until someone verifies them.
STEP_ONLY = {"LTXAVModel": "its block replacements carry separate audio and video streams"}

# Subclasses that add something computed from the current step between blocks (VACE hints, audio
# injection). A tail residual would carry the reference step's additions and the model adds the
# current ones on top; per-block residuals exclude them, so these run per_block.
PER_BLOCK_ONLY = {
    "VaceWanModel": "VACE adds its hints between blocks",
    "WanModel_S2V": "its audio injector runs between blocks",
}

# Wrappers (Nunchaku) that run their own fused kernels and ignore transformer_options.
_WRAPPER_HINTS = ("nunchaku",)


@dataclass(frozen=True)
class Family:
    """How the cache attaches to one network.

    kind: ``unet`` (input_block_patch + DIFFUSION_MODEL wrapper), ``dit`` (block replacements)
    or ``step`` (whole model step skipped at APPLY_MODEL level). ``stacks``: (kind, count) in
    execution order for ``dit``. ``reason``: why a network is handled at step level, or (``dit``)
    why it must use ``per_block`` residuals.
    """

    kind: str
    name: str
    stacks: tuple[tuple[str, int], ...] = ()
    reason: str = ""
    per_block_only: bool = False


def _mro_names(obj: object) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def resolve_family(diffusion_model: object) -> Family:
    """Pick the hook for ``diffusion_model``; raises ``ValueError`` for objects that are no network."""
    name = type(diffusion_model).__name__
    if not isinstance(diffusion_model, torch.nn.Module):
        raise ValueError(
            f"The MODEL's diffusion_model is a {type(diffusion_model).__module__}.{name}, not a torch module: "
            "First Block Cache only patches diffusion models (connect a checkpoint/UNet loader's MODEL)."
        )
    module = type(diffusion_model).__module__.lower()
    wrapper_like = name.startswith("Comfy") and name.endswith("Wrapper")  # ComfyUI-nunchaku's naming
    if wrapper_like or any(hint in module or hint in name.lower() for hint in _WRAPPER_HINTS):
        return Family(
            "step",
            name,
            reason=f"{name} ({type(diffusion_model).__module__}) runs its own kernels and ignores ComfyUI's "
            "block hooks, so whole model steps are skipped (signal: change of the model input)",
        )
    for cls_name in _mro_names(diffusion_model):
        if cls_name in STEP_ONLY:
            return Family("step", name, reason=f"{name}: {STEP_ONLY[cls_name]}")
        if cls_name == "UNetModel":
            blocks = getattr(diffusion_model, "input_blocks", None)
            if blocks is not None and len(blocks) >= 2 and hasattr(diffusion_model, "out"):
                return Family("unet", name)
        if cls_name in DIT_STACKS:
            stacks = []
            for kind, attr in DIT_STACKS[cls_name]:
                blocks = getattr(diffusion_model, attr, None)
                if blocks is None:
                    break
                stacks.append((kind, len(blocks)))
            else:
                stacks = [s for s in stacks if s[1] > 0]
                if stacks and sum(n for _, n in stacks) >= 2:
                    per_block = next(
                        (PER_BLOCK_ONLY[c] for c in _mro_names(diffusion_model) if c in PER_BLOCK_ONLY), ""
                    )
                    return Family("dit", name, tuple(stacks), reason=per_block, per_block_only=bool(per_block))
    return Family(
        "step",
        name,
        reason=f"{name} is not a family with first-block hooks (UNet, Flux, Chroma, SD3, Wan, HunyuanVideo, "
        "LTXV, Qwen-Image), so whole model steps are skipped (signal: change of the model input)",
    )


def unet_first_level(diffusion_model: torch.nn.Module) -> int:
    """Index of the last input block before the UNet's first downsampling (at least 1).

    The UNet's tail residual runs from ``input_blocks[n_first]``'s output to the input of ``out``;
    both must have the same shape, so ``n_first`` may not pass the first downsampling. A block
    downsamples when it holds a module named ``Downsample`` (ComfyUI's) or a ResBlock built with
    ``down=True``.
    """
    blocks = getattr(diffusion_model, "input_blocks", None) or []
    for i, block in enumerate(blocks):
        if i == 0:
            continue
        for sub in block.modules():
            if type(sub).__name__ == "Downsample" or getattr(sub, "down", False) is True:
                return max(1, i - 1)
    return max(1, len(blocks) - 1)
