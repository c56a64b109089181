"""CUDA-graph replay of repeated denoiser calls: same results as eager, and every doubt
(weights moved, capture failure, odd arguments, CPU tensors) falls back to eager."""

from __future__ import annotations

import pytest
import torch

from speedkit.usdu.graphs import GraphRunner


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x, t, context=None, scale=1.0):
        h = self.conv(x) * scale + self.lin(context).mean(1)[:, :, None, None] + t[:, None, None, None]
        return torch.nn.functional.silu(h)


def _runner(net: torch.nn.Module) -> GraphRunner:
    return GraphRunner(lambda: list(net.parameters()) + list(net.buffers()))


def test_cpu_tensors_always_run_eagerly():
    net = _Net()
    g = _runner(net)
    x, t, c = torch.rand(1, 4, 8, 8), torch.rand(1), torch.rand(1, 3, 16)
    for _ in range(3):
        assert torch.equal(g(net, x, t, context=c), net(x, t, context=c))
    assert g.captures == 0 and g.replays == 0 and g.eager_calls == 3 and g.disabled is None


def test_unhashable_argument_disables_graphs_but_still_computes():
    net = _Net()
    g = _runner(net)
    x, t, c = torch.rand(1, 4, 8, 8), torch.rand(1), torch.rand(1, 3, 16)
    out = g(lambda x, t, context, extra: net(x, t, context=context), x, t, context=c, extra=[1, 2])
    assert torch.equal(out, net(x, t, context=c))
    assert g.disabled is not None and "extra" in g.disabled


@pytest.mark.gpu
def test_replay_matches_eager_and_follows_new_inputs():
    torch.manual_seed(0)
    net = _Net().cuda().eval()
    g = _runner(net)
    with torch.inference_mode():
        for step in range(6):
            x = torch.rand(2, 4, 16, 16, device="cuda")
            t = torch.full((2,), float(step), device="cuda")
            c = torch.rand(2, 3, 16, device="cuda")
            got = g(net, x, t, context=c, scale=0.5)
            want = net(x, t, context=c, scale=0.5)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert g.captures == 1 and g.replays == 5 and g.eager_calls == 1  # eager, capture(+replay), 4 replays
    # The output is a copy: a later replay must not change an earlier result.
    with torch.inference_mode():
        a = g(net, x, t, context=c, scale=0.5)
        a_copy = a.clone()
        g(net, torch.rand_like(x), t, context=c, scale=0.5)
    assert torch.equal(a, a_copy)


@pytest.mark.gpu
def test_new_shape_or_scalar_gets_its_own_graph_and_cap_is_respected():
    net = _Net().cuda().eval()
    g = GraphRunner(lambda: list(net.parameters()), max_graphs=1)
    t = torch.zeros(1, device="cuda")
    c = torch.rand(1, 3, 16, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            g(net, torch.rand(1, 4, 8, 8, device="cuda"), t, context=c)
        for _ in range(3):  # a second shape: over the cap, stays eager
            x = torch.rand(1, 4, 12, 8, device="cuda")
            torch.testing.assert_close(g(net, x, t, context=c), net(x, t, context=c), rtol=0, atol=1e-6)
    assert g.captures == 1


@pytest.mark.gpu
def test_moved_weights_disable_replay():
    net = _Net().cuda().eval()
    g = _runner(net)
    x, t, c = torch.rand(1, 4, 8, 8, device="cuda"), torch.zeros(1, device="cuda"), torch.rand(1, 3, 16, device="cuda")
    with torch.no_grad():
        g(net, x, t, context=c)
        g(net, x, t, context=c)
        assert g.captures == 1
        # What an offload/re-patch does: new storage for a weight.
        net.conv.weight = torch.nn.Parameter(net.conv.weight.detach().clone() * 2, requires_grad=False)
        got = g(net, x, t, context=c)
    assert g.disabled is not None and "moved" in g.disabled
    with torch.no_grad():
        torch.testing.assert_close(got, net(x, t, context=c))


@pytest.mark.gpu
def test_host_sync_inside_the_model_falls_back_to_eager():
    net = _Net().cuda().eval()
    g = _runner(net)

    def syncing(x, t, context):
        if float(t.sum()) > -1:  # a host read: not capturable
            return net(x, t, context=context)
        return x

    x, t, c = torch.rand(1, 4, 8, 8, device="cuda"), torch.zeros(1, device="cuda"), torch.rand(1, 3, 16, device="cuda")
    with torch.inference_mode():
        outs = [g(syncing, x, t, context=c) for _ in range(3)]
    assert g.disabled is not None and "capture failed" in g.disabled
    # found by the checked run before recording (what keeps cudaMallocAsync servers alive)
    assert "synchroniz" in g.disabled, g.disabled
    assert torch.cuda.get_sync_debug_mode() == 0
    for o in outs:
        torch.testing.assert_close(o, net(x, t, context=c))


_ASYNC_CHILD = """
import sys, types
import torch
pkg = types.ModuleType("speedkit")
pkg.__path__ = [sys.argv[1]]
sys.modules["speedkit"] = pkg  # the pack without its ComfyUI-loading __init__, as tests/conftest.py does
from speedkit.usdu.graphs import GraphRunner
assert torch.cuda.get_allocator_backend() == "cudaMallocAsync"
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).cuda().eval()
g = GraphRunner(lambda: list(net.parameters()))
with torch.inference_mode():
    for step in range(4):
        x = torch.rand(2, 4, 16, 16, device="cuda")
        torch.testing.assert_close(g(lambda x: net(x), x), net(x), rtol=0, atol=1e-6)
assert g.captures == 1 and g.disabled is None, (g.captures, g.disabled)
torch.cuda.synchronize()
g.close()  # as the node does at the end of a run: the graph and what it allocated go
del g
import gc
gc.collect()
torch.cuda.synchronize()
print("closed", flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recording_under_cuda_malloc_async_never_reads_output_before_replay():
    """Under cudaMallocAsync a graph's own allocations exist only once it is launched: reading
    the recorded output before the first replay failed with "invalid argument" (and the process
    then aborted); and freeing them after the recording makes PyTorch print a warning, so the
    output goes into buffers made outside the recording. Run in a child process with that allocator, where USDU's forward-only graphs
    record by default (behind the checked run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    env.pop("SPEEDKIT_GRAPHS_WITH_MALLOC_ASYNC", None)
    proc = subprocess.run(
        [sys.executable, "-c", _ASYNC_CHILD, str(root)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "closed" in proc.stdout, proc.stdout[-3000:]
    # nothing the recording allocated outlives it: no warning on the server's console at the end
    assert "uncaptured free of a captured allocation" not in proc.stderr, proc.stderr[-3000:]
