"""Whether a run recomputes activations (gradient checkpointing): ``auto``, ``on`` or ``off``.

Checkpointing trades speed for memory: SDXL at 1024 px trains about 1.3x faster without it but
peaks at about twice the VRAM. ``auto`` measures instead of guessing: the trainer runs one eager
forward/backward of its largest batch without checkpointing before the first step (gradients
returned, none stored), and turns checkpointing off only when that step's peak fits in the free
memory with room to spare (the CUDA-graph pool, the optimizer step and the server's sample images
need it). Out of memory in the trial, or a device whose memory cannot be measured, means on.
"""

from __future__ import annotations

MODES = ("auto", "on", "off")
GIB = 1024**3
# room left after the trial step's peak: the larger of these
MIN_SPARE_BYTES = 2 * GIB
SPARE_FRACTION = 0.10


def is_mode(value: object) -> bool:
    """True for what :func:`checkpointing_mode` accepts."""
    return value is True or value is False or (isinstance(value, str) and value in MODES)


def checkpointing_mode(value: object) -> str:
    """``auto``/``on``/``off``; ``True``/``False`` (workflows saved when the input was a switch)
    map to ``on``/``off``. ``ValueError`` naming the input for anything else."""
    if not is_mode(value):
        raise ValueError(f"gradient_checkpointing={value!r} is invalid: it must be one of {MODES}")
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def spare_bytes(total_bytes: int) -> int:
    """Memory ``auto`` keeps free beyond the trial step's peak."""
    return max(MIN_SPARE_BYTES, int(SPARE_FRACTION * total_bytes))


def decide(need_bytes: int | None, free_bytes: int, total_bytes: int, reserve_bytes: int = 0) -> tuple[bool, str]:
    """``(checkpointing on, why)`` for ``auto`` from the trial step's extra peak (None: it ran
    out of memory) and the memory free before it. ``reserve_bytes``: what another process needs
    meanwhile (the server rendering a worker run's sample images holds its model), kept free too."""
    if need_bytes is None:
        return True, "a step without it ran out of memory"
    if need_bytes <= 0:
        return True, "the trial step's memory could not be measured"
    spare = spare_bytes(total_bytes) + max(0, reserve_bytes)
    fits = need_bytes + spare <= free_bytes
    verdict = "fits" if fits else "does not fit"
    kept = f" (of which {reserve_bytes / GIB:.2f} GiB for the sample images)" if reserve_bytes > 0 else ""
    why = (
        f"a step without it needs {need_bytes / GIB:.2f} GiB, which {verdict} in the "
        f"{free_bytes / GIB:.2f} GiB free with {spare / GIB:.2f} GiB to spare{kept}"
    )
    return not fits, why
