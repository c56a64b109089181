"""Regenerate the example workflow thumbnails (``example_workflows/<name>.jpg``).

Each ``example_workflows/<name>.json`` is loaded into the real ComfyUI front end, the graph
is fitted to the view, and a screenshot of the graph is saved as ``<name>.jpg`` (shown in
ComfyUI's template browser and in the README). The pictures therefore show exactly what a
user sees after opening the workflow, with the pack's nodes as the server defines them.

What it needs:

- a ComfyUI checkout (``--comfyui-root``; ``bash tests/setup_comfyui.sh .venv/bin/python``
  prepares the one the integration tests use) whose Python (``--python``, this interpreter by
  default) has ComfyUI's requirements installed, including the ``comfyui-frontend-package``
  wheel at the version pinned in ComfyUI's ``requirements.txt``;
- Chromium (``apt-get install chromium``; ``--chromium`` names another binary);
- the ``playwright`` Python package in the interpreter running this script. Playwright only
  drives the Chromium above, so ``playwright install`` (a browser download) is not needed.

ComfyUI runs on the CPU with every writable folder in a temporary directory; the pack is made
visible to it through ``--extra-model-paths-config``. Model and image files a workflow names
are created there as empty placeholders (a small generated picture for images), so that the
front end shows the workflow as saved instead of flagging missing models. A workflow that loads
badly gets no thumbnail and is named in the log, with the reason: an unregistered node type, a node
marked with an error, a widget showing a value it cannot hold (``widgets_values`` out of step with
the node's inputs, e.g. a ``seed`` saved without the companion value the front end adds after it)
or nodes drawn over each other (saved sizes smaller than the nodes now need). The exit code is then 1.

    .venv/bin/python scripts/screenshot_workflows.py --comfyui-root ~/.cache/speedkit-ref/ComfyUI
    .venv/bin/python scripts/screenshot_workflows.py --only fbcache_sdxl,upscale_cuda
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("screenshot_workflows")

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-SpeedKit"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Front-end settings for a clean, repeatable picture: no first-run tour or template browser,
# no minimap or FPS overlay, no missing-model dialogs (placeholders cover the models anyway).
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.VueNodes.Enabled": False,
}

# Runs in the page: load the workflow, list what would make a misleading picture (unknown or
# failing nodes, widget values the front end cannot show, overlapping nodes), fit the graph into
# the canvas and return the graph's rectangle in page (CSS) pixels.
LOAD_AND_FIT_JS = """
async ([workflow, name, margin, maxScale]) => {
    const app = window.app;
    await app.loadGraphData(workflow, true, false, name,
        {showMissingNodesDialog: false, showMissingModelsDialog: false});
    const graph = app.graph;
    const problems = [];
    for (const node of graph.nodes) {
        const label = `node ${node.id} (${node.type})`;
        if (!window.LiteGraph.registered_node_types[node.type]) problems.push(`${label} is not registered`);
        if (node.has_errors) problems.push(`${label} has errors`);
        for (const w of node.widgets ?? []) {
            const values = w.options?.values;
            const bad = (w.type === 'number' && !Number.isFinite(w.value))
                || (w.type === 'combo' && Array.isArray(values) && !values.includes(w.value))
                || (w.type === 'toggle' && typeof w.value !== 'boolean');
            if (bad) problems.push(`${label} widget '${w.name}' shows ${JSON.stringify(w.value)}`);
        }
    }
    const rects = graph.nodes.map((n) => Array.from(n.boundingRect));
    graph.nodes.forEach((a, i) => graph.nodes.slice(i + 1).forEach((b, j) => {
        const [p, q] = [rects[i], rects[i + 1 + j]];
        const w = Math.min(p[0] + p[2], q[0] + q[2]) - Math.max(p[0], q[0]);
        const h = Math.min(p[1] + p[3], q[1] + q[3]) - Math.max(p[1], q[1]);
        const at = (n, r) => `${n.id} (${n.type}, drawn at ${r.map(Math.round).join(',')})`;
        if (w > 2 && h > 2) problems.push(`nodes ${at(a, p)} and ${at(b, q)} overlap`);
    }));
    for (const g of graph.groups ?? []) rects.push(Array.from(g._bounding ?? g.boundingRect));
    if (!rects.length) return {problems: ['the workflow has no nodes']};
    const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
    const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
    const canvas = app.canvas;
    const el = canvas.canvas.getBoundingClientRect();
    const scale = Math.min((el.width - 3 * margin) / (x1 - x0), (el.height - 3 * margin) / (y1 - y0), maxScale);
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = el.width / (2 * scale) - (x0 + x1) / 2;
    canvas.ds.offset[1] = el.height / (2 * scale) - (y0 + y1) / 2;
    canvas.deselectAll?.();
    canvas.setDirty(true, true);
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    const toPage = (x, y) => [el.left + (x + canvas.ds.offset[0]) * scale, el.top + (y + canvas.ds.offset[1]) * scale];
    const [left, top] = toPage(x0, y0), [right, bottom] = toPage(x1, y1);
    return {problems, scale, rect: [left, top, right - left, bottom - top], canvas: [el.left, el.top, el.width, el.height]};
}
"""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 30) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def comfyui_server(root: Path, python: str, work: Path, port: int, timeout: float = 300) -> Iterator[str]:
    """Run ComfyUI on the CPU with its writable folders under ``work``; yield its URL."""
    base = work / "base"
    custom_nodes = work / "custom_nodes"
    for folder in (base / "custom_nodes", base / "input", base / "output", custom_nodes):
        folder.mkdir(parents=True, exist_ok=True)
    (custom_nodes / PACK_DIR_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (work / "extra_model_paths.yaml").write_text(f"speedkit_screenshots:\n    custom_nodes: {custom_nodes}\n")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=2))
    cmd = [
        python, "main.py", "--cpu",
        "--listen", "127.0.0.1", "--port", str(port),
        "--disable-api-nodes",
        "--base-directory", str(base),
        "--database-url", f"sqlite:///{work / 'comfyui.db'}",
        "--extra-model-paths-config", str(work / "extra_model_paths.yaml"),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log_path = work / "comfyui.log"
    logger.info("starting ComfyUI from %s on %s (log: %s)", root, url, log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {process.returncode}; see {log_path}")
            try:
                http_json(url + "/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; see {log_path}") from None
                time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def combo_values(node: dict, entry: dict) -> list[tuple[str, list]]:
    """(saved value, allowed options) for each drop-down widget of a saved node.

    ``widgets_values`` is positional: one value per widget input in ``input_order``, plus a
    companion value after seeds (``control_after_generate``) and image pickers (upload).
    """
    values = node.get("widgets_values")
    if not isinstance(values, list):
        return []
    out = []
    position = 0
    order = entry.get("input_order", {})
    for section in ("required", "optional"):
        inputs = entry.get("input", {}).get(section, {})
        for name in order.get(section, list(inputs)):
            spec = inputs[name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                kind, opts = "COMBO", {**opts, "options": kind}
            if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or opts.get("forceInput"):
                continue
            if kind == "COMBO" and position < len(values) and isinstance(values[position], str):
                out.append((values[position], list(opts.get("options", []))))
            position += 1 + bool(opts.get("control_after_generate") or opts.get("image_upload"))
    return out


def missing_files(workflows: dict[str, dict], object_info: dict) -> set[str]:
    """File names the workflows pick from drop-downs that this server does not list."""
    missing = set()
    for workflow in workflows.values():
        for node in workflow.get("nodes", []):
            entry = object_info.get(node.get("type"))
            for value, options in combo_values(node, entry) if entry else []:
                if value not in options and "." in Path(value).name:
                    missing.add(value)
    return missing


def write_placeholders(names: set[str], base: Path, model_folders: list[str]) -> None:
    """Create each missing file: a small picture in ``input/`` for images, else an empty file in
    every model folder (the workflow JSON does not say which folder a drop-down lists)."""

    for name in sorted(names):
        if name.lower().endswith(IMAGE_EXTENSIONS):
            path = base / "input" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            landscape().save(path)
            logger.info("placeholder image %s", path)
            continue
        for folder in model_folders:
            path = base / "models" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        logger.info("placeholder model %s in %d model folders", name, len(model_folders))


def landscape(size: tuple[int, int] = (768, 512)):
    """A small drawn picture (sky, sun, two hills) standing in for an input image."""
    from PIL import Image, ImageDraw

    w, h = size
    ramp = Image.linear_gradient("L").resize(size)  # 0 at the top, 255 at the bottom
    top, bottom = (90, 150, 230), (200, 225, 240)
    channels = [ramp.point(lambda v, a=a, b=b: a + (b - a) * v // 255) for a, b in zip(top, bottom, strict=True)]
    image = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.68, h * 0.12, w * 0.80, h * 0.12 + w * 0.12), fill=(255, 224, 140))
    draw.polygon([(0, h), (w * 0.35, h * 0.45), (w * 0.75, h)], fill=(70, 112, 90))
    draw.polygon([(w * 0.4, h), (w * 0.8, h * 0.55), (w, h * 0.7), (w, h)], fill=(92, 138, 108))
    return image


def save_thumbnail(png: bytes, out: Path, width: int, max_height: int, quality: int) -> tuple[int, int]:
    """Downscale a screenshot to ``width`` (at most ``max_height`` tall) and save it as JPEG."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = min(width / image.width, max_height / image.height)
    size = (round(image.width * scale), round(image.height * scale))
    image.resize(size, Image.Resampling.LANCZOS).save(out, "JPEG", quality=quality, optimize=True, progressive=True)
    return size


