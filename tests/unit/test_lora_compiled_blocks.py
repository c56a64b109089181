"""Train LoRA's compiled transformer blocks (``SPEEDKIT_TRAIN_COMPILE``): one compiled graph for
every block of a shape although ComfyUI's UNet writes each block's position into
``transformer_options``, gradients of the eager blocks, and a compile failure that leaves the run
eager with one log line."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from speedkit.lora_train import block_checkpoint
from speedkit.lora_train.block_checkpoint import checkpointed
from speedkit.lora_train.layers import LoRASet
from speedkit.lora_train.run import transformer_block_call


class Block(nn.Module):
    """Reads the per-block options the way ComfyUI's BasicTransformerBlock does (patch lookups
    keyed by the block's position that find nothing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.ctx = nn.Linear(8, dim)

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 - ComfyUI's signature
        patches = transformer_options.get("patches", {}).get(transformer_options.get("block"), [])
        h = self.proj(self.norm(x)) + self.ctx(context).mean(1, keepdim=True)
        for patch in patches:
            h = patch(h)
        return x + torch.nn.functional.gelu(h)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(16) for _ in range(6)])

    def forward(self, x, context):
        for i, block in enumerate(self.blocks):
            x = block(x, context, transformer_options={"block": ("input", i), "block_index": i})
        return x


def _grads(net: Net, x: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
    net.zero_grad()
    net(x, context).square().mean().backward()
    return [p.grad.clone() for p in net.parameters()]


def test_compiled_blocks_share_one_graph_and_give_the_eager_grads() -> None:
    net = Net()
    blocks = list(net.blocks)
    context = torch.randn(2, 5, 8)
    shapes = [torch.randn(2, 12, 16), torch.randn(2, 20, 16), torch.randn(2, 28, 16)]  # three buckets
    want = [_grads(net, x, context) for x in shapes]
    torch._dynamo.reset()
    counters.clear()
    with checkpointed(blocks, checkpoint=True, compile=True, call=transformer_block_call) as ctx:
        got = [_grads(net, x, context) for x in shapes]
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = [_grads(net, x, context) for x in reversed(shapes)]
    assert "failed" not in ctx.state
    # six blocks, three shapes: a static graph for the first shape and a dynamic-shape one for the
    # others, shared by the blocks (4 frames here); compiled per block position (the forward with
    # the options ComfyUI writes) it takes one frame per block until dynamo's cache limit (9 here)
    assert counters["frames"]["ok"] < len(blocks), dict(counters["frames"])
    for a, b in zip([*got, *reversed(again)], [*want, *want], strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    assert all("forward" not in b.__dict__ for b in blocks), "no patch outlives the run"


def test_a_compile_failure_leaves_the_run_eager_with_one_line(monkeypatch, caplog) -> None:
    def failing_compile(fn, **_kwargs):
        def run(*_args, **_kw):
            raise torch._dynamo.exc.TorchDynamoException("backend said no")

        return run

    monkeypatch.setattr(block_checkpoint.torch, "compile", failing_compile)
    net = Net()
    x, context = torch.randn(2, 12, 16), torch.randn(2, 5, 8)
    want = _grads(net, x, context)
    with caplog.at_level(logging.WARNING, logger=block_checkpoint.__name__):
        with checkpointed(list(net.blocks), checkpoint=True, compile=True, call=transformer_block_call) as ctx:
            got = [_grads(net, x, context) for _ in range(2)]
    assert "backend said no" in ctx.state["failed"]
    warnings = [r for r in caplog.records if "torch.compile of the blocks failed" in r.getMessage()]
    assert len(warnings) == 1
    for grads in got:
        for a, b in zip(grads, want, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_without_compile_nothing_is_compiled(checkpoint) -> None:
    net = Net()
    with checkpointed(list(net.blocks), checkpoint=checkpoint, compile=False, call=transformer_block_call) as ctx:
        assert ctx.compiled == []
        assert all(("forward" in b.__dict__) == checkpoint for b in net.blocks)


def _train(compile: bool) -> list[list[torch.Tensor]]:
    """Three AdamW steps of a LoRA on every block's projection of a bf16 net: the layers compute
    with bf16 working copies of the fp32 masters, refreshed in place after each optimizer step."""
    net = Net().to(torch.bfloat16)
    lora = LoRASet()
    lora.add(net, [f"blocks.{i}.proj" for i in range(len(net.blocks))], rank=4, alpha=4, prefix="lora_unet")
    lora.reset(3)
    assert lora.use_working_copies(torch.bfloat16, torch.device("cpu")) == len(net.blocks)
    params = lora.parameters("unet")
    opt = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 16, generator=gen).to(torch.bfloat16)
    context = torch.randn(2, 5, 8, generator=gen).to(torch.bfloat16)
    grads = []
    torch._dynamo.reset()
    with checkpointed(list(net.blocks), checkpoint=True, compile=compile, call=transformer_block_call) as ctx:
        for _ in range(3):
            lora.zero_grads()
            net(x, context).float().square().mean().backward()
            lora.flush_grads()
            grads.append([p.grad.clone() for p in params])
            opt.step()
            lora.sync()
    assert "failed" not in ctx.state
    return grads


def test_compiled_blocks_train_the_lora_eager_blocks_train() -> None:
    """The compiled graph reads the LoRA's working copies as they are after each optimizer step:
    the first step has only ``up`` grads (``up`` starts at zero), the later ones ``down`` grads
    too, which copies frozen into the graph would never give; values agree within bf16 rounding."""
    eager, compiled = _train(False), _train(True)
    for step, (want, got) in enumerate(zip(eager, compiled, strict=True)):
        nonzero = [bool(g.abs().sum() > 0) for g in want]
        assert nonzero == [bool(g.abs().sum() > 0) for g in got], f"step {step}"
        assert sum(nonzero) == (len(want) // 2 if step == 0 else len(want))
        for a, b in zip(got, want, strict=True):
            assert float((a - b).norm()) <= 0.05 * float(b.norm()) + 1e-6, f"step {step}"
