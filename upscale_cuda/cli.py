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
import difflib
import logging
import math
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch

from ..torch_utils import host_available_bytes, round_up
from .cache import ModelCache
from .console import Console, ConsoleHandler, Progress
from .engine import PRECISIONS, UpscaleOptions, Upscaler
from .planning import MEMORY_SHARE, MIN_TILE, OPTIMIZATION_LEVELS

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = Path(__file__).resolve().parent / "models" / "realesr-animevideov3-x4.safetensors"
# The embedded model is trained on anime/cartoon frames; photos need a photographic model.
PHOTO_MODEL = "RealESRGAN_x4plus.pth"
PHOTO_MODEL_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth"
PHOTO_HINT = f"for photos use a photographic model: --model {PHOTO_MODEL} (download: {PHOTO_MODEL_URL})"
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
DEFAULT_CHUNK = 8
# Options people type from other tools -> what this command calls them.
OPTION_HINTS = {
    "--tile-size": "--tile",
    "--tile_size": "--tile",
    "--batch-size": "--batch",
    "--batch_size": "--batch",
    "--out": "-o",
    "--outdir": "-o",
    "--output-dir": "-o",
    "--fp16": "--precision fp16",
    "--half": "--precision fp16",
    "--bf16": "--precision bf16",
    "--fp32": "--precision fp32",
    "--cpu": "--device cpu",
    "--gpu": "--device cuda",
    "--cuda": "--device cuda",
    "--outscale": "--scale",
    "--model-path": "--model",
    "--model_path": "--model",
}

EXAMPLES = f"""\
examples:
  {{prog}} frame.png frames/ -o out/
      anime, cartoons, game frames: the embedded realesr-animevideov3 x4 model
  {{prog}} photo.jpg -o out/ --model {PHOTO_MODEL}
      photographs: a photographic model ({PHOTO_MODEL_URL};
      a bare file name is also looked up in ComfyUI/models/upscale_models/)
  {{prog}} frames/ -o out/ --scale 2 --format jpg
      x2 JPEG frames (the model's x4 result resized)
  {{prog}} big.png -o out/ --device cpu --tile 256 --batch 1
      no GPU, small tiles and one tile per call (less memory)
"""

OUTPUT_HELP = """\
Output names: each image is written as OUTDIR/NAME.FORMAT (NAME = its file name without the
extension); a file of that name already there is replaced, a read-only one is refused. Inputs
that would get the same name keep their folders below the deepest folder they share
(a/x.png and b/x.png -> OUTDIR/a/x.png and OUTDIR/b/x.png); same-named images of one folder
keep their extension (x.png and x.jpg -> OUTDIR/x.png.png and OUTDIR/x.jpg.png); the log says
which inputs were renamed, and how many existing files were replaced. Each image
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

    hint_options: Sequence[str] = ()  # the upscale command's options, for "did you mean"

    def error(self, message: str) -> NoReturn:
        hint = _option_hint(message, self.hint_options)
        # Unknown options of ``upscale`` are reported by the top-level parser: point to upscale's help.
        prog = f"{self.prog} upscale" if self.hint_options and message.startswith("unrecognized") else self.prog
        text = " ".join(f"{message}{hint} (see {prog} --help)".split())  # one line
        self.exit(2, f"ERROR {text}\n")


def _option_hint(message: str, known: Sequence[str]) -> str:
    """'; did you mean --precision?' for an unrecognised option close to a known one."""
    if not message.startswith("unrecognized arguments:") or not known:
        return ""
    for word in message.split(":", 1)[1].split():
        if not word.startswith("-"):
            continue
        name = word.split("=", 1)[0]
        guess = OPTION_HINTS.get(name.lower()) or next(iter(difflib.get_close_matches(name, known, n=1)), None)
        if guess:
            return f"; {name} is not an option of this command, did you mean {guess}?"
    return ""


def _path(text: str) -> Path:
    """A path argument; an empty one (an unset shell variable) would silently mean '.'."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?)")
    return Path(text)


def _whole(what: str) -> Callable[[str], int]:
    """An integer option; anything else is named with what the number means."""

    def parse(text: str) -> int:
        try:
            return int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None

    return parse


