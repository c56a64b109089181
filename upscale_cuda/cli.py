"""Command line: ``python -m <pack folder> upscale INPUT... -o OUTDIR``.

Upscales image files (PNG/JPEG/WebP/BMP) or folders of frames with the same engine as
the ComfyUI node. Without ``--model`` it uses the embedded realesr-animevideov3 x4 model
(1.2 MB, BSD-3-Clause). Frames of equal size are batched and streamed: at most
``--chunk`` decoded frames are held in memory at a time.

Every mistake the user can fix (options, inputs, model file, output folder) is found
before any work where possible and answered with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch

from .cache import ModelCache
from .engine import PRECISIONS, UpscaleOptions, Upscaler
from .planning import OPTIMIZATION_LEVELS

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = Path(__file__).resolve().parent / "models" / "realesr-animevideov3-x4.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Output format -> (Pillow format, largest side the format can store, keeps an alpha channel).
FORMATS: dict[str, tuple[str, int, bool]] = {
    "png": ("PNG", 2**31 - 1, True),
    "jpg": ("JPEG", 65535, False),
    "webp": ("WEBP", 16383, True),
}
DEVICES = "cpu, cuda or cuda:N (N = GPU index, from 0)"
# Engine option names in its ValueError messages -> the CLI flag the user typed.
ENGINE_FLAGS = {
    "tile_size": "--tile",
    "overlap": "--overlap",
    "batch_size": "--batch",
    "precision": "--precision",
    "optimization_level": "--level",
}
PARTIAL_SUFFIX = ".part"

OUTPUT_HELP = """\
Output names: each image is written as OUTDIR/NAME.FORMAT (NAME = its file name without the
extension); a file of that name already there is replaced, a read-only one is refused. Inputs
that would get the same name keep their folders below the deepest folder they share
(a/x.png and b/x.png -> OUTDIR/a/x.png and OUTDIR/b/x.png); same-named images of one folder
keep their extension (x.png and x.jpg -> OUTDIR/x.png.png and OUTDIR/x.jpg.png). Each image
is written under a temporary name and renamed once complete, so a failed or interrupted run
never leaves a partial image, and a failed run removes the folders it created if it wrote nothing
in them. Transparency is kept in png/webp (alpha resized with bicubic), 16-bit images are read at full
range, EXIF orientation is applied, hidden files (.name) inside folders are skipped."""


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so the cleanup of a run happens as for Ctrl-C."""


class _Parser(argparse.ArgumentParser):
    """argparse that answers a bad option with one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ERROR {message} (see {self.prog} --help)\n")


def _path(text: str) -> Path:
    """A path argument; an empty one (an unset shell variable) would silently mean '.'."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?)")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    pack = __package__.rsplit(".", 1)[0] if __package__ and "." in __package__ else "ComfyUI-SpeedKit"
    parser = _Parser(prog=f"python -m {pack}", description="ComfyUI-SpeedKit tools")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "upscale",
        help="upscale images or folders of frames with a super-resolution model",
        description=__doc__.split("\n\n")[1],
        epilog=OUTPUT_HELP,
    )
    up.add_argument("inputs", nargs="+", type=_path, help="image files and/or folders of images")
    up.add_argument("-o", "--output", type=_path, required=True, help="output folder (created if missing)")
    up.add_argument("--model", type=_path, default=None, help=f"model file (default: embedded {EMBEDDED_MODEL.stem})")
    up.add_argument("--scale", type=float, default=None, help="final scale factor (default: the model's own)")
    up.add_argument("--precision", choices=PRECISIONS, default="auto", help="compute precision (default auto)")
    up.add_argument("--tile", type=int, default=0, help="tile size in input px, 0 = automatic (default)")
    up.add_argument("--overlap", type=int, default=0, help="tile overlap in input px, 0 = automatic (default)")
    up.add_argument("--batch", type=int, default=0, help="frames/tiles per model call, 0 = automatic")
    up.add_argument("--level", choices=OPTIMIZATION_LEVELS, default="balanced", help="VRAM use of automatic tiles")
    up.add_argument("--compile", action="store_true", help="torch.compile the model (worth it for many frames)")
    up.add_argument("--device", default=None, help=f"{DEVICES} (default: CUDA when present)")
    up.add_argument("--format", choices=tuple(FORMATS), default="png", help="output format (default png)")
    up.add_argument("--chunk", type=int, default=8, help="frames decoded and upscaled together (default 8)")
    up.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


# -- checks done before any model is loaded ---------------------------------------------------
def check_device(text: str | None) -> str | None:
    """The ``--device`` value normalised, or a one-line error (torch's own is a traceback)."""
    if text is None:
        return None
    name = text.strip().lower()
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise CliError(f"--device {text}: unknown device; use {DEVICES}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CliError(
                f"--device {text}: no CUDA device is available on this machine; "
                "use --device cpu or leave --device out (the CPU is then used)"
            )
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise CliError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return name


