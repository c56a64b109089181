"""The loss-curve picture returned as an IMAGE (drawn with PIL, no plotting library)."""

from __future__ import annotations

import math

import torch


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_chart(
    losses: list[float],
    width: int = 768,
    height: int = 384,
    title: str = "training loss",
    validation: list[tuple[int, float]] = (),
) -> torch.Tensor:
    """Raw loss (light) and its moving average (dark) vs step, and the validation loss
    (orange, ``(step, loss)`` points, step 1-based) when given; returns [1, height, width, 3]
    in [0, 1]."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, width - 16, 28, height - 32
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    finite = [v for v in losses if math.isfinite(v)]
    val = [(s, v) for s, v in validation if math.isfinite(v)]
    if finite:
        lo, hi = min(finite + [v for _, v in val]), max(finite + [v for _, v in val])
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        n = len(losses)

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, n - 1))
            y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
            return x, y

        raw = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        if len(raw) > 1:
            draw.line(raw, fill=(170, 200, 235), width=1)
        avg = smooth(finite, max(1, n // 20))
        pts = [xy(i, v) for i, v in enumerate(avg)]
        if len(pts) > 1:
            draw.line(pts, fill=(20, 80, 170), width=2)
        vpts = [xy(step - 1, v) for step, v in val]
        if len(vpts) > 1:
            draw.line(vpts, fill=(230, 140, 40), width=2)
        for px, py in vpts:
            draw.rectangle((px - 2, py - 2, px + 2, py + 2), fill=(230, 140, 40))
        draw.text((4, top - 4), f"{hi:.4g}", fill=(60, 60, 60))
        draw.text((4, bottom - 8), f"{lo:.4g}", fill=(60, 60, 60))
        draw.text((left, bottom + 8), "step 1", fill=(60, 60, 60))
        draw.text((right - 60, bottom + 8), f"step {n}", fill=(60, 60, 60))
        title = f"{title} (last avg {avg[-1]:.4g}" + (f", validation {val[-1][1]:.4g})" if val else ")")
    draw.text((left, 8), title, fill=(20, 20, 20))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (data.float() / 255.0).unsqueeze(0)
