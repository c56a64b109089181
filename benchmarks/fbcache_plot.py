"""Draw PSNR vs speedup from ``fbcache_quality.py`` output (Pillow only), and print the tables of docs/fbcache.md.

``python benchmarks/fbcache_plot.py --results quality.json --plot docs/fbcache_quality.png --tables``

One panel per (model, sampler). Every setting is a dot; each method's line joins its settings
that no other setting of the same method beats in both speed and quality (its Pareto front).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger("fbcache_plot")

SERIES = {
    # method: (label, colour, dashed)
    "fbc_reuse": ("FBCache reuse, unbounded hits", (31, 119, 180), False),
    "fbc_reuse_h2": ("FBCache reuse, max 2 hits", (174, 199, 232), False),
    "fbc_extrapolate_h2": ("FBCache extrapolate, max 2 (node default)", (148, 103, 189), False),
    "fbc_taylor1_h3": ("FBCache taylor1, max 3 hits", (0, 128, 0), False),
    "fbc_taylor2_h3": ("FBCache taylor2, max 3 hits", (152, 223, 138), False),
    "fbc_taylor1_h3_F2": ("FBCache taylor1, max 3, n_first 2", (140, 86, 75), False),
    "fbc_taylor1_h3_F2B0": ("FBCache taylor1, max 3, F2B0", (140, 86, 75), False),
    "fbc_taylor1_h3_F1B1": ("FBCache taylor1, max 3, F1B1", (196, 156, 148), False),
    "fbc_taylor1_h3_F2B1": ("FBCache taylor1, max 3, F2B1", (227, 119, 194), False),
    "fbc_target": ("FBCache speed target (taylor1, max 3)", (0, 0, 0), False),
    "fbc_target_fit1": ("FBCache speed target (fit1, max 3)", (90, 90, 90), False),
    "fbc_target_whole": ("FBCache speed target, whole-step skips (taylor1)", (0, 190, 190), False),
    "fbc_target_whole_fit1": ("FBCache speed target, whole-step skips (fit1)", (170, 0, 100), False),
    "easycache": ("ComfyUI EasyCache", (214, 39, 40), True),
    "magcache": ("MagCache rule (re-impl.)", (255, 127, 14), True),
    "taylorseer": ("TaylorSeer forecast (re-impl.)", (127, 127, 127), True),
    "fewer_steps": ("No cache, fewer steps", (188, 189, 34), True),
}
TITLES = {"unet": "UNet (SDXL topology, eps)", "dit": "DiT (Wan 2.1 topology, flow)"}


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (speedup, PSNR), by speedup."""
    front = []
    for s, p in sorted(points, key=lambda sp: (-sp[0], -sp[1])):
        if not front or p > front[-1][1]:
            front.append((s, p))
    return sorted(front)


