"""Draw the quality-vs-speed plot and a sample grid from ``fbcache_quality.py`` output (Pillow only).

``python benchmarks/fbcache_plot.py --results benchmarks/fbcache_results_h100.json \\
    --latents quality.latents.pt --plot docs/fbcache_quality.png --samples docs/fbcache_samples.png``
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger("fbcache_plot")

COLORS = {
    "ours": (31, 119, 180),
    "ours_maxhits2": (44, 160, 44),
    "ours_maxhits1": (23, 190, 207),
    "ours_extrap": (148, 103, 189),
    "ours_extrap_maxhits2": (255, 127, 14),
    "ours_extrap_maxhits1": (140, 86, 75),
    "easycache": (214, 39, 40),
}
LABELS = {
    "ours": "FBCache reuse",
    "ours_maxhits2": "FBCache reuse, max 2 hits in a row",
    "ours_maxhits1": "FBCache reuse, max 1 hit in a row",
    "ours_extrap": "FBCache extrapolate",
    "ours_extrap_maxhits2": "FBCache extrapolate, max 2 hits (node default)",
    "ours_extrap_maxhits1": "FBCache extrapolate, max 1 hit",
    "easycache": "ComfyUI EasyCache",
}
RESULT_KEYS = ("quality_session3", "quality_call3")
"""Newest quality run first (the results file keeps older runs for comparison)."""


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def plot(
    rows: list[dict], out: Path, speed_key: str = "speedup_cost", max_speedup: float = 4.0, note: str = "20 steps"
) -> None:
    """One panel per sampler; points beyond ``max_speedup`` (PSNR far below use) are left out."""
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    rows = [r for r in rows if r[speed_key] <= max_speedup]
    pw, ph, margin = 520, 380, 70
    img = Image.new("RGB", (pw * len(samplers) + 20, ph + 200), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(15), _font(12)
    xmax = max(r[speed_key] for r in rows) * 1.05
    ymin, ymax = 10.0, 42.0
    for si, sampler in enumerate(samplers):
        ox = 10 + si * pw
        x0, y0, x1, y1 = ox + margin, 30, ox + pw - 20, ph - 40

        def px(s, x0=x0, x1=x1):
            return x0 + (s - 1.0) / (xmax - 1.0) * (x1 - x0)

        def py(p, y0=y0, y1=y1):
            p = min(max(p, ymin), ymax)
            return y1 - (p - ymin) / (ymax - ymin) * (y1 - y0)

        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        for tick in range(2, int(xmax * 2) + 1):
            s = tick / 2
            d.line([px(s), y1, px(s), y1 + 4], fill=(0, 0, 0))
            d.text((px(s) - 10, y1 + 6), f"{s:g}x", fill=(0, 0, 0), font=fs)
        for p in range(int(ymin), int(ymax) + 1, 5):
            d.line([x0 - 4, py(p), x0, py(p)], fill=(0, 0, 0))
            d.line([x0, py(p), x1, py(p)], fill=(232, 232, 232))
            d.text((x0 - 30, py(p) - 7), str(p), fill=(0, 0, 0), font=fs)
        d.line([x0, py(30), x1, py(30)], fill=(150, 150, 150), width=2)
        d.text((ox + pw // 2 - 40, 8), sampler, fill=(0, 0, 0), font=f)
        d.text((ox + pw // 2 - 120, y1 + 22), "speedup (cost-weighted full evaluations)", fill=(0, 0, 0), font=fs)
        d.text((ox + 5, y0 - 5), "PSNR dB", fill=(0, 0, 0), font=fs)
        for method, color in COLORS.items():
            pts = sorted((r[speed_key], r["psnr"]) for r in rows if r["sampler"] == sampler and r["method"] == method)
            if not pts:
                continue
            xy = [(px(s), py(p)) for s, p in pts]
            if len(xy) > 1:
                d.line(xy, fill=color, width=2)
            for x, y in xy:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    ly = ph + 10
    for i, (method, color) in enumerate(COLORS.items()):
        x = 30 + (i % 3) * 520
        y = ly + (i // 3) * 22
        d.rectangle([x, y + 3, x + 14, y + 15], fill=color)
        d.text((x + 20, y), LABELS[method], fill=(0, 0, 0), font=f)
    d.text(
        (30, ly + 75),
        f"PSNR vs the uncached output, same seeds; grey line: 30 dB. Trained SDXL-topology UNet, {note}, CFG 5.",
        fill=(60, 60, 60),
        font=fs,
    )
    d.text(
        (30, ly + 95),
        "Speedup = model evaluations saved, a hit counted at its measured cost (H100, SDXL 1024^2).",
        fill=(60, 60, 60),
        font=fs,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    logger.info("wrote %s", out)


def samples(latents: dict, out: Path, picks: list[str], n: int = 6, scale: int = 4) -> None:
    """Rows: methods; columns: images. Latent channels 0-2 shown as RGB."""
    f = _font(14)
    tile = 32 * scale
    img = Image.new("RGB", (260 + n * (tile + 4), len(picks) * (tile + 4) + 4), "white")
    d = ImageDraw.Draw(img)
    for ri, key in enumerate(picks):
        x = latents[key][:n, :3].float()
        x = ((x + 1) / 2).clamp(0, 1).mul(255).byte().permute(0, 2, 3, 1).numpy()
        y = 4 + ri * (tile + 4)
        d.text((6, y + tile // 2 - 8), key.replace("/", "  "), fill=(0, 0, 0), font=f)
        for ci in range(min(n, x.shape[0])):
            im = Image.fromarray(x[ci]).resize((tile, tile), Image.NEAREST)
            img.paste(im, (260 + ci * (tile + 4), y))
    img.save(out)
    logger.info("wrote %s", out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--latents", type=Path, default=None)
    ap.add_argument("--plot", type=Path, required=True)
    ap.add_argument("--samples", type=Path, default=None)
    ap.add_argument(
        "--key",
        action="append",
        default=None,
        help="RUN or RUN:SAMPLER,SAMPLER - which run(s) of the results file to draw (default: the newest 20-step run)",
    )
    ap.add_argument("--note", default="20 steps", help="what the caption says about the runs (steps, models)")
    ap.add_argument(
        "--picks",
        default="euler/baseline,euler/ours_extrap_maxhits1/0.5,euler/ours_maxhits1/0.5,euler/easycache/0.1",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    data = json.loads(args.results.read_text())
    if args.key:
        rows = []
        for spec in args.key:
            run, _, samplers = spec.partition(":")
            keep = set(samplers.split(",")) if samplers else None
            rows += [r for r in data[run]["rows"] if keep is None or r["sampler"] in keep]
    else:
        rows = next((data[k] for k in RESULT_KEYS if k in data), data)["rows"]
    plot(rows, args.plot, note=args.note)
    if args.latents and args.samples:
        samples(torch.load(args.latents), args.samples, args.picks.split(","))


if __name__ == "__main__":
    main()
