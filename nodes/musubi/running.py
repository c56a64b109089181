"""Run a musubi command from a node: ComfyUI's progress bar, Cancel and the node's live log.

The process handling (streaming, parsing progress, killing the tree, setting aside partial
files) is :func:`musubi.runner.run_command`; this module only connects it to ComfyUI.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ...musubi import env
from ...musubi.runner import RunResult, format_command, run_command
from ...musubi.samples import SampleWatch
from .. import comfy_bridge

LOG_EVENT = "speedkit.musubi.log"
"""The browser event ``web/js/musubi.js`` listens to for a node's live log."""

SEND_EVERY_S = 0.25
"""Lines are batched for this long before they go to the browser."""


def send(node_id, payload: dict) -> None:
    """Push a live-log message to the browser; silent when there is no server (tests, CLI)."""
    if node_id is not None:
        comfy_bridge.send_event(LOG_EVENT, {"node": str(node_id), **payload})


def command_line(argv: Sequence[str]) -> str:
    return "$ " + format_command(argv)


def run(argv: Sequence[str], e: env.MusubiEnv, *, node_id, log_path: Path, expected: Iterable[Path] = (),
        what: str = "musubi-tuner", done_line: str = "", run_dirs: Iterable[Path] = (),
        cache_dirs: Iterable[str] = (), samples: SampleWatch | None = None) -> RunResult:  # fmt: skip
    """Run with ComfyUI's progress bar, interrupt and the node's live log.

    A failed or cancelled run renames what it wrote to ``<name>.partial`` (see the runner), so
    a half-written LoRA or video never sits under its final name next to finished ones. With
    ``samples``, each sample musubi renders while training becomes the node's preview image as
    soon as it is written (and its path a log line).
    """
    import comfy.model_management as mm

    bar = {"pbar": None, "state": None}
    buffer: list[str] = []
    last_send = [0.0]

    def flush(summary: str) -> None:
        if buffer:
            send(node_id, {"lines": list(buffer), "summary": summary})
            buffer.clear()

    def show_samples(force: bool = False) -> None:
        for path, image in samples.poll(force) if samples else ():
            state = bar["state"]
            step, total = (state.step, state.total) if state is not None and state.total else (0, 1)
            if bar["pbar"] is None:
                bar["pbar"] = comfy_bridge.progress_bar(total, node_id=node_id)
            # ComfyUI sends a progress update with an image as the node's preview
            bar["pbar"].update_absolute(step, total, preview=("PNG", image, max(image.size)))
            buffer.append(f"sample: {path}")

    def on_line(line: str) -> None:
        buffer.append(line)
        show_samples()
        if time.monotonic() - last_send[0] > SEND_EVERY_S:
            last_send[0] = time.monotonic()
            flush("")

    def on_event(ev, state) -> None:
        bar["state"] = state
        if state.total:
            if bar["pbar"] is None:
                bar["pbar"] = comfy_bridge.progress_bar(state.total, node_id=node_id)
            # raises InterruptProcessingException after Cancel: the runner then kills the tree
            bar["pbar"].update_absolute(state.step, state.total)
        if ev.kind in ("steps", "epoch", "checkpoint", "saved"):
            send(node_id, {"summary": state.summary()})

    send(node_id, {"reset": True, "summary": f"starting {what}", "lines": [command_line(argv)]})
    try:
        result = run_command(
            argv,
            cwd=e.root,
            env=e.run_env(),
            log_path=log_path,
            expected_outputs=expected,
            on_line=on_line,
            on_event=on_event,
            should_cancel=mm.processing_interrupted,
            what=what,
            done_line=done_line,
            set_aside_partial=True,
            run_dirs=run_dirs,
            cache_dirs=cache_dirs,
        )
    except Exception as exc:
        flush(f"failed: {type(exc).__name__}")
        if type(exc).__name__ == "MusubiCancelled":
            mm.throw_exception_if_processing_interrupted()
        raise
    show_samples(force=True)  # samples rendered at the very end of training
    flush(f"done: {result.state.summary()}")
    return result
