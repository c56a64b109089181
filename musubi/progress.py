"""Parse musubi-tuner's console output into progress events.

musubi prints its training progress with tqdm on stderr (``desc="steps"``, postfix
``avr_loss=``), redrawn with ``\\r``; state markers come from ``accelerator.print`` and
``logging``: ``epoch N/M``, ``saving checkpoint: <path>``, ``model saved.``. The cache and
generate scripts print plain tqdm bars (``i/N`` or, without a total, ``N it``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# steps:  12%|█▏        | 120/1000 [01:23<10:12,  1.44it/s, avr_loss=0.0912]
_TQDM = re.compile(
    r"^(?P<desc>[^|\r\n]*?):?\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>[^<\]]*)(?:<(?P<remaining>[^,\]]*))?(?:,\s*(?P<rate>[\d.]+\s*(?:it/s|s/it)|\?it/s))?"
    r"(?:,\s*(?P<postfix>[^\]]*))?\]"
)
# 12it [00:03,  3.50it/s]   (tqdm without a total, e.g. the cache scripts)
_TQDM_COUNT = re.compile(r"^(?P<desc>[^|\r\n]*?):?\s*(?P<n>\d+)it \[(?P<elapsed>[^,\]]*)")
_POSTFIX_VALUE = re.compile(r"(?P<key>[\w/ ]+?)=(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)")
_EPOCH = re.compile(r"^epoch (?P<epoch>\d+)/(?P<total>\d+)\s*$")
_SAVING = re.compile(r"saving checkpoint: (?P<path>.+?)\s*$")
_REMOVING = re.compile(r"removing old checkpoint: (?P<path>.+?)\s*$")
_TOTAL_STEPS = re.compile(r"total optimization steps[^:]*:\s*(?P<total>\d+)")
_MODEL_SAVED = re.compile(r"(?:^|:)\s*model saved\.\s*$")


@dataclass(frozen=True)
class ProgressEvent:
    """One recognised line. ``kind`` is one of: steps, count, epoch, checkpoint, removed, total, saved."""

    kind: str
    step: int | None = None
    total: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    desc: str = ""
    rate: str | None = None
    remaining: str | None = None


def parse_line(line: str) -> ProgressEvent | None:
    """Recognise one console line (without its line ending); ``None`` for ordinary log text."""
    text = line.strip()
    if not text:
        return None
    m = _TQDM.match(text)
    if m:
        values = {}
        for pv in _POSTFIX_VALUE.finditer(m.group("postfix") or ""):
            values[pv.group("key").strip()] = float(pv.group("value"))
        return ProgressEvent(
            kind="steps",
            step=int(m.group("n")),
            total=int(m.group("total")),
            values=values,
            desc=m.group("desc").strip(),
            rate=(m.group("rate") or "").replace(" ", "") or None,
            remaining=(m.group("remaining") or "").strip() or None,
        )
    m = _TQDM_COUNT.match(text)
    if m:
        return ProgressEvent(kind="count", step=int(m.group("n")), desc=m.group("desc").strip())
    m = _EPOCH.match(text)
    if m:
        return ProgressEvent(kind="epoch", step=int(m.group("epoch")), total=int(m.group("total")))
    m = _SAVING.search(text)
    if m:
        return ProgressEvent(kind="checkpoint", path=m.group("path"))
    m = _REMOVING.search(text)
    if m:
        return ProgressEvent(kind="removed", path=m.group("path"))
    m = _TOTAL_STEPS.search(text)
    if m:
        return ProgressEvent(kind="total", total=int(m.group("total")))
    if _MODEL_SAVED.search(text):
        return ProgressEvent(kind="saved")
    return None


@dataclass
class ProgressState:
    """Accumulated state of one run, updated line by line with :meth:`feed`."""

    step: int = 0
    total: int = 0
    loss: float | None = None
    epoch: int = 0
    epochs: int = 0
    model_saved: bool = False
    checkpoints: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    rate: str | None = None
    remaining: str | None = None
    training_desc: str = "steps"
    """Only tqdm bars with this description drive ``step``/``total`` when one has been seen
    (musubi's sampling bars during training must not move the training progress)."""
    _seen_training_bar: bool = False

    def feed(self, line: str) -> ProgressEvent | None:
        """Update the state from one line; returns the parsed event (or ``None``)."""
        ev = parse_line(line)
        if ev is None:
            return None
        if ev.kind == "steps":
            is_training = ev.desc == self.training_desc
            if is_training:
                self._seen_training_bar = True
            if is_training or not self._seen_training_bar:
                self.step, self.total = ev.step or 0, ev.total or 0
                self.rate, self.remaining = ev.rate, ev.remaining
                loss = ev.values.get("avr_loss", ev.values.get("loss"))
                if loss is not None and is_training:
                    self.loss = loss
                    if not self.loss_history or self.loss_history[-1][0] != self.step:
                        self.loss_history.append((self.step, loss))
        elif ev.kind == "count" and not self._seen_training_bar:
            self.step = ev.step or 0
        elif ev.kind == "epoch":
            self.epoch, self.epochs = ev.step or 0, ev.total or 0
        elif ev.kind == "checkpoint" and ev.path:
            self.checkpoints.append(ev.path)
        elif ev.kind == "removed" and ev.path:
            self.removed.append(ev.path)
        elif ev.kind == "total" and ev.total:
            self.total = ev.total
        elif ev.kind == "saved":
            self.model_saved = True
        return ev

    @property
    def kept_checkpoints(self) -> list[str]:
        """Checkpoints saved and not removed again by ``--save_last_n_*``."""
        return [p for p in self.checkpoints if p not in self.removed]

    def summary(self) -> str:
        """One line for the UI: step, epoch, loss, speed."""
        parts = []
        if self.total:
            parts.append(f"step {self.step}/{self.total}")
        elif self.step:
            parts.append(f"{self.step} items")
        if self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.rate:
            parts.append(self.rate)
        if self.remaining:
            parts.append(f"{self.remaining} left")
        return ", ".join(parts)
