"""Module-path conventions: ComfyUI's LDM UNet paths vs the diffusers paths kohya writes for SD1.5.

sd-scripts trains SD1.x on a diffusers-named UNet (``down_blocks.0.attentions.0...``) and SDXL on
an LDM/SGM-named one (``input_blocks.4.1...``); ComfyUI always holds the LDM layout. So SD1.5 keys
are renamed here, SDXL keys are written as they are.
"""

from __future__ import annotations

from collections.abc import Sequence


def _block_starts(counts: Sequence[int], first: int) -> list[int]:
    starts, n = [], first
    for c in counts:
        starts.append(n)
        n += c + 1
    return starts


def ldm_to_diffusers_path(path: str, num_res_blocks: Sequence[int]) -> str:
    """Rename an LDM UNet module path inside a transformer container to its diffusers path.

    ``num_res_blocks`` is per resolution level (SD1.5: ``[2, 2, 2, 2]``). Only paths under
    ``input_blocks.N.1``, ``middle_block.1`` and ``output_blocks.N.1`` (the transformer
    containers, the only places LoRA targets live) are supported; anything else is a ValueError.
    """
    parts = path.split(".")
    if parts[0] == "middle_block" and len(parts) > 2 and parts[1] == "1":
        return ".".join(["mid_block", "attentions", "0", *parts[2:]])
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 3 and parts[2] == "1":
        index = int(parts[1])
        if parts[0] == "input_blocks":
            counts, starts, kind = list(num_res_blocks), _block_starts(num_res_blocks, 1), "down_blocks"
        else:
            counts = list(reversed(num_res_blocks))
            starts, kind = _block_starts(counts, 0), "up_blocks"
        for level, (start, count) in enumerate(zip(starts, counts, strict=True)):
            # down levels hold `count` transformer slots (then the downsampler); up levels count + 1
            slots = count if kind == "down_blocks" else count + 1
            if start <= index < start + slots:
                return ".".join([kind, str(level), "attentions", str(index - start), *parts[3:]])
    raise ValueError(f"{path} is not inside an LDM UNet transformer container; cannot name it for diffusers")
