"""The shared pure-torch helpers."""

from __future__ import annotations

import pytest
import torch

from speedkit import torch_utils as tu


def test_layout_round_trip():
    img = torch.rand(2, 5, 7, 3)
    chw = tu.bhwc_to_bchw(img)
    assert chw.shape == (2, 3, 5, 7)
    assert torch.equal(tu.bchw_to_bhwc(chw), img)


def test_minmax_uses_one_range_for_the_batch():
    a = torch.full((1, 4, 4, 3), 0.2)
    a[0, 0, 0, 0] = 0.6
    b = torch.full((1, 4, 4, 3), 0.4)
    out = tu.normalize_range(torch.cat([a, b]), "minmax")
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() == 0 and out.max() == 1
    # b (constant 0.4) keeps its place in the batch's range, not stretched to 0.
    assert torch.allclose(out[1], torch.full_like(out[1], 0.5))


def test_minmax_per_image_stretches_each_image():
    x = torch.stack([torch.linspace(0.15, 0.85, 48).reshape(4, 4, 3), torch.linspace(0.4, 0.6, 48).reshape(4, 4, 3)])
    out = tu.normalize_range(x, "minmax per image")
    for i in range(2):
        assert out[i].min().item() == pytest.approx(0.0) and out[i].max().item() == pytest.approx(1.0)


def test_nunchaku_range_maps_to_full_range():
    x = torch.linspace(0.15, 0.85, 3 * 8 * 8).reshape(1, 8, 8, 3)
    out = tu.normalize_range(x, "minmax")
    expected = (x - 0.15) / 0.7
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("mode", ["minmax", "minmax per image", "percentile"])
def test_constant_image_maps_to_zero(mode):
    out = tu.normalize_range(torch.full((2, 3, 3, 3), 0.7), mode)
    assert torch.count_nonzero(out) == 0


def test_percentile_ignores_a_single_outlier():
    x = torch.linspace(0.3, 0.6, 64 * 64 * 3).reshape(1, 64, 64, 3).clone()
    x[0, 0, 0, 0] = 1.0  # one hot pixel
    plain = tu.normalize_range(x, "minmax")
    robust = tu.normalize_range(x, "percentile", 0.0, 99.9)
    # min-max is defeated by the outlier: the bulk stays low-contrast.
    assert plain[0, 1:, :, :].max() < 0.61
    assert robust[0, 1:, :, :].max() > 0.99
    assert robust.max() == 1.0 and robust.min() == 0.0


def test_percentile_matches_numpy_linear_interpolation():
    np = pytest.importorskip("numpy")
    x = torch.rand(1, 17, 13, 3)
    lo, hi = np.percentile(x.numpy(), [2.0, 97.0])
    out = tu.normalize_range(x, "percentile", 2.0, 97.0)
    expected = ((x - float(lo)) / float(hi - lo)).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_off_is_unchanged():
    x = torch.rand(1, 4, 4, 3) * 2 - 0.5
    assert torch.equal(tu.normalize_range(x, "off"), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_is_a_clear_error(bad):
    x = torch.rand(1, 4, 4, 3)
    x[0, 1, 1, 1] = bad
    with pytest.raises(ValueError, match="image: 1 value"):
        tu.normalize_range(x, "minmax")


def test_bad_mode_and_percentiles_are_errors():
    x = torch.rand(1, 4, 4, 3)
    with pytest.raises(ValueError, match="unknown value"):
        tu.normalize_range(x, "max")
    with pytest.raises(ValueError, match="low .* must be below high"):
        tu.normalize_range(x, "percentile", 60, 40)


def test_check_image_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="MASK or LATENT"):
        tu.check_image(torch.rand(4, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        tu.check_image(torch.rand(1, 4, 4, 4), channels=(3,))
    with pytest.raises(ValueError, match="float"):
        tu.check_image(torch.zeros(1, 4, 4, 3, dtype=torch.uint8))


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (33, 32, 4), (32, 32, 0), (10, 32, 4), (1000, 256, 64)])
def test_tile_starts_cover_everything_with_equal_tiles(length, tile, overlap):
    starts = tu.tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : min(s + tile, length)] = True
        assert s + min(tile, length) <= length or length < tile
    assert covered.all()
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap  # at least the asked overlap


