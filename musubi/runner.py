"""Run one musubi-tuner command as a subprocess: stream, parse, log, cancel.

musubi is never imported: its scripts run in the user's own venv. The command is an
argument list (never a shell string), stderr is merged into stdout (tqdm writes its bar
to stderr), every line goes to a log file, and any exception raised by a callback (the
ComfyUI interrupt surfaces that way from ``ProgressBar.update``) or a ``should_cancel``
poll kills the whole process tree: ``accelerate launch`` runs the training script in a
child process, so killing only the direct child would leave the GPU busy. With
``set_aside_partial`` a failed or cancelled run never leaves a half-written file under its final
name: what it wrote is renamed to ``<name>.partial`` and the error says so (and where the log is).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..process_tree import (  # noqa: F401 - the helpers' old names stay importable from here
    IS_WINDOWS,
    _escaped_descendants,
    _group_members,
    _kill_tree_windows,
    _proc_table,
    group_alive,
    kill_process_tree,
    pid_alive,
    popen_kwargs,
    split_lines,
    subprocess_env,
)
from .lora_file import safetensors_complete
from .progress import ProgressEvent, ProgressState

logger = logging.getLogger(__name__)

TAIL_LINES = 50
PARTIAL_SUFFIX = ".partial"
"""Appended to a failed run's outputs: LoRA loaders and players no longer take them for finished files."""

LineCallback = Callable[[str], None]
EventCallback = Callable[[ProgressEvent, ProgressState], None]


class MusubiRunError(RuntimeError):
    """The command failed: non-zero exit code or a missing expected output."""

    def __init__(self, message: str, *, returncode: int | None, tail: list[str], log_path: Path | None):
        super().__init__(message)
        self.returncode = returncode
        self.tail = tail
        self.log_path = log_path


class MusubiCancelled(RuntimeError):
    """The run was cancelled (``should_cancel`` returned True); the process tree is gone."""


@dataclass
class RunResult:
    """What a finished run left behind."""

    returncode: int
    log_path: Path | None
    state: ProgressState
    tail: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


# Coarse file-system clocks (FAT: 2 s, some network shares) may stamp a fresh file a little early.
MTIME_SLACK_S = 2.0


def _written_since(path: Path, started: float) -> bool:
    """Whether ``path`` exists and was modified after ``started`` (a ``time.time()``)."""
    try:
        return path.stat().st_mtime >= started - MTIME_SLACK_S
    except OSError:
        return False


def format_command(argv: Sequence[str]) -> str:
    """A copy-pasteable rendering of ``argv`` for logs (never executed)."""
    if IS_WINDOWS:
        return subprocess.list2cmdline(list(argv))
    import shlex

    return " ".join(shlex.quote(str(a)) for a in argv)


def partial_name(path: str | os.PathLike) -> Path:
    """Where a failed run's file or folder is set aside: ``<name>.partial`` beside it."""
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def _free_partial_name(path: Path) -> Path:
    """``<name>.partial``, or ``<name>.partial-2`` ... when a folder of that name is already there."""
    target = partial_name(path)
    n = 2
    while target.is_dir():
        target = path.with_name(f"{path.name}{PARTIAL_SUFFIX}-{n}")
        n += 1
    return target


def set_aside(
    files: Sequence[str | os.PathLike], dirs: Sequence[str | os.PathLike] = (), started: float = 0.0
) -> list[tuple[Path, Path]]:
    """Rename what a failed run wrote to ``<name>.partial``; returns the (old, new) pairs.

    ``files`` count only when written since ``started`` (an older file of the same name is the
    result of an earlier, finished run and stays); ``dirs`` (a folder made for this run only) are
    renamed whole. A rename that fails is logged and left out: the caller's message must not claim it.
    """
    moves = []
    for raw in files:
        p = Path(raw)
        if not p.is_file() or not _written_since(p, started):
            continue
        target = _free_partial_name(p)
        try:
            os.replace(p, target)
        except OSError as exc:
            logger.warning("could not rename the unfinished %s to %s: %s", p, target, exc)
            continue
        moves.append((p, target))
    for raw in dirs:
        p = Path(raw)
        if not p.is_dir():
            continue
        target = _free_partial_name(p)
        try:
            shutil.move(str(p), str(target))
        except OSError as exc:
            logger.warning("could not rename the unfinished folder %s to %s: %s", p, target, exc)
            continue
        moves.append((p, target))
    return moves