def check_options(args: argparse.Namespace) -> None:
    """Numbers argparse accepts but the run cannot use, named by their flag."""
    if args.scale is not None and not 0 < args.scale <= 16:  # also refuses NaN
        raise CliError(f"--scale {args.scale}: must be in (0, 16]")
    for flag, value in (("--tile", args.tile), ("--overlap", args.overlap), ("--batch", args.batch)):
        if value < 0:
            raise CliError(f"{flag} {value}: must be >= 0 (0 = automatic)")
    if args.chunk < 1:
        raise CliError(f"--chunk {args.chunk}: must be >= 1")
    args.device = check_device(args.device)


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly plus the images inside named folders (sorted), each once."""
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        if item.is_dir():
            try:
                entries = sorted(item.iterdir())
            except OSError as exc:
                raise CliError(f"{item}: cannot list the folder ({exc.strerror})") from exc
            # Hidden files are skipped: e.g. macOS "._x.png" sidecars are not images.
            found = [
                p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
            ]
            if not found:
                raise CliError(f"{item}: the folder holds no {'/'.join(IMAGE_SUFFIXES)} files")
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise CliError(f"{item}: not a supported image ({', '.join(IMAGE_SUFFIXES)})")
            found = [item]
        else:
            raise CliError(f"{item}: no such file or folder")
        for path in found:
            key = path.resolve()
            if key not in seen:  # the same file named twice (or via its folder) is upscaled once
                seen.add(key)
                files.append(path)
    return files


def probe_image(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header only, so a bad file is reported before any work."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as exc:  # unidentified, unreadable, decompression bomb: all the user's file
        raise CliError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if width < 1 or height < 1:
        raise CliError(f"{path}: the image is {width}x{height} pixels; there is nothing to upscale")
    return width, height


def _key(path: Path) -> str:
    """Comparison key of an output name: case-insensitive where the file system is (Windows)."""
    return os.path.normcase(os.path.normpath(str(path)))


def _clashes(names: Sequence[Path]) -> dict[str, list[int]]:
    """Output names given to more than one input -> the indices of those inputs."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(_key(name), []).append(i)
    return {k: v for k, v in groups.items() if len(v) > 1}


def plan_targets(files: Sequence[Path], output: Path, fmt: str) -> list[Path]:
    """Output path of each input: ``OUTDIR/NAME.FORMAT``, never two inputs on one file (see OUTPUT_HELP)."""
    names = [Path(f"{p.stem}.{fmt}") for p in files]
    for group in _clashes(names).values():
        parents = [Path(os.path.abspath(files[i])).parent for i in group]
        try:
            common = Path(os.path.commonpath([str(p) for p in parents]))
        except ValueError:  # different drives: keep each whole folder path below its drive
            common = None
        for i, parent in zip(group, parents, strict=True):
            rel = parent.relative_to(common) if common is not None else Path(*parent.parts[1:])
            names[i] = rel / names[i]
    for group in _clashes(names).values():  # same folder, same stem: keep the extension too
        for i in group:
            names[i] = names[i].parent / f"{files[i].name}.{fmt}"
    for group in _clashes(names).values():
        a, b = (files[i] for i in group[:2])
        raise CliError(f"-o/--output {output}: {a} and {b} would both be written as {output / names[group[0]]}")
    folders = {_key(parent) for name in names for parent in name.parents if parent != Path(".")}
    for i, name in enumerate(names):
        if _key(name) in folders:
            raise CliError(f"-o/--output {output}: {output / name} (from {files[i]}) is also needed as a folder")
    return [output / name for name in names]


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_output(output: Path, files: Sequence[Path], targets: Sequence[Path]) -> None:
    """Refuse an output folder that cannot be created or written, without touching the disk."""
    flag = f"-o/--output {output}"
    if output.exists() and not output.is_dir():
        raise CliError(f"{flag}: is a file, not a folder; give a folder (it is created if missing)")
    folders = {output} | {t.parent for t in targets}
    for folder in sorted(folders, key=lambda p: len(p.parts)):
        existing = folder
        while not (existing.exists() or existing.is_symlink()) and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise CliError(f"{flag}: cannot create {folder}: {existing} is a file, not a folder")
        if not _writable(existing):
            where = "the folder" if existing == folder else f"{existing}"
            raise CliError(f"{flag}: cannot write there: no write permission in {where}")
    sources = {p.resolve() for p in files}
    for src, target in zip(files, targets, strict=True):
        if target.is_dir():
            raise CliError(f"{flag}: cannot write {target} (for {src}): a folder of that name is in the way")
        if target.exists() and target.resolve() in sources:
            raise CliError(f"{flag}: writing {target} would replace the input {src}; choose another output folder")
        if target.exists() and not os.access(target, os.W_OK):
            raise CliError(f"{flag}: cannot replace {target}: the file is read-only")


