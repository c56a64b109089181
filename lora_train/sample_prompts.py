"""The sample-prompt list of a training run: one prompt per line, kohya-style options.

Users of kohya's sd-scripts, OneTrainer and musubi-tuner write sample prompts as lines like
``a photo of sks dog on a beach --n blurry --w 1024 --h 768 --d 42 --s 28 --l 6.5``; the
same lines work here. Options a line leaves out come from the node's inputs. Blank lines
and lines starting with ``#`` are skipped. Every mistake is reported with its line number,
the option, the value and the allowed range, before any training step runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_PROMPTS = 16
SIZE_MIN, SIZE_MAX = 64, 4096
STEPS_MAX = 150
SEED_MAX = 2**63 - 1
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")
OPTIONS = {
    "n": "negative prompt",
    "w": "width (pixels, multiple of 8)",
    "h": "height (pixels, multiple of 8)",
    "d": "seed",
    "s": "sampling steps",
    "l": "CFG scale",
}


@dataclass(frozen=True)
class SamplePrompt:
    """One picture to render at each sampling point."""

    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    cfg: float


def _int(value: str, where: str, lo: int, hi: int, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{where}: {what} {value!r} is not a whole number") from None
    if not lo <= number <= hi:
        raise ValueError(f"{where}: {what} {number} is out of range; use {lo} to {hi}")
    return number


def _size(value: str, where: str, what: str) -> int:
    number = _int(value, where, SIZE_MIN, SIZE_MAX, what)
    if number % 8:
        raise ValueError(f"{where}: {what} {number} is not a multiple of 8; use {number - number % 8 or 8 * 8}")
    return number


def parse_line(line: str, number: int, *, width: int, height: int, seed: int, steps: int, cfg: float) -> SamplePrompt:
    """One line -> :class:`SamplePrompt` (``number`` is 1-based, for messages)."""
    where = f"sample_prompts line {number}"
    parts = _OPTION.split(line)
    prompt = parts[0].strip()
    if not prompt:
        raise ValueError(f"{where}: the line has options but no prompt text before the first --option")
    values: dict[str, str] = {}
    for key, value in zip(parts[1::2], parts[2::2], strict=True):
        key = key.lower()
        if key not in OPTIONS:
            known = ", ".join(f"--{k} ({v})" for k, v in OPTIONS.items())
            raise ValueError(f"{where}: unknown option --{key}; the options are {known}")
        if key in values:
            raise ValueError(f"{where}: --{key} is given twice")
        values[key] = value.strip()
        if key != "n" and not values[key]:
            raise ValueError(f"{where}: --{key} has no value")
    cfg_value = cfg
    if "l" in values:
        try:
            cfg_value = float(values["l"])
        except ValueError:
            raise ValueError(f"{where}: CFG scale {values['l']!r} is not a number") from None
        if not (math.isfinite(cfg_value) and 0.0 <= cfg_value <= 100.0):
            raise ValueError(f"{where}: CFG scale {values['l']} is out of range; use 0 to 100 (typically 4 to 8)")
    return SamplePrompt(
        prompt=prompt,
        negative=values.get("n", ""),
        width=_size(values["w"], where, "width") if "w" in values else width,
        height=_size(values["h"], where, "height") if "h" in values else height,
        seed=_int(values["d"], where, 0, SEED_MAX, "seed") if "d" in values else seed,
        steps=_int(values["s"], where, 1, STEPS_MAX, "steps") if "s" in values else steps,
        cfg=cfg_value,
    )


def parse_prompts(
    text: str, *, width: int, height: int, seed: int, steps: int = 20, cfg: float = 7.0
) -> list[SamplePrompt]:
    """Every prompt of ``text``. Line ``k`` (0-based among prompts) without ``--d`` gets seed
    ``seed + k``, so the pictures differ while each line stays the same from one sampling
    point to the next (what makes them comparable)."""
    prompts: list[SamplePrompt] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prompts.append(
            parse_line(
                line,
                number,
                width=width,
                height=height,
                seed=(seed + len(prompts)) % (SEED_MAX + 1),
                steps=steps,
                cfg=cfg,
            )
        )
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(
            f"sample_prompts: {len(prompts)} prompts; at most {MAX_PROMPTS} are rendered at each sampling point "
            "(each costs a full image generation)"
        )
    return prompts