def _moved_path(path: Path | None, moves: Sequence[tuple[Path, Path]]) -> Path | None:
    """``path`` after ``moves`` (it may lie inside a renamed folder)."""
    if path is None:
        return None
    for old, new in moves:
        if path == old:
            return new
        if old in path.parents:
            return new / path.relative_to(old)
    return path


def _set_aside_note(moves: Sequence[tuple[Path, Path]]) -> str:
    if not moves:
        return ""
    pairs = "; ".join(f"{old} -> {new.name}" for old, new in moves)
    return f"Its unfinished output was renamed so it is not taken for a finished one: {pairs}."


def _append_to_log(log: Path | None, text: str) -> None:
    if log is None:
        return
    try:
        with open(log, "a", encoding="utf-8", errors="replace") as f:
            f.write(f"\n[speedkit] {text}\n")
    except OSError as exc:
        logger.debug("could not append to %s: %s", log, exc)


def run_command(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    expected_outputs: Sequence[str | os.PathLike] = (),
    on_line: LineCallback | None = None,
    on_event: EventCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    grace_s: float = 3.0,
    poll_s: float = 0.1,
    what: str = "musubi-tuner",
    done_line: str = "",
    set_aside_partial: bool = False,
    run_dirs: Sequence[str | os.PathLike] = (),
    cache_dirs: Sequence[str | os.PathLike] = (),
) -> RunResult:
    """Run ``argv`` in ``cwd`` to completion and return its :class:`RunResult`.

    ``env`` holds extra variables on top of this process's environment.
    Success means exit code 0 *and* every path in ``expected_outputs`` was written during
    this run (an older file of the same name does not count: a script that exits 0 without
    saving must not pass on a stale file); anything else raises :class:`MusubiRunError` with
    the code, the last lines and the log path. ``done_line``: for scripts that crash *after*
    finishing their job (musubi's merge-only modes of some generate scripts), a non-zero exit
    still counts as success once a line containing this text was printed and the outputs exist.
    An exception raised by ``on_line``/``on_event`` (e.g. ComfyUI's interrupt) or a true
    ``should_cancel()`` kills the process tree, then re-raises / raises
    :class:`MusubiCancelled`. Checkpoints the run already saved are kept and named.
    ``set_aside_partial``: on failure or cancel, the ``expected_outputs`` written by this run and
    any truncated checkpoint are renamed to ``<name>.partial``, and ``run_dirs`` (folders made for
    this run's outputs only) as a whole; the error names them and the log's new place. In
    ``cache_dirs`` only truncated ``.safetensors`` files written by this run are renamed: whole
    caches stay, so a rerun with ``--skip_existing`` reuses them but never a cut-short one.
    """
    argv = [os.fspath(a) for a in argv]
    if not argv:
        raise ValueError("argv is empty: nothing to run")
    bad = next((a for a in argv if "\0" in a), None)
    if bad is not None:
        raise ValueError(f"{what}: the argument {bad!r} contains a NUL character, which no command line can carry")
    log_file = None
    log = Path(log_path) if log_path is not None else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed in finally
        log_file.write(f"$ {format_command(argv)}\n(cwd: {os.fspath(cwd)})\n")
        log_file.flush()
    state = ProgressState()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    lines: queue.Queue = queue.Queue()
    done_seen = False
    started = time.time()
    outputs = [Path(p) for p in expected_outputs]

    def set_aside_failed() -> tuple[list[tuple[Path, Path]], Path | None]:
        """Rename this failed run's unfinished files; returns the moves and where the log is now."""
        if not set_aside_partial and not run_dirs:
            return [], log
        files: list[Path] = []
        if set_aside_partial:
            saved = [Path(p) for p in state.kept_checkpoints]
            saved += [p for d in cache_dirs for p in Path(d).glob("*.safetensors") if _written_since(p, started)]
            files = outputs + [p for p in saved if p.suffix == ".safetensors" and not safetensors_complete(p)]
        moves = set_aside(files, run_dirs, started)
        return moves, _moved_path(log, moves)

    logger.info("%s: running %s", what, format_command(argv))
    try:
        # an argument list, never a shell: paths with ; | $ ` & or spaces reach the script as they are
        proc = subprocess.Popen(
            argv,
            cwd=os.fspath(cwd),
            env=subprocess_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            shell=False,
            **popen_kwargs(),
        )
    except OSError as exc:
        msg = (
            f"{what}: could not start {argv[0]!r}: {exc}. Check the Python interpreter set in MusubiTuner_Environment."
        )
        if log_file is not None:
            log_file.write(f"\n[speedkit] {msg}\n")
            log_file.close()
            msg += f" Log: {log}"
        raise MusubiRunError(msg, returncode=None, tail=[], log_path=log) from exc
    reader = threading.Thread(target=split_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    finished = False
    last_written_step = None
    exited_at = 0.0
    try:
        while True:
            try:
                line = lines.get(timeout=poll_s)
            except queue.Empty:
                line = ""
                if proc.poll() is not None:
                    # The script exited but a leftover child (e.g. a dataloader worker) may keep
                    # the pipe open: end it so the reader sees EOF. Windows has no process group
                    # to find orphans by, so stop reading after a quiet grace period instead.
                    if not IS_WINDOWS and group_alive(proc.pid):
                        kill_process_tree(proc, grace_s)
                    elif IS_WINDOWS:
                        exited_at = exited_at or time.monotonic()
                        if time.monotonic() - exited_at > grace_s:
                            break
            if line is None:
                break
            if line:
                done_seen = done_seen or bool(done_line and done_line in line)
                event = state.feed(line)
                # Every tqdm redraw is a line; the log keeps one line per step, not per redraw.
                is_redraw = event is not None and event.kind in ("steps", "count")
                if not is_redraw or event.step != last_written_step:
                    tail.append(line)
                    if log_file is not None:
                        log_file.write(line + "\n")
                        log_file.flush()
                if is_redraw:
                    last_written_step = event.step
                if on_line is not None:
                    on_line(line)
                if event is not None and on_event is not None:
                    on_event(event, state)
            if should_cancel is not None and should_cancel():
                raise MusubiCancelled(f"{what} was cancelled")
        proc.wait()
        reader.join(timeout=5)
        finished = True
    except BaseException as exc:
        kill_process_tree(proc, grace_s)
        # Keep what the run printed before it died (e.g. a "saving checkpoint" line still queued).
        reader.join(timeout=2)
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line:
                state.feed(line)
                tail.append(line)
                if log_file is not None:
                    log_file.write(line + "\n")
        if log_file is not None:
            log_file.close()  # before a rename moves it (Windows cannot rename an open file)
            log_file = None
        moves, log_now = set_aside_failed()
        renamed = {old for old, _ in moves}
        saved = [p for p in state.kept_checkpoints if Path(p).exists() and Path(p) not in renamed]
        where = f" Files it already saved: {', '.join(saved)}." if saved else ""
        msg = f"{what} stopped ({type(exc).__name__}); the process tree was killed.{where}"
        if moves:
            msg += " " + _set_aside_note(moves)
        if log_now is not None:
            msg += f" Log: {log_now}"
        logger.warning("%s", msg)
        _append_to_log(log_now, msg)
        if isinstance(exc, MusubiCancelled):
            raise MusubiCancelled(msg) from None
        raise
    finally:
        if not finished and proc.poll() is None:
            kill_process_tree(proc, grace_s)
        elif not IS_WINDOWS and group_alive(proc.pid):
            # The script exited but left children behind (e.g. dataloader workers).
            kill_process_tree(proc, grace_s)
        if proc.stdout is not None:
            proc.stdout.close()
        if log_file is not None:
            log_file.close()

    rc = proc.returncode
    missing = [p for p in outputs if not _written_since(p, started)]
    if rc != 0 and done_seen and outputs and not missing:
        logger.warning(
            "%s exited with code %s after it printed %r and wrote %s: counted as done (see %s)",
            what, rc, done_line, ", ".join(map(str, outputs)), log,
        )  # fmt: skip
    elif rc != 0 or missing:
        moves, log_now = set_aside_failed()
        renamed = {old for old, _ in moves}
        saved = [p for p in state.kept_checkpoints if Path(p).exists() and Path(p) not in renamed]
        why = (
            f"exited with code {rc}"
            if rc != 0
            else f"exited with code 0 but did not write {', '.join(map(str, missing))} (missing, or older than this run)"
        )
        msg = [f"{what} {why}."]
        if saved:
            msg.append(f"Checkpoints it saved before stopping: {', '.join(saved)}")
        if moves:
            msg.append(_set_aside_note(moves))
        msg.append(f"Last {len(tail)} lines of output:")
        msg.extend(tail)
        if log_now is not None:
            msg.append(f"Full log: {log_now}")
            _append_to_log(log_now, msg[0] + (" " + _set_aside_note(moves) if moves else ""))
        raise MusubiRunError("\n".join(msg), returncode=rc, tail=list(tail), log_path=log_now)
    logger.info("%s finished (%s)", what, state.summary() or "done")
    return RunResult(returncode=rc, log_path=log, state=state, tail=list(tail), outputs=outputs)
