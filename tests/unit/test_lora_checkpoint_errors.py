"""A block that raises inside a checkpointed forward (ComfyUI's cancel, an out-of-memory error)
must leave no checkpoint region open on the thread: PyTorch before 2.12 leaves the region's
saved-tensor hooks pushed for as long as the exception's frames live (ComfyUI keeps them), and
every later autograd graph in ComfyUI's worker thread (the next training run) then fails with a
recomputation mismatch; when the frames are finally freed, the late cleanup pops whatever hook is
on top then."""

from __future__ import annotations

import types

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from speedkit.lora_train.block_checkpoint import checkpointed, close_checkpoint_frames


class Cancelled(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        if self.fail:
            raise Cancelled("cancelled inside the block")
        return h * h


def _region(packed: list) -> object:
    """The shape of PyTorch < 2.12's checkpoint generator: hooks pushed until resumed."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (packed.append(tuple(t.shape)), t)[1], lambda t: t):
        yield


def _old_torch_checkpoint(packed: list):
    """``torch.utils.checkpoint.checkpoint`` as PyTorch < 2.12 runs it: the region's generator
    (attributed to torch's checkpoint module) is resumed only after a forward that returned."""
    region = types.FunctionType(
        _region.__code__.replace(co_filename=torch.utils.checkpoint.__file__), _region.__globals__, "region"
    )

    def checkpoint(function, *args, use_reentrant=None, preserve_rng_state=True, **kwargs):
        gen = region(packed)
        next(gen)
        out = function(*args, **kwargs)
        next(gen, None)
        return out

    return checkpoint


def _saves_after(packed: list) -> list:
    packed.clear()
    a = torch.randn(3, requires_grad=True)
    (a * torch.randn(3)).sum()  # saves a tensor for backward
    return list(packed)


def test_the_old_torch_stand_in_leaks_and_closing_its_frames_ends_the_leak() -> None:
    packed: list = []
    checkpoint = _old_torch_checkpoint(packed)
    block = Block()
    block.fail = True
    with pytest.raises(Cancelled) as info:
        checkpoint(block.forward, torch.randn(2, 4, requires_grad=True))
    try:
        assert _saves_after(packed), "the stand-in must leave its hooks pushed, as old PyTorch does"
    finally:
        closed = close_checkpoint_frames(info.value.__traceback__)
    assert closed == 1
    assert _saves_after(packed) == []
    assert close_checkpoint_frames(info.value.__traceback__) == 0, "a closed region is never closed twice"


def test_a_block_raising_under_checkpointed_leaves_no_region_open(monkeypatch) -> None:
    packed: list = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", _old_torch_checkpoint(packed))
    block = Block()
    x = torch.randn(2, 4, requires_grad=True)
    with checkpointed([block]):
        block(x).sum().backward()
        assert packed, "the block ran under the (stand-in) checkpoint"
        block.fail = True
        with pytest.raises(Cancelled) as info:
            block(x)
        # ComfyUI keeps the exception (and so its frames) alive after a cancel; a region left
        # open would only be closed whenever the garbage collector frees them, on some later run
        assert info.value.__traceback__ is not None
        assert _saves_after(packed) == []


def test_training_after_a_cancelled_checkpointed_step_gets_the_grads_of_a_fresh_run() -> None:
    """With the real checkpoint of this PyTorch: a failed forward, then the same block trains
    exactly as it did before the failure (recomputation finds the tensors it saved)."""
    block = Block()
    x = torch.randn(2, 4, requires_grad=True)
    with checkpointed([block]):
        block(x).sum().backward()
        want = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        block.fail = True
        with pytest.raises(Cancelled):
            block(x)
        block.fail = False
        for _ in range(2):
            block.zero_grad()
            block(x).sum().backward()
            for got, ref in zip((p.grad for p in block.parameters()), want, strict=True):
                assert torch.equal(got, ref)
