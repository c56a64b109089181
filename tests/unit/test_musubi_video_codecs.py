"""MP4 (H.264) and WebM (VP9) output through PyAV, decoded back: count, size, rate and content.

PyAV's wheels bundle ffmpeg with libx264 and libvpx; a build without an encoder skips with
the reason. Content is smooth (gradients and a moving square), as 4:2:0 video cannot keep
per-pixel colour noise, so the tolerances measure the codec path, not chroma subsampling.
"""

from __future__ import annotations

import numpy as np
import pytest

from speedkit.musubi import media

CODECS = {"mp4": "libx264", "webm": "libvpx-vp9"}


@pytest.fixture(params=sorted(CODECS))
def fmt(request) -> str:
    if not media.has_pyav():
        pytest.skip("PyAV is not installed (`pip install av`): MP4/WebM cannot be written")
    import av

    try:
        av.codec.Codec(CODECS[request.param], "w")
    except (av.codec.codec.UnknownCodecError, ValueError) as exc:
        pytest.skip(f"this PyAV build has no {CODECS[request.param]} encoder: {exc}")
    return request.param


def clip(n: int = 12, h: int = 64, w: int = 96) -> np.ndarray:
    """Frames that differ from each other: a blue level per frame and a white square moving right."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = x * 255 // w
        out[i, ..., 1] = y * 255 // h
        out[i, ..., 2] = 20 + i * 200 // n
        out[i, 8:24, 4 + 6 * i : 20 + 6 * i] = 255  # even steps: 4:2:0 chroma blocks stay aligned
    return out


def test_round_trip_keeps_frames_size_rate_and_content(fmt, tmp_path):
    import av

    src = clip()
    path = media.write_video(src, tmp_path / "clip", fps=16, fmt=fmt, quality=90)
    assert path.suffix == f".{fmt}" and path.stat().st_size > 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == {"mp4": "h264", "webm": "vp9"}[fmt]
        times = [float(f.time) for f in container.decode(stream)]
    np.testing.assert_allclose(times, np.arange(len(src)) / 16, atol=2e-3)  # one frame every 1/16 s
    back, fps = media.read_video(path)
    assert back.shape == src.shape and fps == pytest.approx(16)
    err = np.abs(back.astype(int) - src.astype(int)).mean(axis=(1, 2, 3))
    assert err.max() < 4, err  # close to the source at quality 90
    # each decoded frame is its own source frame (nothing dropped, doubled or reordered)
    dist = np.abs(back[:, None].astype(int) - src[None].astype(int)).mean(axis=(2, 3, 4))
    assert (dist.argmin(axis=1) == np.arange(len(src))).all()
    cols = [int(np.argmax(f[8:24].astype(int).sum(axis=(0, 2)) >= 16 * 3 * 250)) for f in back]
    assert cols == [4 + 6 * i for i in range(len(src))]  # the square's left edge where it was drawn


def test_quality_and_fractional_rate(fmt, tmp_path):
    src = clip(9, 128, 160)
    high = media.write_video(src, tmp_path / "high", fps=23.976, fmt=fmt, quality=95)
    low = media.write_video(src, tmp_path / "low", fps=23.976, fmt=fmt, quality=5)
    assert low.stat().st_size < high.stat().st_size
    err = {}
    for name, p in (("high", high), ("low", low)):
        back, fps = media.read_video(p)
        assert back.shape == src.shape and fps == pytest.approx(23.976, rel=1e-3)
        err[name] = np.abs(back.astype(int) - src.astype(int)).mean()
    assert err["high"] < err["low"]


def test_odd_sizes(fmt, tmp_path):
    src = clip(5, 63, 95)
    back, _ = media.read_video(media.write_video(src, tmp_path / "odd", fps=8, fmt=fmt))
    # H.264 in 4:2:0 needs even sides: MP4 drops the last row/column; VP9 keeps the size
    expected = (5, 62, 94, 3) if fmt == "mp4" else src.shape
    assert back.shape == expected
    assert np.abs(back.astype(int) - src[:, : expected[1], : expected[2]].astype(int)).mean() < 4
    line = clip(2, 1, 8)
    if fmt == "mp4":
        with pytest.raises(ValueError, match="MP4 needs frames of at least 2x2 pixels, got 8x1"):
            media.write_video(line, tmp_path / "line", fps=8, fmt=fmt)
    else:
        assert media.read_video(media.write_video(line, tmp_path / "line", fps=8, fmt=fmt))[0].shape == (2, 1, 8, 3)


def test_stride_and_max_frames_on_decode(fmt, tmp_path):
    src = clip(12)
    path = media.write_video(src, tmp_path / "clip", fps=12, fmt=fmt, quality=90)
    back, fps = media.read_video(path, stride=3, max_frames=3, start=1)
    assert back.shape[0] == 3 and fps == pytest.approx(4)
    dist = np.abs(back[:, None].astype(int) - src[None].astype(int)).mean(axis=(2, 3, 4))
    assert dist.argmin(axis=1).tolist() == [1, 4, 7]