def plot(
    results: dict,
    out: Path,
    max_speedup: float = 6.0,
    ymin: float = 10.0,
    ymax: float = 60.0,
    only: str = "*",
) -> None:
    """``only``: draw the panels whose ``kind:panel`` name matches one of these comma-separated globs
    (``dit:dpmpp_2m,dit:dpmpp_2m@*``: the DiT's dpmpp_2m at every CFG scale)."""
    panels = [
        (k, s)
        for k in ("unet", "dit")
        if k in results
        for s in results[k].get("baseline", {})
        if any(fnmatch.fnmatchcase(f"{k}:{s}", glob) for glob in only.split(","))
    ]
    pw, ph = 560, 400
    cols = 2
    rows_n = (len(panels) + cols - 1) // cols
    legend_h = 22 * ((len(SERIES) + 2) // 3) + 50
    img = Image.new("RGB", (pw * cols + 20, ph * rows_n + legend_h), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(15), _font(12)
    for n, (kind, sampler) in enumerate(panels):
        ox, oy = 10 + (n % cols) * pw, (n // cols) * ph
        x0, y0, x1, y1 = ox + 60, oy + 30, ox + pw - 20, oy + ph - 50

        def px(s, x0=x0, x1=x1):
            return x0 + (min(s, max_speedup) - 1.0) / (max_speedup - 1.0) * (x1 - x0)

        def py(p, y0=y0, y1=y1):
            p = min(max(p, ymin), ymax)
            return y1 - (p - ymin) / (ymax - ymin) * (y1 - y0)

        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        for s in range(1, int(max_speedup) + 1):
            d.line([px(s), y1, px(s), y1 + 4], fill=(0, 0, 0))
            d.line([px(s), y0, px(s), y1], fill=(236, 236, 236))
            d.text((px(s) - 8, y1 + 6), f"{s}x", fill=(0, 0, 0), font=fs)
        for p in range(int(ymin), int(ymax) + 1, 10):
            d.line([x0 - 4, py(p), x0, py(p)], fill=(0, 0, 0))
            d.line([x0, py(p), x1, py(p)], fill=(236, 236, 236))
            d.text((x0 - 28, py(p) - 7), str(p), fill=(0, 0, 0), font=fs)
        d.line([x0, py(30), x1, py(30)], fill=(150, 150, 150), width=2)
        d.line([px(3), y0, px(3), y1], fill=(150, 150, 150), width=2)
        d.text(
            (ox + 70, oy + 8),
            f"{TITLES.get(kind, kind)}, {panel_title(sampler, results[kind]['baseline'][sampler])}",
            fill=(0, 0, 0),
            font=f,
        )
        d.text((ox + pw // 2 - 110, y1 + 24), "speedup (FLOPs, uncached / cached)", fill=(0, 0, 0), font=fs)
        d.text((ox + 4, y0 - 18), "PSNR dB", fill=(0, 0, 0), font=fs)
        rows = [r for r in results[kind]["rows"] if r["sampler"] == sampler]
        for method, (_, color, dashed) in SERIES.items():
            pts = [(r["speedup"], r["psnr"]) for r in rows if r["method"] == method]
            if not pts:
                continue
            front = [(px(s), py(p)) for s, p in pareto(pts) if s <= max_speedup]
            if len(front) > 1:
                if dashed:
                    for (ax, ay), (bx, by) in zip(front, front[1:], strict=False):
                        for t in range(0, 10, 2):
                            d.line(
                                [
                                    ax + (bx - ax) * t / 10,
                                    ay + (by - ay) * t / 10,
                                    ax + (bx - ax) * (t + 1) / 10,
                                    ay + (by - ay) * (t + 1) / 10,
                                ],
                                fill=color,
                                width=2,
                            )
                else:
                    d.line(front, fill=color, width=2)
            for s, p in pts:
                if s <= max_speedup:
                    x, y = px(s), py(p)
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    ly = ph * rows_n + 8
    for i, (_, (label, color, _)) in enumerate(SERIES.items()):
        x = 20 + (i % 3) * 370
        y = ly + (i // 3) * 22
        d.rectangle([x, y + 3, x + 14, y + 15], fill=color)
        d.text((x + 20, y), label, fill=(0, 0, 0), font=fs)
    settings = results.get("settings", {})
    d.text(
        (20, ly + 22 * ((len(SERIES) + 2) // 3) + 6),
        f"PSNR vs the uncached output of the same run (model latent space, peak-to-peak 2); {settings.get('steps')} "
        f"steps, CFG {settings.get('cfg', 5.0):g} unless a panel names another, {settings.get('images')} images. "
        "Grey lines: 30 dB and 3x.",
        fill=(60, 60, 60),
        font=fs,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    logger.info("wrote %s", out)


def best_at(rows: list[dict], speed: float, method_prefix: str) -> dict | None:
    """The highest-PSNR row of methods starting with ``method_prefix`` at >= ``speed``."""
    ok = [r for r in rows if r["method"].startswith(method_prefix) and r["speedup"] >= speed]
    return max(ok, key=lambda r: r["psnr"]) if ok else None


def fastest_at(rows: list[dict], psnr: float, method_prefix: str) -> dict | None:
    """The fastest row of methods starting with ``method_prefix`` with PSNR >= ``psnr``."""
    ok = [r for r in rows if r["method"].startswith(method_prefix) and r["psnr"] >= psnr]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


def _cell(r: dict | None) -> str:
    return f"{r['speedup']:.2f}x, {r['psnr']:.1f} dB ({r['setting']})" if r else "-"


def panel_title(panel: str, baseline: dict) -> str:
    """The title of panel ``sampler[:scheduler][@cfgN]``: ``dpmpp_2m normal`` (CFG 5, the
    benchmark's default) or ``dpmpp_2m normal, CFG 3``."""
    name = panel.partition("@")[0].partition(":")[0]
    cfg = baseline.get("cfg", 5.0)
    return f"{name} {baseline.get('scheduler', 'normal')}" + ("" if cfg == 5.0 else f", CFG {cfg:g}")


def on_run_range(row: dict, baseline: dict) -> float:
    """A row's PSNR with the uncached run's own value range as the peak, as the node's estimate and
    quality check define it (the other columns use the data's range, 2; under strong guidance the
    output spreads wider, so this PSNR is higher by ``20 log10(range / 2)``)."""
    if "psnr_run_peak" in row:
        return row["psnr_run_peak"]
    low, high = baseline["range"]
    return row["psnr"] + 20 * math.log10(max(high - low, 1e-12) / 2.0)


def tables(results: dict) -> str:
    """Markdown: per (model, sampler) and method, the fastest setting at >= 30 dB and the best PSNR at
    >= 2x and >= 2.5x; then the speed-target runs (predicted vs measured)."""
    lines = [
        "| Model, sampler | Method | fastest at >= 30 dB | best PSNR at >= 2x | best PSNR at >= 2.5x |",
        "|---|---|---|---|---|",
    ]
    for kind in ("unet", "dit"):
        for sampler, base in results.get(kind, {}).get("baseline", {}).items():
            rows = [r for r in results[kind]["rows"] if r["sampler"] == sampler and r["speedup"] > 1.001]
            for method, (label, _, _) in SERIES.items():
                mine = [r for r in rows if r["method"] == method]
                if method in ("fbc_target", "single_skip") or not mine:
                    continue
                cells = [_cell(fastest_at(mine, 30.0, method)), _cell(best_at(mine, 2.0, method))]
                cells.append(_cell(best_at(mine, 2.5, method)))
                where = f"{kind}, {panel_title(sampler, base)}"
                lines.append(f"| {where} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| Model, sampler | target speedup | planned steps (of 30) | predicted (model calls) | measured (model calls) |"
        " measured (FLOPs) | predicted PSNR | measured PSNR, on the run's range (on [-1, 1]) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("unet", "dit"):
        for r in results.get(kind, {}).get("rows", []):
            if r["method"] == "fbc_target":
                planned = " ".join(f"{p:g}" for p in r.get("plan", [])) or f"threshold {r['threshold']:.4g}"
                base = results[kind]["baseline"][r["sampler"]]
                lines.append(
                    f"| {kind}, {r['sampler']} | {r['setting']}x | {planned} | "
                    f"{r['predicted_speedup_calls']:.2f}x | {r['speedup_calls']:.2f}x | {r['speedup']:.2f}x | "
                    f"{r['predicted_psnr']:.1f} dB | {on_run_range(r, base):.1f} dB ({r['psnr']:.1f} dB) |"
                )
    return "\n".join(lines)


OURS = ("fbc_reuse", "fbc_extrapolate", "fbc_taylor", "fbc_target")
"""Our methods as users set them (thresholds and targets), without the diagnostics' plans."""


def _best_of(rows: list[dict], speed: float, prefixes: tuple[str, ...]) -> str:
    found = [r for r in (best_at(rows, speed, p) for p in prefixes) if r]
    if not found:
        return "-"
    r = max(found, key=lambda r: r["psnr"])
    return f"{r['psnr']:.1f} dB ({SERIES.get(r['method'], (r['method'],))[0]}, {r['speedup']:.2f}x)"


def cfg_table(results: dict, speed: float = 3.0) -> str:
    """Markdown: per model, sampler and CFG scale (the ``@cfgN`` panels), how far the uncached
    30-step output is from 60 steps and from 10 steps, its value range, the best PSNR of ours and of
    the other caches at >= ``speed``, and the 3x speed target's predicted and measured PSNR."""
    lines = [
        f"| Model, sampler | CFG | output range | 30 vs 60 steps | 10 steps, no cache | ours, best at >= {speed:g}x |"
        f" {speed:g}x target (whole steps, fit1): predicted / measured, on the run's range | EasyCache, MagCache,"
        f" TaylorSeer: best at"
        f" >= {speed:g}x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("unet", "dit"):
        panels = results.get(kind, {}).get("baseline", {})
        order = sorted(panels, key=lambda k: (k.partition("@")[0], panels[k].get("cfg", 5.0)))
        for panel in order:
            base = panels[panel]
            rows = [r for r in results[kind]["rows"] if r["sampler"] == panel]

            def one(method: str, setting: float, rows: list[dict] = rows) -> dict | None:
                return next((r for r in rows if r["method"] == method and r["setting"] == setting), None)

            more, fewer, target = one("more_steps", 60), one("fewer_steps", 10), one("fbc_target_whole_fit1", speed)
            cells = [
                f"{kind}, {panel_title(panel.partition('@')[0], {**base, 'cfg': 5.0})}",
                f"{base.get('cfg', 5.0):g}",
                "{:.2f} to {:.2f}".format(*base["range"]),
                f"{more['psnr']:.1f} dB" if more else "-",
                f"{fewer['psnr']:.1f} dB" if fewer else "-",
                _best_of(rows, speed, OURS),
                f"{target['predicted_psnr']:.1f} / {on_run_range(target, base):.1f} dB" if target else "-",
                _best_of(rows, speed, ("easycache", "magcache", "taylorseer")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def psnr_target_table(results: dict, targets: tuple[float, ...] = (30.0, 35.0, 40.0, 45.0)) -> str:
    """Markdown: per panel and ``target_psnr``, the quality-target runs with the node's check and
    with the estimate alone: speedup (FLOPs) and the PSNR on the evaluation images, on the run's
    range as the node defines it (calibrated on other images)."""
    lines = [
        "| Model, sampler | CFG | " + " | ".join(f"target {t:g} dB: checked / estimate alone" for t in targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for kind in ("unet", "dit"):
        panels = results.get(kind, {}).get("baseline", {})
        order = sorted(panels, key=lambda k: (k.partition("@")[0], panels[k].get("cfg", 5.0)))
        for panel in order:
            base = panels[panel]
            rows = [r for r in results[kind]["rows"] if r["sampler"] == panel and r["method"].startswith("fbc_psnr")]
            if not rows:
                continue

            def cell(method: str, target: float, rows: list[dict] = rows, base: dict = base) -> str:
                r = next((r for r in rows if r["method"] == method and r["setting"] == target), None)
                return "-" if r is None else f"{r['speedup']:.2f}x, {on_run_range(r, base):.1f} dB"

            cells = [
                f"{kind}, {panel_title(panel.partition('@')[0], {**base, 'cfg': 5.0})}",
                f"{base.get('cfg', 5.0):g}",
                *(f"{cell('fbc_psnr_checked', t)} / {cell('fbc_psnr_estimate', t)}" for t in targets),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def psnr_target_summary(results: dict) -> str:
    """One line per method: how often the evaluation images kept the target (and within 1 dB), and
    the mean speedup (FLOPs)."""
    out = []
    for method in ("fbc_psnr_checked", "fbc_psnr_estimate"):
        rows = [
            (r, results[kind]["baseline"][r["sampler"]])
            for kind in ("unet", "dit")
            for r in results.get(kind, {}).get("rows", [])
            if r["method"] == method
        ]
        if not rows:
            continue
        held = sum(on_run_range(r, b) >= r["setting"] for r, b in rows)
        near = sum(on_run_range(r, b) >= r["setting"] - 1.0 for r, b in rows)
        worst = min(on_run_range(r, b) - r["setting"] for r, b in rows)
        speed = sum(r["speedup"] for r, _ in rows) / len(rows)
        out.append(
            f"- {method}: {len(rows)} runs, target held on the evaluation images in {held} ({near} within 1 dB), "
            f"worst {worst:+.1f} dB, mean speedup {speed:.2f}x"
        )
    return "\n".join(out)


def space_table(results: dict, target: float = 3.0) -> str:
    """Markdown: per flow-toy panel, each whole-step ``target`` plan forced with the velocity
    forecast (the node), the noise-prediction forecast and the denoised-latent forecast (rows
    ``fbc_space_*``), ``taylor1`` and ``fit1``; then the mean difference to the velocity by CFG
    scale, per forecast quantity."""
    plans = (("fbc_target_whole", "taylor1's plan"), ("fbc_target_whole_fit1", "fit1's plan"))
    spaces = ("velocity", "noise", "denoised")
    lines = [
        "| Sampler | CFG | "
        + " | ".join(f"{name}, {r}: {' / '.join(spaces)}" for _, name in plans for r in ("taylor1", "fit1"))
        + " |",
        "|---|---|" + "---|" * 4,
    ]
    panels = results.get("dit", {}).get("baseline", {})
    differences: dict[str, dict[float, list[float]]] = {space: {} for space in spaces[1:]}
    for panel in sorted(panels, key=lambda k: (k.partition("@")[0], panels[k].get("cfg", 5.0))):
        base = panels[panel]
        rows = [r for r in results["dit"]["rows"] if r["sampler"] == panel and r["method"].startswith("fbc_space")]
        if not rows:
            continue
        cfg = base.get("cfg", 5.0)
        cells = [panel_title(panel.partition("@")[0], {**base, "cfg": 5.0}), f"{cfg:g}"]
        psnr = {(r["method"], r.get("plan_of")): r["psnr"] for r in rows if r["setting"] == target}
        for source, _ in plans:
            for residual in ("taylor1", "fit1"):
                values = {space: psnr.get((f"fbc_space_{space}_{residual}", source)) for space in spaces}
                cells.append(" / ".join("-" if v is None else f"{v:.1f}" for v in values.values()) + " dB")
                for space in spaces[1:]:
                    if values["velocity"] is not None and values[space] is not None:
                        differences[space].setdefault(cfg, []).append(values[space] - values["velocity"])
        lines.append("| " + " | ".join(cells) + " |")
    summaries = [
        f"{space} - velocity, mean (range) over the cells: "
        + ", ".join(
            f"CFG {cfg:g}: {sum(d) / len(d):+.1f} dB ({min(d):+.1f} to {max(d):+.1f})"
            for cfg, d in sorted(by_cfg.items())
        )
        for space, by_cfg in differences.items()
        if by_cfg
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(summaries)


def single_skips(results: dict) -> str:
    """Markdown: PSNR after one forced skipped step (reuse) at each position, per model and sampler."""
    lines = []
    for kind in ("unet", "dit"):
        for sampler, base in results.get(kind, {}).get("baseline", {}).items():
            rows = [r for r in results[kind]["rows"] if r["sampler"] == sampler and r["method"] == "single_skip"]
            if rows:
                cells = ", ".join(f"step {r['setting']}: {r['psnr']:.1f} dB" for r in rows)
                lines.append(f"- {kind}, {sampler} {base.get('scheduler', 'normal')}: {cells}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument(
        "--panels",
        default="*",
        help="only the panels matching one of these comma-separated globs on kind:panel, e.g. 'dit:euler*'",
    )
    ap.add_argument("--tables", action="store_true", help="print the markdown tables of docs/fbcache.md")
    ap.add_argument("--cfg-table", action="store_true", help="print the table by CFG scale of docs/fbcache.md")
    ap.add_argument("--psnr-table", action="store_true", help="print the quality-target table of docs/fbcache.md")
    ap.add_argument(
        "--space-table",
        action="store_true",
        help="print the forecast-quantity table (velocity, noise or denoised) of docs/fbcache.md",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    results = json.loads(args.results.read_text())
    if args.plot:
        plot(results, args.plot, only=args.panels)
    if args.tables:
        logger.info("\n%s\n\n%s", tables(results), single_skips(results))
    if args.cfg_table:
        logger.info("\n%s", cfg_table(results))
    if args.psnr_table:
        logger.info("\n%s\n\n%s", psnr_target_table(results), psnr_target_summary(results))
    if args.space_table:
        logger.info("\n%s", space_table(results))


if __name__ == "__main__":
    main()
