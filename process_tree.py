"""Child processes and their whole process tree: environment, new session, output lines, killing.

Shared by the Musubi runner (musubi-tuner's scripts, whose ``accelerate launch`` starts its own
children) and Train LoRA's worker process: a cancelled or failed child must never leave a
process behind that holds the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

IS_WINDOWS = os.name == "nt"


def subprocess_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default: ours) + ``extra`` + unbuffered UTF-8 output."""
    env = dict(os.environ if base is None else base)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def popen_kwargs() -> dict:
    """Start the child in a session (POSIX) or process group (Windows) of its own, so the whole tree can be stopped."""
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {"start_new_session": True}


def split_lines(stream, out: queue.Queue) -> None:
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


def pid_alive(pid: int) -> bool:
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
        return group_alive(pgid) or any(pid_alive(p) for p in escaped)

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
