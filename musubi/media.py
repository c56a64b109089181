"""Frames in and out: generated PNG folders, animated WebP/GIF (Pillow), MP4/WebM (PyAV if installed)."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

VIDEO_FORMATS = ("webp", "gif", "mp4", "webm")
PILLOW_FORMATS = ("webp", "gif")
PILLOW_INPUTS = (".gif", ".webp", ".png", ".jpg", ".jpeg")
RANGE_SLACK = 0.25
"""How far frames may stray outside 0..1 and still be clamped: resamplers and VAEs overshoot a
little, but a frame at -1..1 or 0..255 is another value range, not noise, and saves as garbage."""


def check_frames(frames: np.ndarray, name: str = "frames") -> None:
    """Refuse a float IMAGE batch [T, H, W, 3] that cannot be saved as it is meant.

    NaN/Inf would turn into arbitrary colours when cast to uint8 (silently); an empty batch,
    another layout or channel count, or values in another range (-1..1, 0..255) are mistakes
    upstream. The error names the input, the first bad frame and the fix.
    """
    if frames.ndim != 4:
        raise ValueError(
            f"{name}: expected an IMAGE batch [frames, height, width, 3], got shape {tuple(frames.shape)}; "
            "connect an IMAGE output (e.g. a generate or VAE Decode node)"
        )
    count, height, width, channels = frames.shape
    if count == 0 or height == 0 or width == 0:
        raise ValueError(
            f"{name}: the batch is empty (shape {tuple(frames.shape)}): the node before it produced no frames; "
            "check that node's inputs (e.g. a frame range past the end of the video)"
        )
    if channels != 3:
        hint = "drop the alpha channel first (e.g. Split Image with Alpha)" if channels == 4 else "convert it to RGB"
        raise ValueError(f"{name}: {channels} channels per pixel, need 3 (RGB): {hint}")
    flat = frames.reshape(count, -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        kinds = " and ".join(
            k for k, bad in (("NaN", np.isnan(flat[i]).any()), ("Inf", np.isinf(flat[i]).any())) if bad
        )
        raise ValueError(
            f"{name}: frame {i} (of {count}) has {kinds} values; the model or node that made it diverged "
            "(often fp16 overflow or a NaN LoRA): fix it upstream, e.g. run the VAE/model in bf16 or fp32"
        )
    low, high = float(flat.min()), float(flat.max())
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        mins, maxs = flat.min(axis=1), flat.max(axis=1)
        i = int(np.flatnonzero((mins < -RANGE_SLACK) | (maxs > 1 + RANGE_SLACK))[0])
        if high > 2:
            fix = "they look like 0..255 values: divide them by 255 before saving"
        elif low < -0.5:
            fix = "they look like -1..1 values: map them to 0..1 with (x + 1) / 2 before saving"
        else:
            fix = "bring them into 0..1 before saving"
        raise ValueError(
            f"{name}: frame {i} (of {count}) has values from {float(mins[i]):.4g} to {float(maxs[i]):.4g}, far "
            f"outside 0..1; {fix}"
        )


def frames_to_uint8(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    """Float frames in 0..1 [T, H, W, 3] -> uint8, after :func:`check_frames`."""
    check_frames(frames, name)
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def collect_frames(folder: str | os.PathLike) -> list[Path]:
    """PNG frames a generate script wrote under ``folder`` (sorted by path = frame order)."""
    return sorted(Path(folder).rglob("*.png"))


def load_images(paths: list[Path]) -> np.ndarray:
    """Frames as uint8 [T, H, W, 3]; all must share one size."""
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    if not frames:
        raise ValueError("no frames to load")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"frames differ in size {sorted(shapes)}: cannot stack them into one batch")
    return np.stack(frames)


def has_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


def _not_readable(name: str, path: Path, why: object) -> ValueError:
    kind = "GIF/WebP/PNG/JPG" if path.suffix.lower() in PILLOW_INPUTS else "video"
    return ValueError(
        f"{name}: {str(path)!r} is not a readable {kind} file ({why}); it may be another file type with a "
        f"{path.suffix or 'missing'} extension, or cut short: open it in a player to check, then re-export or "
        "re-download it, or pick another file"
    )


def read_video(
    path: str | os.PathLike, stride: int = 1, max_frames: int = 0, start: int = 0, name: str = "video_path"
) -> tuple[np.ndarray, float]:
    """Decode ``path`` into uint8 frames [T, H, W, 3] and its fps.

    GIF/WebP/PNG/JPG work with Pillow alone; MP4/WebM/MOV/MKV need PyAV (``pip install av``).
    ``stride`` keeps every n-th frame, ``max_frames`` (0 = all) caps the count after the stride.
    ``name`` is the node input (or dataset item) the path came from; every error starts with it.
    """
    p = Path(path)
    if not os.fspath(path).strip():
        raise ValueError(f"{name} is empty: give the path of a video file (GIF/WebP need nothing extra)")
    if not p.is_file():
        raise ValueError(f"{name}: video {str(p)!r} does not exist: check the path")
    if stride < 1:
        raise ValueError(f"frame_stride={stride} must be >= 1")
    frames: list[np.ndarray] = []
    fps = 0.0
    keep = lambda i: i >= start and (i - start) % stride == 0  # noqa: E731
    full = lambda: max_frames > 0 and len(frames) >= max_frames  # noqa: E731
    if p.suffix.lower() in PILLOW_INPUTS:
        try:
            with Image.open(p) as img:
                for i, frame in enumerate(ImageSequence.Iterator(img)):
                    if i == 0:
                        frame.load()  # WebP fills in "duration" only once the frame is decoded
                        duration = frame.info.get("duration") or img.info.get("duration") or 0
                        fps = 1000.0 / duration if duration else 0.0
                    if keep(i):
                        frames.append(np.asarray(frame.convert("RGB")))
                    if full():
                        break
        except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as exc:  # Pillow's "truncated"/"broken"
            raise _not_readable(name, p, exc) from exc
    else:
        if not has_pyav():
            raise ValueError(
                f"{name}: reading {p.suffix} needs PyAV: `pip install av` in ComfyUI's Python, or convert the video "
                "to GIF/WebP"
            )
        import av

        try:
            with av.open(str(p)) as container:
                if not container.streams.video:
                    raise _not_readable(name, p, "it holds no video stream")
                stream = container.streams.video[0]
                fps = float(stream.average_rate or 0)
                for i, frame in enumerate(container.decode(stream)):
                    if keep(i):
                        frames.append(frame.to_ndarray(format="rgb24"))
                    if full():
                        break
        except av.error.FFmpegError as exc:  # InvalidDataError for a text file named .mp4, EOF for a cut one
            raise _not_readable(name, p, f"FFmpeg: {exc.strerror or exc}") from exc
        except OSError as exc:
            raise _not_readable(name, p, exc) from exc
    if not frames:
        raise ValueError(f"{name}: video {str(p)!r} has no frames from frame {start} on: lower start_frame")
    return np.stack(frames), fps / stride if fps else 0.0


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float, fmt: str, quality: int = 90) -> Path:
    """Save uint8 frames [T, H, W, 3] as ``fmt`` (webp/gif need only Pillow; mp4/webm need PyAV).

    The file is written under a temporary name and renamed when complete: an encoder error
    never leaves a half-written video under the final name.
    """
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"format={fmt!r} must be one of {VIDEO_FORMATS}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("frames: the batch is empty: there is nothing to save")
    if not math.isfinite(float(fps)) or fps <= 0:
        raise ValueError(f"fps: {fps} must be a finite number > 0, e.g. 16")
    p = Path(path).with_suffix("." + fmt)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.writing.{fmt}")
    try:
        _encode(frames, tmp, fps, fmt, quality)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return p


def _encode(frames: np.ndarray, p: Path, fps: float, fmt: str, quality: int) -> None:
    """Encode to ``p`` with the format given explicitly (``p`` is a temporary name, its suffix not the format's)."""
    if fmt in PILLOW_FORMATS:
        images = [Image.fromarray(f) for f in frames]
        kwargs = {"lossless": quality >= 100, "quality": quality} if fmt == "webp" else {"optimize": False}
        images[0].save(
            p, format=fmt.upper(), save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
            loop=0, **kwargs,
        )  # fmt: skip
        return
    if not has_pyav():
        raise ValueError(f"saving {fmt} needs PyAV (`pip install av`); animated webp or gif work without it")
    import av

    codec = {"mp4": "libx264", "webm": "libvpx-vp9"}[fmt]
    h, w = frames.shape[1:3]
    if fmt == "mp4":
        # H.264 in 4:2:0 needs even sides: drop the last row/column (VP9 encodes odd sizes as they are)
        if h < 2 or w < 2:
            raise ValueError(f"MP4 needs frames of at least 2x2 pixels, got {w}x{h}: use webm, webp or gif")
        frames = frames[:, : h - h % 2, : w - w % 2]
    from fractions import Fraction

    with av.open(str(p), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(round(51 - quality * 0.41)))}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