def test_feathered_tiles_reassemble_the_image_exactly():
    h, w, tile, overlap = 37, 53, 16, 6
    image = torch.rand(3, h, w)
    acc = torch.zeros_like(image)
    weight = torch.zeros(h, w)
    for t in tu.tile_grid(h, w, tile, overlap):
        m = tu.feather_mask(t, h, w, overlap)
        acc[:, t.y0 : t.y1, t.x0 : t.x1] += image[:, t.y0 : t.y1, t.x0 : t.x1] * m
        weight[t.y0 : t.y1, t.x0 : t.x1] += m
    assert weight.min() > 0
    assert torch.allclose(acc / weight, image, atol=1e-6)


def test_pick_dtype_respects_architecture_support():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tu.pick_dtype("auto", cpu) is torch.float32
    assert tu.pick_dtype("auto", cuda, supports_half=True) is torch.float16
    assert tu.pick_dtype("fp32", cuda, supports_half=False, supports_bfloat16=False) is torch.float32
    with pytest.raises(ValueError, match="does not support fp16"):
        tu.pick_dtype("fp16", cuda, supports_half=False)
    with pytest.raises(ValueError, match="does not support bf16"):
        tu.pick_dtype("bf16", cuda, supports_bfloat16=False)


def test_pad_to_multiple():
    x = torch.rand(1, 3, 10, 13)
    padded, ph, pw = tu.pad_to_multiple(x, 8)
    assert padded.shape == (1, 3, 16, 16) and (ph, pw) == (6, 3)
    assert torch.equal(padded[..., :10, :13], x)


def test_only_forward_only_books_record_under_cuda_malloc_async(monkeypatch, caplog):
    monkeypatch.delenv(tu.GRAPHS_WITH_MALLOC_ASYNC_ENV, raising=False)
    # A failed capture under cudaMallocAsync aborts ComfyUI (an uncatchable C++ exception): a
    # training book turns graphs off before the first capture there; a forward-only book
    # (USDU) records, behind the stricter checked run.
    import logging

    from speedkit.torch_utils import GraphBook, graph_capture_blocker

    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    book = GraphBook(lambda: [], 4, "T")
    assert graph_capture_blocker() is None
    assert not book.wants_capture("k") and book.wants_capture("k")  # second sighting records
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert tu.malloc_async_active()
    book = GraphBook(lambda: [], 4, "T")
    with caplog.at_level(logging.INFO):
        assert not book.wants_capture("k") and not book.wants_capture("k")
    assert "cudaMallocAsync" in (book.disabled or "") and "--disable-cuda-malloc" in caplog.text
    forward = GraphBook(lambda: [], 4, "T", forward_only=True)
    assert not forward.wants_capture("k") and forward.wants_capture("k")
    assert forward.disabled is None and graph_capture_blocker(forward_only=True) is None
    monkeypatch.setenv(tu.GRAPHS_WITH_MALLOC_ASYNC_ENV, "1")  # the maintainers' check switch
    assert graph_capture_blocker() is None


_LIB = torch.library.Library("speedkit_audit_test", "DEF")  # a test-only operator
_LIB.define("twice(Tensor x) -> Tensor")
_LIB.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")


def test_checked_run_refuses_what_would_break_a_capture_under_cuda_malloc_async():
    x = torch.randn(4, 8)
    lin = torch.nn.Linear(8, 8)
    with torch.inference_mode():
        out = tu.checked_run(lambda: torch.nn.functional.gelu(lin(x)).softmax(-1), pytorch_ops_only=True)
        assert torch.equal(out, torch.nn.functional.gelu(lin(x)).softmax(-1))  # same result, audit or not
        with pytest.raises(RuntimeError, match=r"outside PyTorch \(speedkit_audit_test\.twice"):
            tu.checked_run(lambda: torch.ops.speedkit_audit_test.twice(lin(x)), pytorch_ops_only=True)
        # the plain checked run (native allocator: a failed capture is an ordinary exception) lets it run
        assert torch.equal(tu.checked_run(lambda: torch.ops.speedkit_audit_test.twice(x)), x * 2)
    with pytest.raises(RuntimeError, match="autograd on"):
        tu.checked_run(lambda: lin(x), pytorch_ops_only=True)


def test_step_profiler_writes_a_report_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(tu.PROFILE_ENV, raising=False)
    off = tu.StepProfiler("loop", wait=1, active=2)
    for _ in range(5):
        off.step()
    off.close()
    assert off.folder is None
    monkeypatch.setenv(tu.PROFILE_ENV, str(tmp_path / "prof"))
    on = tu.StepProfiler("loop", wait=1, active=2)
    x = torch.randn(64, 64)
    for _ in range(5):
        x = torch.tanh(x @ x)
        on.step()
    on.close()
    (report,) = (tmp_path / "prof").glob("loop-*.txt")
    text = report.read_text()
    assert text.startswith("loop: wall per step [")
    assert "aten::mm" in text and "aten::tanh" in text