def _number(what: str) -> Callable[[str], float]:
    """A finite decimal option (NaN and infinity are refused here, with the fix)."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give {what}")
        return value

    return parse


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    """Case-insensitive choice (``--format JPG`` means jpg)."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    pack = __package__.rsplit(".", 1)[0] if __package__ and "." in __package__ else "ComfyUI-SpeedKit"
    parser = _Parser(prog=f"python -m {pack}", description="ComfyUI-SpeedKit tools")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    prog = f"python -m {pack} upscale"
    up = sub.add_parser(
        "upscale",
        help="upscale images or folders of frames with a super-resolution model",
        description=__doc__.split("\n\n")[1],
        epilog=EXAMPLES.format(prog=prog) + "\n" + OUTPUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tile_what = "a tile size in input px, 0 = automatic"
    up.add_argument("inputs", nargs="+", type=_path, help="image files and/or folders of images")
    up.add_argument("-o", "--output", type=_path, required=True, help="output folder (created if missing)")
    up.add_argument(
        "--model",
        type=_path,
        default=None,
        help=f"model file, .pth or .safetensors (default: the embedded {EMBEDDED_MODEL.stem}, made for anime and "
        f"cartoons; for photos use a photographic model such as {PHOTO_MODEL}). A bare file name is also looked "
        "up in ComfyUI/models/upscale_models/",
    )
    up.add_argument(
        "--scale", type=_number("a factor such as 2 or 1.5"), default=None, help="final scale (default: the model's)"
    )
    up.add_argument(
        "--precision",
        "--dtype",
        type=_choice(PRECISIONS),
        default="auto",
        help="compute precision: auto, fp16, bf16, fp32",
    )
    up.add_argument("--tile", type=_whole(tile_what), default=0, help="tile size in input px, 0 = automatic (default)")
    up.add_argument(
        "--overlap", type=_whole("an overlap in input px, 0 = automatic"), default=0, help="tile overlap, 0 = automatic"
    )
    up.add_argument(
        "--batch", type=_whole("frames/tiles per call, 0 = automatic"), default=0, help="frames/tiles per model call"
    )
    up.add_argument(
        "--level", type=_choice(OPTIMIZATION_LEVELS), default="balanced", help="memory use of automatic tiles/batches"
    )
    up.add_argument("--compile", action="store_true", help="torch.compile the model (worth it for many frames)")
    up.add_argument("--device", default=None, help=f"{DEVICES} (default: CUDA when present)")
    up.add_argument("--format", type=_choice(tuple(FORMATS)), default="png", help="output format: png, jpg, webp")
    up.add_argument(
        "--chunk",
        type=_whole("a number of frames, at least 1"),
        default=None,
        help=f"frames decoded and upscaled together (default {DEFAULT_CHUNK}; fewer when memory is short)",
    )
    up.add_argument("--quiet", action="store_true", help="no progress line, warnings only")
    parser.hint_options = [o for action in up._actions for o in action.option_strings]
    return parser


# -- checks done before any model is loaded ---------------------------------------------------
def check_device(text: str | None) -> str | None:
    """The ``--device`` value normalised, or a one-line error (torch's own is a traceback)."""
    if text is None:
        return None
    name = text.strip().lower()
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise CliError(f"--device {text or repr(text)}: unknown device; use {DEVICES}")
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
        raise CliError(f"--scale {args.scale}: must be in (0, 16]; e.g. --scale 2, or leave it out for the model's")
    for flag, value in (("--tile", args.tile), ("--overlap", args.overlap), ("--batch", args.batch)):
        if value < 0:
            raise CliError(f"{flag} {value}: must be >= 0 (0 = automatic)")
    if args.chunk is not None and args.chunk < 1:
        raise CliError(f"--chunk {args.chunk}: must be >= 1 (default {DEFAULT_CHUNK})")
    args.device = check_device(args.device)


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly plus the images inside named folders (sorted), each once."""
    files: list[Path] = []
    seen: set[Path] = set()
    repeats = 0
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
        elif item.is_symlink() and not item.exists():
            raise CliError(
                f"{item}: a symbolic link to nothing (or to itself); give the image or folder it should name"
            )
        elif item.exists():
            raise CliError(f"{item}: not a file or folder (a device, pipe or socket); give image files or folders")
        else:
            raise CliError(f"{item}: no such file or folder")
        for path in found:
            key = path.resolve()
            if key not in seen:  # the same file named twice (or via its folder) is upscaled once
                seen.add(key)
                files.append(path)
            else:
                repeats += 1
    if repeats:
        logger.info("%d input(s) named more than once (directly and/or through a folder): each upscaled once", repeats)
    return files


def probe_image(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the header only, so a bad file is reported before any work."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns (a multi-line Python warning) above ~89 MP; whether such an image
            # fits in memory is checked by this command itself (check_memory).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Exception as exc:  # unidentified, unreadable, decompression bomb: all the user's file
        raise CliError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if width < 1 or height < 1:
        raise CliError(f"{path}: the image is {width}x{height} pixels; there is nothing to upscale")
    return width, height


def _key(path: Path) -> str:
    """Comparison key of an output name: case-insensitive where the file system is (Windows)."""
    key = os.path.normcase(os.path.normpath(str(path)))
    return key.casefold() if sys.platform == "darwin" else key  # macOS file systems ignore case too


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
    renamed = [i for i, (p, name) in enumerate(zip(files, names, strict=True)) if name != Path(f"{p.stem}.{fmt}")]
    if renamed:
        first = renamed[0]
        logger.info(
            "%d input(s) share a file name with another input, so they keep their folder (or extension) "
            "in the output instead of overwriting each other, e.g. %s -> %s",
            len(renamed), files[first], output / names[first],
        )  # fmt: skip
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
        if existing.is_symlink() and not existing.exists():
            raise CliError(f"{flag}: cannot create {folder}: {existing} is a symbolic link to nothing; remove it")
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
def comfy_models_folder() -> Path:
    """``ComfyUI/models/upscale_models`` of the ComfyUI this pack sits in (``custom_nodes/<pack>``).

    The path the pack was imported by is used, not the resolved one, so a pack linked into
    ``custom_nodes`` finds the models of that ComfyUI.
    """
    return Path(os.path.abspath(__file__)).parents[3] / "models" / "upscale_models"


def find_model(path: Path) -> Path:
    """``path`` itself, or for a bare file name (with or without extension) that file in
    ComfyUI's upscale_models folder; a one-line error saying where it looked otherwise."""
    flag = f"--model {path}"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", str(path)):  # https://... (a Path keeps one slash)
        raise CliError(f"{flag}: a web address; download the file first and give its path (e.g. {PHOTO_MODEL_URL})")
    if path.is_dir():
        raise CliError(f"{flag}: is a folder, not a model file (.pth or .safetensors)")
    if path.is_file():
        return path
    folder = comfy_models_folder()
    looked = ""
    if len(path.parts) == 1 and folder.is_dir():
        for name in (path.name, f"{path.name}.pth", f"{path.name}.safetensors"):
            if (folder / name).is_file():
                logger.info("--model %s: using %s", path, folder / name)
                return folder / name
        looked = f" (nor in {folder})"
    if path.is_symlink():
        raise CliError(f"{flag}: a symbolic link to nothing; give the model file itself")
    raise CliError(f"{flag}: no such file{looked}; give the path of a .pth/.safetensors file ({PHOTO_HINT})")


def load_model(path: Path) -> ImageModelDescriptor:
    """Load a spandrel single-image model, with a one-line error for anything unusable.

    Pickled ``.pth`` files are read by spandrel's restricted unpickler, which loads tensors and
    refuses any other Python object, so a hostile file is an error here, never code that runs.
    """
    from spandrel import ImageModelDescriptor, ModelLoader

    path = find_model(path)
    flag = f"--model {path}"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"{flag}: cannot read it ({exc.strerror})") from exc
    if size == 0:
        raise CliError(f"{flag}: the file is empty (0 bytes; an interrupted download?); download it again")
    if not os.access(path, os.R_OK):
        raise CliError(f"{flag}: no permission to read the file")
    try:
        model = ModelLoader().load_from_file(str(path))
    except Exception as exc:  # corrupt, truncated, hostile pickle or unknown architecture: all user-fixable
        why = str(exc).strip() or "not a known super-resolution architecture"
        raise CliError(
            f"{flag}: cannot load it ({type(exc).__name__}: {why[:200]}); "
            "use an ESRGAN/Real-ESRGAN/Compact/SPAN/SwinIR... .pth or .safetensors file"
        ) from exc
    if not isinstance(model, ImageModelDescriptor):
        raise CliError(f"{flag}: {type(model).__name__} is not a single-image upscale model")
    if (model.input_channels, model.output_channels) != (3, 3):
        raise CliError(
            f"{flag}: a {model.input_channels}-in/{model.output_channels}-out channel model; "
            "the command line reads and writes RGB images, so it needs a 3-channel model"
        )
    return model.eval()


