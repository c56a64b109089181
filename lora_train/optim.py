"""Optimizers (AdamW, AdamW8bit) and learning-rate schedules (constant / cosine / linear + warmup)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

OPTIMIZERS = ("AdamW", "AdamW8bit")
SCHEDULERS = ("constant", "cosine", "linear")
BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.01
EPS = 1e-8


def make_optimizer(name: str, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (torch) or AdamW8bit (bitsandbytes) with betas (0.9, 0.999), weight decay 0.01, eps 1e-8.

    ``param_groups``: ``[{"params": [...], "lr": float}, ...]`` (UNet and text-encoder LRs).
    """
    groups = [g for g in param_groups if g["params"]]
    if name == "AdamW":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS, fused=on_cuda or None)
    if name == "AdamW8bit":
        try:
            import bitsandbytes
        except ImportError as exc:
            raise ValueError(
                "optimizer=AdamW8bit needs the bitsandbytes package, which is not installed: "
                "run `pip install bitsandbytes` in ComfyUI's Python, or choose optimizer=AdamW"
            ) from exc
        return bitsandbytes.optim.AdamW8bit(groups, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    raise ValueError(f"optimizer={name!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")


def lr_lambda(name: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR after ``step`` optimizer steps.

    Linear warmup from 0 over ``warmup_steps``, then: ``constant`` 1; ``cosine`` half a cosine
    down to 0 at ``total_steps``; ``linear`` a straight line down to 0 at ``total_steps``.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"lr_scheduler={name!r} is not supported; choose one of {', '.join(SCHEDULERS)}")
    if warmup_steps < 0 or warmup_steps >= max(total_steps, 1) and warmup_steps > 0:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 0 and smaller than steps={total_steps}; lower warmup_steps"
        )

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int, done_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_lambda`; call ``step()`` once per optimizer step.

    ``done_steps`` > 0 (resume) needs an optimizer whose groups carry ``initial_lr`` (a loaded state).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(name, total_steps, warmup_steps), last_epoch=done_steps - 1
    )
