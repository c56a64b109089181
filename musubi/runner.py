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
import contextlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .lora_file import safetensors_complete
from .progress import ProgressEvent, ProgressState

logger = logging.getLogger(__name__)

TAIL_LINES = 50
IS_WINDOWS = os.name == "nt"
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


def subprocess_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default: ours) + ``extra`` + unbuffered UTF-8 output."""
    env = dict(os.environ if base is None else base)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _popen_kwargs() -> dict:
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {"start_new_session": True}


def _split_lines(stream, out: queue.Queue) -> None:
    """Reader thread: bytes -> lines split on ``\\n`` and ``\\r`` (each tqdm redraw is a line)."""
    buf = b""
    try:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            buf += chunk
            while True:
                cut = [i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0]
                if not cut:
                    break
                i = min(cut)
                out.put(buf[:i].decode("utf-8", errors="replace"))
                buf = buf[i + 1 :]
        if buf:
            out.put(buf.decode("utf-8", errors="replace"))
    except (OSError, ValueError) as exc:  # the pipe was closed under us while killing the tree
        logger.debug("output reader stopped: %s", exc)
    finally:
        out.put(None)


def _proc_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgrp) of every live (non-zombie) process, read from /proc (Linux); [] elsewhere."""
    table = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces/parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z":
            table.append((int(entry.name), int(fields[1]), int(fields[2])))
    return table


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc (Linux)."""
    return [pid for pid, _, pgrp in _proc_table() if pgrp == pgid]


def _escaped_descendants(pid: int) -> list[int]:
    """Descendants of ``pid`` that left its process group (``setsid``/``setpgid``): ``killpg`` misses them."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    groups = {}
    for child, parent, pgrp in table:
        children.setdefault(parent, []).append(child)
        groups[child] = pgrp
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.append(p)
        todo += children.get(p, [])
    return [p for p in found if groups.get(p) != pid]


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[:1] != ["Z"]


def group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` is still running (POSIX)."""
    if Path("/proc/self/stat").exists():
        return bool(_group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_process_tree(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop ``proc`` and every process it started, politely first.

    POSIX: the child leads its own session (``start_new_session``), so SIGTERM goes to the
    whole group, SIGKILL follows after ``grace_s``. Windows: CTRL_BREAK to the new process
    group, then ``taskkill /T /F`` on the tree.
    """
    if IS_WINDOWS:
        _kill_tree_windows(proc, grace_s)
        return
    pgid = proc.pid
    # Snapshot before killing: once the script dies, a child that escaped into its own session is
    # reparented to init and can no longer be found from the script's pid.
    escaped = _escaped_descendants(pgid)

    def alive() -> bool:
        return group_alive(pgid) or any(_pid_alive(p) for p in escaped)

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        for pid in escaped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.05)
            if not alive():
                break
        if not alive():
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(2.0)


def _kill_tree_windows(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # taskkill /T also reaches children that outlived their parent's exit
    with contextlib.suppress(OSError):
        subprocess.run(
            ["taskkill", "/T", "/F", "/PID", str(proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=15,
            check=False,
        )
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)


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
            **_popen_kwargs(),
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
    reader = threading.Thread(target=_split_lines, args=(proc.stdout, lines), daemon=True)
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
