"""Frames in and out: generated PNG folders, animated WebP/GIF (Pillow), MP4/WebM (PyAV if installed)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

VIDEO_FORMATS = ("webp", "gif", "mp4", "webm")
PILLOW_FORMATS = ("webp", "gif")


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


def read_video(
    path: str | os.PathLike, stride: int = 1, max_frames: int = 0, start: int = 0
) -> tuple[np.ndarray, float]:
    """Decode ``path`` into uint8 frames [T, H, W, 3] and its fps.

    GIF/WebP/PNG/JPG work with Pillow alone; MP4/WebM/MOV/MKV need PyAV (``pip install av``).
    ``stride`` keeps every n-th frame, ``max_frames`` (0 = all) caps the count after the stride.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"video {str(p)!r} does not exist: check the path")
    if stride < 1:
        raise ValueError(f"frame_stride={stride} must be >= 1")
    frames: list[np.ndarray] = []
    fps = 0.0
    keep = lambda i: i >= start and (i - start) % stride == 0  # noqa: E731
    full = lambda: max_frames > 0 and len(frames) >= max_frames  # noqa: E731
    if p.suffix.lower() in (".gif", ".webp", ".png", ".jpg", ".jpeg"):
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
    else:
        if not has_pyav():
            raise ValueError(
                f"reading {p.suffix} needs PyAV: `pip install av` in ComfyUI's Python, or convert the video to GIF/WebP"
            )
        import av

        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            for i, frame in enumerate(container.decode(stream)):
                if keep(i):
                    frames.append(frame.to_ndarray(format="rgb24"))
                if full():
                    break
    if not frames:
        raise ValueError(f"video {str(p)!r} has no frames from frame {start} on")
    return np.stack(frames), fps / stride if fps else 0.0


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float, fmt: str, quality: int = 90) -> Path:
    """Save uint8 frames [T, H, W, 3] as ``fmt`` (webp/gif need only Pillow; mp4/webm need PyAV)."""
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"format={fmt!r} must be one of {VIDEO_FORMATS}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if not fps > 0:
        raise ValueError(f"fps={fps} must be > 0")
    p = Path(path).with_suffix("." + fmt)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt in PILLOW_FORMATS:
        images = [Image.fromarray(f) for f in frames]
        kwargs = {"lossless": quality >= 100, "quality": quality} if fmt == "webp" else {"optimize": False}
        images[0].save(p, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0, **kwargs)
        return p
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

    with av.open(str(p), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(round(51 - quality * 0.41)))}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return p
