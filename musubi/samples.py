"""Samples musubi renders while it trains (``--sample_prompts``), found as they appear.

musubi's trainer writes each sample to ``<output_dir>/sample/<output_name>_<e000001 | 000123>_<NN>_
<time>[_<seed>]`` + ``_000.png`` for an image or ``.mp4`` for a video (``training/trainer_base.py``
``sample_image_inference``). The training node polls that folder between output lines and shows
each new file as the node's preview.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import media

logger = logging.getLogger(__name__)

SAMPLE_SUFFIXES = (".png", ".mp4")
POLL_INTERVAL_S = 0.5


def sample_folder(output_dir: str | os.PathLike) -> Path:
    """Where musubi's trainer saves samples: ``<output_dir>/sample``."""
    return Path(output_dir) / "sample"


class SampleWatch:
    """New sample files of one training run, each reported once, in the order they were written.

    Only files of this run count: their name starts with ``<output_name>_`` and they were written
    after the watch started (an earlier run's samples in the same folder are not shown again). A
    file still being written (its size changed since the last look, or it does not decode yet) is
    reported on a later poll.
    """

    def __init__(self, folder: Path, output_name: str, since: float | None = None) -> None:
        self.folder = folder
        self.prefix = f"{output_name}_"
        self.since = time.time() if since is None else since
        self._done: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._last_poll = 0.0

    def poll(self, force: bool = False) -> list[tuple[Path, Image.Image]]:
        """(path, preview image) of each sample finished since the last poll; at most every 0.5 s unless forced."""
        now = time.monotonic()
        if not force and now - self._last_poll < POLL_INTERVAL_S:
            return []
        self._last_poll = now
        found = []
        for path, mtime, size in self._candidates():
            settled = force or self._sizes.get(path.name) == size
            self._sizes[path.name] = size
            if not settled or size == 0:
                continue
            image = preview_image(path)
            if image is None and not force:
                continue  # not decodable yet: look again later
            self._done.add(path.name)
            if image is not None:
                found.append((mtime, path, image))
        return [(p, img) for _, p, img in sorted(found, key=lambda t: t[0])]

    def _candidates(self) -> list[tuple[Path, float, int]]:
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return []  # no sample written yet
        out = []
        for entry in entries:
            name = entry.name
            if name in self._done or not name.startswith(self.prefix) or not name.lower().endswith(SAMPLE_SUFFIXES):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            if st.st_mtime < self.since - 1:
                self._done.add(name)  # an earlier run's sample
                continue
            out.append((Path(entry.path), st.st_mtime, st.st_size))
        return out


def preview_image(path: Path, max_size: int = 512) -> Image.Image | None:
    """An RGB picture of a sample (a video's first frame), at most ``max_size`` pixels a side; None if unreadable."""
    try:
        if path.suffix.lower() == ".mp4":
            if not media.has_pyav():
                return None
            frames, _ = media.read_video(path, max_frames=1, name="sample")
            image = Image.fromarray(frames[0])
        else:
            with Image.open(path) as img:
                image = img.convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        logger.debug("sample %s not readable yet: %s", path, exc)
        return None
    image.thumbnail((max_size, max_size))
    return image