@pytest.mark.parametrize("good", ["my_lora", "Style v2 (final)", "a.b-c_d", "émoji ok 名前"])
def test_plain_file_names_pass_unchanged(good):
    assert tu.check_file_name(f"  {good} ", "output_name", "my_lora") == good


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("", "is empty"),
        ("../x", "plain file name"),
        ("a/b", "plain file name"),
        ("a\\b", "contains \\\\"),
        ("x; rm -rf ~", "contains ;"),
        ("$(id)", "contains \\$"),
        ("a`b`", "contains `"),
        ("nul\x00byte", "control character"),
        ("CON", "reserved device name"),
        ("lpt1.safetensors", "reserved device name"),
        (".hidden", "unusable part"),
        ("-rf", "unusable part"),
        ("trailing.", "unusable part"),
        ("x" * 201, "unusable part"),
    ],
)
def test_unusable_file_names_name_the_input(bad, why):
    with pytest.raises(ValueError, match=rf"^output_name=.*{why}"):
        tu.check_file_name(bad, "output_name", "my_lora")


def test_subfolders_stay_inside():
    assert tu.check_file_name("musubi/video", "filename_prefix", "musubi/video", subfolders=True) == "musubi/video"
    with pytest.raises(ValueError, match="must stay inside the output folder"):
        tu.check_file_name("a/../../b", "filename_prefix", "musubi/video", subfolders=True)


@pytest.mark.gpu
def test_refuse_host_syncs_raises_inside_and_restores_the_mode_after():
    x = torch.ones(4, device="cuda")
    before = torch.cuda.get_sync_debug_mode()
    with pytest.raises(RuntimeError, match="synchroniz"), tu.refuse_host_syncs():
        float(x.sum())  # a host read
    assert torch.cuda.get_sync_debug_mode() == before
    with tu.refuse_host_syncs():
        y = x * 2  # device work only: allowed
    assert float(y.sum()) == 8.0


def test_refuse_host_syncs_keeps_pytorchs_prototype_warning_off_the_console(monkeypatch):
    """PyTorch warns that sync debug mode is a prototype on every switch: the checked run would
    print it to the server's console each time. Other warnings still pass, and the mode is
    restored."""
    import warnings

    modes = []

    def set_mode(mode):
        warnings.warn(
            "Synchronization debug mode is a prototype feature and does not yet detect all", UserWarning, stacklevel=2
        )
        warnings.warn("another warning", UserWarning, stacklevel=2)
        modes.append(mode)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with tu.refuse_host_syncs():
            pass
    assert modes == ["error", 0]
    assert [str(w.message) for w in seen] == ["another warning", "another warning"]


def test_capture_failure_names_the_error_and_where_it_was_raised():
    def inner():
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore text")

    def outer():
        inner()

    try:
        outer()
    except RuntimeError as exc:
        line = tu.capture_failure(exc)
    assert line.startswith("capture failed (RuntimeError: CUDA error: operation failed due to a previous error")
    assert "more text" not in line and "\n" not in line
    assert "test_torch_utils.py" in line and " inner <- " in line and line.endswith(" outer)")


def test_collector_paused_restores_what_the_host_had():
    import gc

    from speedkit.torch_utils import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():  # nested: the outer block's pause stays
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # a host that runs with the collector off keeps it off
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("the block failed")
    assert gc.isenabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_collector_never_runs_inside_a_recordings_pool_window():
    """A memory pool freed while a pool is in use aborts the process (PyTorch's allocator
    asserts); an earlier run's book in a reference cycle is freed by the collector at any
    allocation. The checked run and the recording must therefore run with it paused."""
    import gc

    from speedkit.torch_utils import GraphBook

    x = torch.ones(64, device="cuda")
    seen: list[bool] = []

    def fn():
        seen.append(gc.isenabled())
        return x * 3

    book = GraphBook(lambda: [], 4, "T")
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        out = book.record(graph, fn)
    graph.replay()
    torch.cuda.synchronize()
    assert seen == [False, False]  # the checked run, then the recording
    assert gc.isenabled()
    assert float(out.sum()) == 192.0