def screenshot_workflows(args: argparse.Namespace, workflows: dict[str, dict], url: str, work: Path) -> list[str]:
    """Write one thumbnail per workflow; return the names that could not be rendered cleanly."""
    from playwright.sync_api import sync_playwright

    failed = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(work / "chromium-profile"),
            executable_path=args.chromium,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": args.viewport[0], "height": args.viewport[1]},
            device_scale_factor=args.device_scale,
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.on("pageerror", lambda exc: logger.warning("page error: %s", exc))
            page.goto(url, wait_until="networkidle", timeout=120_000)
            page.wait_for_function("() => !!(window.app && window.app.canvas)", timeout=120_000)
            page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
            page.wait_for_timeout(500)
            for name, workflow in workflows.items():
                result = page.evaluate(LOAD_AND_FIT_JS, [workflow, name, args.margin, args.max_scale])
                if result["problems"]:
                    logger.error("%s: not saved, the front end reports: %s", name, "; ".join(result["problems"]))
                    failed.append(name)
                    continue
                page.keyboard.press("Escape")  # closes any toast or popover the load opened
                page.wait_for_timeout(args.settle_ms)
                left, top, w, h = result["rect"]
                pad = args.margin  # room for the source badge drawn above a node's title
                cl, ct, cw, ch = result["canvas"]
                clip = {"x": max(cl, left - pad), "y": max(ct, top - pad)}
                clip["width"] = min(cl + cw, left + w + pad) - clip["x"]
                clip["height"] = min(ct + ch, top + h + pad) - clip["y"]
                out = args.out_dir / f"{name}.jpg"
                size = save_thumbnail(page.screenshot(clip=clip), out, args.width, args.max_height, args.quality)
                logger.info(
                    "%s: %dx%d, %.0f KB (graph zoom %.2f)", out, *size, out.stat().st_size / 1024, result["scale"]
                )
        finally:
            browser.close()
    return failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--comfyui-root",
        type=Path,
        default=os.environ.get("COMFYUI_ROOT", Path.home() / ".cache/speedkit-ref/ComfyUI"),
        help="ComfyUI checkout holding main.py (default: $COMFYUI_ROOT or ~/.cache/speedkit-ref/ComfyUI)",
    )
    parser.add_argument(
        "--workflows-dir", type=Path, default=REPO_ROOT / "example_workflows", help="folder of <name>.json workflows"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where <name>.jpg goes (default: next to the workflows)"
    )
    parser.add_argument("--only", default="", help="comma-separated workflow names (without .json); default: all")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs ComfyUI (default: this one)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary driven by Playwright")
    parser.add_argument("--port", type=int, default=0, help="ComfyUI port (default: a free one)")
    parser.add_argument("--viewport", type=int, nargs=2, default=(1600, 1000), metavar=("W", "H"))
    parser.add_argument("--device-scale", type=float, default=2.0, help="browser pixel ratio (sharper text)")
    parser.add_argument("--margin", type=int, default=32, help="CSS pixels kept around the graph")
    parser.add_argument("--max-scale", type=float, default=1.25, help="largest zoom for small graphs")
    parser.add_argument("--width", type=int, default=1200, help="thumbnail width in pixels")
    parser.add_argument("--max-height", type=int, default=900, help="largest thumbnail height in pixels")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality")
    parser.add_argument("--settle-ms", type=int, default=1500, help="wait after loading before the screenshot")
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or args.workflows_dir
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    root = args.comfyui_root.expanduser().resolve()
    if not (root / "main.py").is_file():
        raise SystemExit(f"--comfyui-root: no main.py in {root}; run `bash tests/setup_comfyui.sh .venv/bin/python`")
    if not Path(args.chromium).is_file():
        raise SystemExit(f"--chromium: {args.chromium} not found; install it with `apt-get install chromium`")
    only = {name.strip().removesuffix(".json") for name in args.only.split(",") if name.strip()}
    paths = sorted(p for p in args.workflows_dir.glob("*.json") if not only or p.stem in only)
    unknown = only - {p.stem for p in paths}
    if unknown:
        raise SystemExit(f"--only: no workflow named {', '.join(sorted(unknown))} in {args.workflows_dir}")
    workflows = {p.stem: json.loads(p.read_text()) for p in paths}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="speedkit-screenshots-") as tmp:
        work = Path(tmp)
        with comfyui_server(root, args.python, work, args.port or free_port()) as url:
            object_info = http_json(url + "/object_info", timeout=120)
            model_folders = [f for f in http_json(url + "/models") if f not in ("custom_nodes", "configs")]
            write_placeholders(missing_files(workflows, object_info), work / "base", model_folders)
            still_missing = missing_files(workflows, http_json(url + "/object_info", timeout=120))
            if still_missing:
                logger.warning("still not listed by the server: %s", ", ".join(sorted(still_missing)))
            failed = screenshot_workflows(args, workflows, url, work)
    if failed:
        logger.error("no thumbnail for: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