def create_output(output: Path, targets: Sequence[Path]) -> list[Path]:
    """Create the output folders; returns those created (parents first) so a failed run can remove them."""
    created: list[Path] = []
    folders = sorted({output} | {t.parent for t in targets}, key=lambda p: len(p.parts))
    try:
        for folder in folders:
            missing = []
            probe = folder
            while not probe.is_dir():
                missing.append(probe)
                probe = probe.parent
            for path in reversed(missing):
                path.mkdir()
                created.append(path)
    except OSError as exc:
        remove_empty(created)
        raise CliError(f"-o/--output {output}: cannot create the folder ({exc.strerror}: {exc.filename})") from exc
    return created


def remove_empty(created: Sequence[Path]) -> None:
    """Remove the folders a failed run created, deepest first, where it left nothing in them."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: it holds finished images (or something another program put there)


# -- model --------------------------------------------------------------------------------------
def load_model(path: Path) -> ImageModelDescriptor:
    """Load a spandrel single-image model, with a one-line error for anything unusable."""
    from spandrel import ImageModelDescriptor, ModelLoader

    if path.is_dir():
        raise CliError(f"--model {path}: is a folder, not a model file (.pth or .safetensors)")
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
    if (model.input_channels, model.output_channels) != (3, 3):
        raise CliError(
            f"--model {path}: a {model.input_channels}-in/{model.output_channels}-out channel model; "
            "the command line reads and writes RGB images, so it needs a 3-channel model"
        )
    return model.eval()


def check_model_fit(
    args: argparse.Namespace, model: ImageModelDescriptor, sizes: Sequence[tuple[int, int]], files: Sequence[Path]
) -> None:
    """Option/model/image combinations that would fail mid-run, refused before any work."""
    floor = max(int(model.size_requirements.minimum), 1)
    if 0 < args.tile < floor:
        raise CliError(f"--tile {args.tile}: below the minimum {floor} px this model accepts; use 0 or >= {floor}")
    scale = args.scale if args.scale is not None else model.scale
    _pil, limit, _alpha = FORMATS[args.format]
    for (w, h), path in zip(sizes, files, strict=True):
        ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
        if max(ow, oh) > limit:
            raise CliError(
                f"--format {args.format}: {path} would be {ow}x{oh}, above the {limit} px per side "
                f"{args.format} can store; use --format png or a smaller --scale"
            )


def _engine_error(exc: ValueError, where: str = "") -> CliError:
    """An engine ValueError as a CliError naming the CLI flag instead of the engine's option name."""
    name, sep, rest = str(exc).partition(": ")
    text = f"{ENGINE_FLAGS[name]}: {rest}" if sep and name in ENGINE_FLAGS else str(exc)
    return CliError(f"{where}{text}")


# -- images -------------------------------------------------------------------------------------
def _has_alpha(im) -> bool:
    """Whether the file carries transparency (RGBA, LA, or a palette/RGB with a transparent colour)."""
    flag = getattr(im, "has_transparency_data", None)  # Pillow >= 10.1
    if flag is not None:
        return bool(flag)
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def read_image(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float RGB ``[H,W,3]`` in [0, 1] and alpha ``[H,W]`` (or None), oriented as a viewer shows it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as src:
            im = ImageOps.exif_transpose(src)
            alpha = None
            if im.mode.startswith("I") or im.mode == "F":
                # 16/32-bit grey: convert("RGB") would clip every value above 255 to white.
                peak = 1.0 if im.mode == "F" else 65535.0
                grey = np.clip(np.asarray(im, dtype=np.float32) / peak, 0.0, 1.0)
                rgb = np.repeat(grey[..., None], 3, axis=2)
            elif _has_alpha(im):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
                rgb, alpha = rgba[..., :3], rgba[..., 3]
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as exc:  # truncated or corrupt data found while decoding
        raise CliError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(rgb)), None if alpha is None else torch.from_numpy(alpha.copy())


def write_image(frame: torch.Tensor, alpha: torch.Tensor | None, path: Path, fmt: str) -> None:
    """Encode to a temporary name next to ``path`` and rename it, so no partial image ever has its name."""
    from PIL import Image

    arr = frame.clamp(0, 1).mul(255.0).round_().to(torch.uint8).numpy()
    if alpha is not None:
        a = alpha.clamp(0, 1).mul(255.0).round_().to(torch.uint8).numpy()
        arr = np.concatenate([arr, a[..., None]], axis=2)
    pil_format = FORMATS[fmt][0]
    options = {"compress_level": 1} if pil_format == "PNG" else {"quality": 95}
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        Image.fromarray(arr).save(tmp, format=pil_format, **options)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, ValueError)):  # disk full, permissions changed, encoder limits
            raise CliError(f"-o/--output {path.parent}: cannot write {path.name} ({exc})") from exc
        raise