def smallest_tile(model: ImageModelDescriptor) -> int:
    """Smallest ``--tile`` worth running: the architecture's minimum, and at least MIN_TILE px
    (smaller tiles are mostly overlap: thousands of calls for one image)."""
    req = model.size_requirements
    return round_up(max(MIN_TILE, int(req.minimum)), max(int(req.multiple_of), 1))


def check_model_fit(
    args: argparse.Namespace, model: ImageModelDescriptor, sizes: Sequence[tuple[int, int]], files: Sequence[Path]
) -> None:
    """Option/model/image combinations that would fail mid-run, refused (or adjusted) before any work."""
    floor = smallest_tile(model)
    if 0 < args.tile < floor:
        logger.warning(
            "--tile %d: below the smallest tile for this %s model (%d px); using --tile %d",
            args.tile, model.architecture.name, floor, floor,
        )  # fmt: skip
        args.tile = floor
    scale = args.scale if args.scale is not None else model.scale
    _pil, limit, _alpha = FORMATS[args.format]
    for (w, h), path in zip(sizes, files, strict=True):
        ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
        if max(ow, oh) > limit:
            raise CliError(
                f"--format {args.format}: {path} would be {ow}x{oh}, above the {limit} px per side "
                f"{args.format} can store; use --format png or a smaller --scale"
            )


