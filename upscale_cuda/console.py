"""One stderr shared by the command line's log lines and its progress line.

A progress bar redrawn with ``\\r`` and log lines written by other code to the same stream end
up on one line ("upscaled 3/10INFO ..."). Here every write goes through one object: on a
terminal the progress line is wiped before a log line is printed and redrawn after it; on a
pipe or a log file (no ``\\r`` redraws there) progress is printed as whole lines, at most one
every few seconds plus the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TextIO


class Console:
    """Serialises log lines and progress updates on one text stream."""

    def __init__(self, stream: TextIO, interactive: bool | None = None, every_s: float = 5.0) -> None:
        self.stream = stream
        if interactive is None:
            isatty = getattr(stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.every_s = every_s  # seconds between progress lines when not interactive
        self._drawn = ""  # progress text currently on screen (interactive only)
        self._last = 0.0
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        """Print one finished line, keeping the progress line (if any) below it."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r" + " " * len(self._drawn) + "\r")
            self.stream.write(text + "\n")
            if self._drawn:
                self.stream.write(self._drawn)
            self.stream.flush()

    def progress(self, text: str, final: bool = False) -> None:
        """Show ``text`` as the current progress (the last call with ``final`` always prints)."""
        with self._lock:
            if self.interactive:
                pad = max(len(self._drawn) - len(text), 0)
                self.stream.write("\r" + text + " " * pad)
                self._drawn = text
                if final:
                    self.stream.write("\n")
                    self._drawn = ""
            else:
                now = time.monotonic()
                if not final and now - self._last < self.every_s:
                    return
                self._last = now
                self.stream.write(text + "\n")
            self.stream.flush()

    def end_progress(self) -> None:
        """Leave the progress line where it is and move below it (after a failure or interrupt)."""
        with self._lock:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = ""


class ConsoleHandler(logging.Handler):
    """A logging handler that prints through a :class:`Console`."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class Progress:
    """Images done out of a total, with rate and time left, drawn on a :class:`Console`."""

    def __init__(self, console: Console, total: int, enabled: bool = True) -> None:
        self.console, self.total, self.enabled = console, total, enabled
        self.done = 0
        self.start = time.monotonic()

    def text(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        left = f", {round((self.total - self.done) / rate)} s left" if 0 < self.done < self.total else ""
        return f"progress: {self.done}/{self.total} image(s) upscaled ({rate:.2f} img/s{left})"

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            self.console.progress(self.text(), final=self.done >= self.total)

    def close(self) -> None:
        if self.enabled:
            self.console.end_progress()
