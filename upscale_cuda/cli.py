"""Command line: ``python -m <pack folder> upscale INPUT... -o OUTDIR``.

Upscales image files (PNG/JPEG/WebP/BMP) or folders of frames with the same engine as
the ComfyUI node. Without ``--model`` it uses the embedded realesr-animevideov3 x4 model
(1.2 MB, BSD-3-Clause). Frames of equal size are batched and streamed: at most
``--chunk`` decoded frames are held in memory at a time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .cache import ModelCache
from .engine import PRECISIONS, UpscaleOptions, Upscaler
from .planning import OPTIMIZATION_LEVELS

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = Path(__file__).resolve().parent / "models" / "realesr-animevideov3-x4.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    pack = __package__.rsplit(".", 1)[0] if __package__ and "." in __package__ else "ComfyUI-SpeedKit"
    parser = argparse.ArgumentParser(prog=f"python -m {pack}", description="ComfyUI-SpeedKit tools")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "upscale",
        help="upscale images or folders of frames with a super-resolution model",
        description=__doc__.split("\n\n")[1],
    )
    up.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders of images")
    up.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    up.add_argument("--model", type=Path, default=None, help=f"model file (default: embedded {EMBEDDED_MODEL.stem})")
    up.add_argument("--scale", type=float, default=None, help="final scale factor (default: the model's own)")
    up.add_argument("--precision", choices=PRECISIONS, default="auto", help="compute precision (default auto)")
    up.add_argument("--tile", type=int, default=0, help="tile size in input px, 0 = automatic (default)")
    up.add_argument("--overlap", type=int, default=0, help="tile overlap in input px, 0 = automatic (default)")
    up.add_argument("--batch", type=int, default=0, help="frames/tiles per model call, 0 = automatic")
    up.add_argument("--level", choices=OPTIMIZATION_LEVELS, default="balanced", help="VRAM use of automatic tiles")
    up.add_argument("--compile", action="store_true", help="torch.compile the model (worth it for many frames)")
    up.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: CUDA when present)")
    up.add_argument("--format", choices=("png", "jpg", "webp"), default="png", help="output format (default png)")
    up.add_argument("--chunk", type=int, default=8, help="frames decoded and upscaled together (default 8)")
    up.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly plus the images inside named folders (sorted)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"{item}: the folder holds no {'/'.join(IMAGE_SUFFIXES)} files")
            files.extend(found)
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise CliError(f"{item}: not a supported image ({', '.join(IMAGE_SUFFIXES)})")
            files.append(item)
        else:
            raise CliError(f"{item}: no such file or folder")
    return files


def load_model(path: Path):
    """Load a spandrel single-image model, with a one-line error for anything unusable."""
    from spandrel import ImageModelDescriptor, ModelLoader

    if not path.is_file():
        raise CliError(f"--model {path}: no such file")
    try:
        model = ModelLoader().load_from_file(str(path))
    except Exception as exc:  # corrupt, truncated or unknown architecture: all user-fixable
        raise CliError(
            f"--model {path}: cannot load it ({type(exc).__name__}: {str(exc)[:200]}); "
            "use an ESRGAN/Real-ESRGAN/Compact/SPAN/SwinIR... .pth or .safetensors file"
        ) from exc
    if not isinstance(model, ImageModelDescriptor):
        raise CliError(f"--model {path}: {type(model).__name__} is not a single-image upscale model")
    return model.eval()


def read_image(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"{path}: cannot read the image ({exc})") from exc
    return torch.from_numpy(arr.copy()).float().div_(255.0)


def write_image(frame: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = frame.clamp(0, 1).mul(255.0).round_().to(torch.uint8).numpy()
    options = {"compress_level": 1} if path.suffix == ".png" else {"quality": 95}
    Image.fromarray(arr).save(path, **options)


def _chunks(files: list[Path], size: int) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Consecutive files of equal image size, at most ``size`` at a time, decoded."""
    group: list[Path] = []
    frames: list[torch.Tensor] = []
    for path in files:
        img = read_image(path)
        if frames and (img.shape != frames[0].shape or len(frames) >= size):
            yield group, torch.stack(frames)
            group, frames = [], []
        group.append(path)
        frames.append(img)
    if frames:
        yield group, torch.stack(frames)


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x = frames.permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).clamp_(0, 1)


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = None
        if quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="img", file=sys.stderr) if tqdm else None
        self.total, self.done, self.quiet = total, 0, quiet

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        elif not getattr(self, "quiet", True):
            self.done += n
            sys.stderr.write(f"\rupscaled {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not getattr(self, "quiet", True):
            sys.stderr.write("\n")


def run_upscale(args: argparse.Namespace) -> int:
    files = collect_inputs(args.inputs)
    model_path = args.model or EMBEDDED_MODEL
    model = load_model(model_path)
    if args.scale is not None and not 0 < args.scale <= 16:
        raise CliError(f"--scale {args.scale}: must be in (0, 16]")
    if args.chunk < 1:
        raise CliError(f"--chunk {args.chunk}: must be >= 1")
    options = UpscaleOptions(
        precision=args.precision,
        tile_size=args.tile,
        overlap=args.overlap,
        compile=args.compile,
        optimization_level=args.level,
        batch_size=args.batch,
    )
    try:
        upscaler = Upscaler(model, options, device=args.device, cache=ModelCache(max_models=1))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    args.output.mkdir(parents=True, exist_ok=True)
    logger.info("upscaling %d image(s) with %s (x%d) -> %s", len(files), model_path.name, model.scale, args.output)
    progress = _Progress(len(files), args.quiet)
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="speedkit-save") as saver:
        try:
            for group, frames in _chunks(files, args.chunk):
                try:
                    out, _report = upscaler.upscale(frames)
                except ValueError as exc:
                    raise CliError(f"{group[0]}: {exc}") from exc
                if args.scale is not None and args.scale != model.scale:
                    h, w = frames.shape[1:3]
                    out = _resize(out, max(1, round(h * args.scale)), max(1, round(w * args.scale)))
                for path, frame in zip(group, out, strict=True):
                    target = args.output / f"{path.stem}.{args.format}"
                    pending.append(saver.submit(write_image, frame, target))
                progress.update(len(group))
                # Keep the number of frames waiting to be encoded bounded.
                while len(pending) > 2 * args.chunk:
                    pending.pop(0).result()
            for fut in pending:
                fut.result()
        finally:
            progress.close()
    logger.info("done: %d image(s) written to %s", len(files), args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    # The program's own logging: our messages on stderr (library code never configures logging).
    root = logging.getLogger(__package__.rsplit(".", 1)[0] if __package__ else __name__)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        if args.command == "upscale":
            return run_upscale(args)
        return 2
    except CliError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        root.removeHandler(handler)