def _chunks(files: list[Path], size: int) -> Iterator[tuple[list[int], torch.Tensor, list[torch.Tensor | None]]]:
    """Consecutive files of equal image size, at most ``size`` at a time, decoded (indices, RGB, alphas)."""
    group: list[int] = []
    frames: list[torch.Tensor] = []
    alphas: list[torch.Tensor | None] = []
    for index, path in enumerate(files):
        img, alpha = read_image(path)
        if frames and (img.shape != frames[0].shape or len(frames) >= size):
            yield group, torch.stack(frames), alphas
            group, frames, alphas = [], [], []
        group.append(index)
        frames.append(img)
        alphas.append(alpha)
    if frames:
        yield group, torch.stack(frames), alphas


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


# -- the run ------------------------------------------------------------------------------------
def run_upscale(args: argparse.Namespace) -> int:
    """The ``upscale`` command. Everything checkable without the model is checked first, and
    nothing on disk changes until the model is loaded and every check has passed."""
    check_options(args)
    files = collect_inputs(args.inputs)
    sizes = [probe_image(path) for path in files]
    targets = plan_targets(files, args.output, args.format)
    check_output(args.output, files, targets)
    model_path = args.model or EMBEDDED_MODEL
    model = load_model(model_path)
    check_model_fit(args, model, sizes, files)
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
        raise _engine_error(exc) from exc
    created = create_output(args.output, targets)
    try:
        _process(args, model_path, model, upscaler, files, targets)
    except BaseException:
        remove_empty(created)  # only folders left empty go: finished images stay
        raise
    logger.info("done: %d image(s) written to %s", len(files), args.output)
    return 0


def _process(
    args: argparse.Namespace,
    model_path: Path,
    model: ImageModelDescriptor,
    upscaler: Upscaler,
    files: list[Path],
    targets: list[Path],
) -> None:
    """Upscale every file in chunks and save each frame on a small pool of encoder threads."""
    logger.info("upscaling %d image(s) with %s (x%d) -> %s", len(files), model_path.name, model.scale, args.output)
    keeps_alpha = FORMATS[args.format][2]
    warned_alpha = False
    progress = _Progress(len(files), args.quiet)
    pending: list[Future] = []
    saver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="speedkit-save")
    try:
        for group, frames, alphas in _chunks(files, args.chunk):
            try:
                out, _report = upscaler.upscale(frames)
            except ValueError as exc:
                raise _engine_error(exc, f"{files[group[0]]}: ") from exc
            if args.scale is not None and args.scale != model.scale:
                h, w = frames.shape[1:3]
                out = _resize(out, max(1, round(h * args.scale)), max(1, round(w * args.scale)))
            oh, ow = out.shape[1:3]
            for index, frame, alpha in zip(group, out, alphas, strict=True):
                if alpha is not None and not keeps_alpha:
                    if not warned_alpha:
                        fix = "use --format png or webp to keep it"
                        logger.warning(
                            "%s: %s has no alpha channel; transparency dropped (%s)", files[index], args.format, fix
                        )
                        warned_alpha = True
                    alpha = None
                if alpha is not None:
                    alpha = _resize(alpha[None, :, :, None], oh, ow)[0, :, :, 0]
                pending.append(saver.submit(write_image, frame, alpha, targets[index], args.format))
            progress.update(len(group))
            # Keep the number of frames waiting to be encoded bounded.
            while len(pending) > 2 * args.chunk:
                pending.pop(0).result()
        for fut in pending:
            fut.result()
    finally:
        # On failure, frames not yet being encoded are dropped; those being encoded finish and
        # are renamed complete (write_image never leaves a partial file under the final name).
        saver.shutdown(wait=True, cancel_futures=True)
        progress.close()


def _on_sigterm(signum: int, _frame) -> None:
    raise _Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    # The program's own logging: our messages on stderr (library code never configures logging).
    root = logging.getLogger(__package__.rsplit(".", 1)[0] if __package__ else __name__)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        if args.command == "upscale":
            return run_upscale(args)
        return 2
    except CliError as exc:
        logger.error("%s", " ".join(str(exc).split()))  # one line, whatever a library put in the text
        return 2
    except (KeyboardInterrupt, _Terminated) as exc:
        logger.error("interrupted: the images finished so far are kept; none is left half-written")
        return 128 + (signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        root.removeHandler(handler)