def frame_bytes(
    size: tuple[int, int], model_scale: int, scale: float | None, on_cpu: bool, encoders: int = 4
) -> tuple[int, int]:
    """Host bytes ``(per frame in a chunk, once per run)`` of upscaling one ``(w, h)`` image.

    Per frame: the decoded input, the engine's fp32 output, the resized result with ``--scale``.
    Once: the engine's fp32 accumulators on the CPU, and the 8-bit copies of the (at most
    ``encoders``) frames being encoded.
    """
    w, h = size
    out_px = w * h * model_scale**2
    final_px = max(1, round(w * scale)) * max(1, round(h * scale)) if scale is not None else out_px
    per_frame = w * h * 16 + out_px * 12 + (final_px * 16 if scale is not None and scale != model_scale else 0)
    once = (out_px * 16 if on_cpu else 0) + encoders * final_px * 4
    return per_frame, once


def check_memory(
    args: argparse.Namespace,
    model: ImageModelDescriptor,
    sizes: Sequence[tuple[int, int]],
    files: Sequence[Path],
    device: torch.device,
) -> int:
    """Frames per chunk that fit in the host memory; an image that cannot fit at all is refused.

    On the CPU running out of memory gets the process killed, with no message: so the
    chunk an explicit ``--chunk`` asks for is reduced (logged), never attempted.
    """
    on_cpu = device.type == "cpu"
    avail = host_available_bytes()
    budget = avail * MEMORY_SHARE[args.level]
    worst, worst_i = (0, 0), 0
    for i, size in enumerate(sizes):
        per_frame, once = frame_bytes(size, model.scale, args.scale, on_cpu, encoders=min(4, len(files)))
        if per_frame + once > sum(worst):
            worst, worst_i = (per_frame, once), i
        if per_frame + once > avail:
            w, h = size
            raise CliError(
                f"{files[i]}: {w}x{h} upscaled x{model.scale} needs about {(per_frame + once) / 1e9:.1f} GB of memory, "
                f"but only {avail / 1e9:.1f} GB are available; upscale a smaller image (or crop it) or close other programs"
            )
    per_frame, once = worst
    # Two chunks can be alive at once: one being upscaled, one still being encoded.
    fit = max(1, int((budget - once) // (2 * per_frame)))
    wanted = args.chunk if args.chunk is not None else DEFAULT_CHUNK
    chunk = min(wanted, fit)
    if chunk < min(wanted, len(files)):
        w, h = sizes[worst_i]
        log = logger.warning if args.chunk is not None else logger.info
        log(
            "--chunk %d: %d frames of %dx%d need about %.1f GB of host memory, %.1f GB are available; using --chunk %d",
            wanted, wanted, w, h, (2 * wanted * per_frame + once) / 1e9, avail / 1e9, chunk,
        )  # fmt: skip
    return chunk


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


# -- the run ------------------------------------------------------------------------------------
def run_upscale(args: argparse.Namespace, console: Console | None = None) -> int:
    """The ``upscale`` command. Everything checkable without the model is checked first, and
    nothing on disk changes until the model is loaded and every check has passed."""
    check_options(args)
    files = collect_inputs(args.inputs)
    sizes = [probe_image(path) for path in files]
    targets = plan_targets(files, args.output, args.format)
    check_output(args.output, files, targets)
    model_path = find_model(args.model) if args.model is not None else EMBEDDED_MODEL
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
    args.chunk = check_memory(args, model, sizes, files, upscaler.device)
    if args.model is None:
        logger.info("model: the embedded %s, made for anime and cartoons; %s", EMBEDDED_MODEL.stem, PHOTO_HINT)
    replaced = sum(1 for t in targets if t.exists())
    created = create_output(args.output, targets)
    try:
        written = _process(args, model_path, model, upscaler, files, targets, console or Console(sys.stderr))
    except BaseException:
        remove_empty(created)  # only folders left empty go: finished images stay
        raise
    extra = f", {replaced} existing file(s) replaced" if replaced else ""
    logger.info("done: %d image(s) written to %s%s", written, args.output, extra)
    return 0


def _process(
    args: argparse.Namespace,
    model_path: Path,
    model: ImageModelDescriptor,
    upscaler: Upscaler,
    files: list[Path],
    targets: list[Path],
    console: Console,
) -> int:
    """Upscale every file in chunks and save each frame on a small pool of encoder threads;
    returns the number of images written."""
    logger.info("upscaling %d image(s) with %s (x%d) -> %s", len(files), model_path.name, model.scale, args.output)
    keeps_alpha = FORMATS[args.format][2]
    warned_alpha = False
    progress = Progress(console, len(files), enabled=not args.quiet)
    pending: list[Future] = []
    written = 0
    saver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="speedkit-save")
    try:
        for group, frames, alphas in _chunks(files, args.chunk):
            try:
                out, _report = upscaler.upscale(frames)
            except ValueError as exc:
                raise _engine_error(exc, f"{files[group[0]]}: ") from exc
            del frames
            if args.scale is not None and args.scale != model.scale:
                h, w = out.shape[1] // model.scale, out.shape[2] // model.scale
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
            del out
            progress.update(len(group))
            # At most one chunk waits to be encoded while the next is upscaled (see check_memory).
            while len(pending) > args.chunk:
                pending.pop(0).result()
                written += 1
        for fut in pending:
            fut.result()
            written += 1
        pending.clear()
    finally:
        # On failure, frames not yet being encoded are dropped; those being encoded finish and
        # are renamed complete (write_image never leaves a partial file under the final name).
        saver.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return written


class _CliFormatter(logging.Formatter):
    """``LEVEL message`` on one line; the engine's option names become this command's flags."""

    _ENGINE_NAMES = re.compile(r"\b(tile_size|batch_size|overlap) (\d+)")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and record.name.endswith(".engine"):
            text = self._ENGINE_NAMES.sub(lambda m: f"{ENGINE_FLAGS[m.group(1)]} {m.group(2)}", text)
        return " ".join(text.split()) if record.levelno >= logging.ERROR else text


class _FirstReportOnly(logging.Filter):
    """The engine logs a report per call (one per chunk here): keep the first, the rest is noise."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.endswith(".engine") and record.msg == "upscale: %s":
            if self.seen:
                return False
            self.seen = True
        return True


def _on_sigterm(signum: int, _frame) -> None:
    raise _Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    # The program's own logging: our messages on stderr (library code never configures logging).
    root = logging.getLogger(__package__.rsplit(".", 1)[0] if __package__ else __name__)
    console = Console(sys.stderr)
    handler = ConsoleHandler(console)
    handler.setFormatter(_CliFormatter("%(levelname)s %(message)s"))
    handler.addFilter(_FirstReportOnly())
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        if args.command == "upscale":
            return run_upscale(args, console)
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
        root.setLevel(previous_level)
