"""``conditioning_on_device``: the run's conditioning copied to the model's device once.

CPU, no ComfyUI: the COND objects below hold their tensor in ``.cond`` like ComfyUI's
``comfy.conds`` classes. The "meta" device stands in for a GPU on CPU-only machines (no data is
copied there, but devices, identities and byte counts are real); ``SPEEDKIT_TEST_DEVICE=cuda``
also checks the copied values.
"""

from __future__ import annotations

import pytest
import torch

from speedkit.fbcache import conditioning_on_device


class _Cond:
    """Like ``comfy.conds.CONDRegular``: a tensor in ``.cond`` plus behaviour."""

    def __init__(self, cond, tag: str = "") -> None:
        self.cond = cond
        self.tag = tag

    def concat(self, others):
        return torch.cat([self.cond, *(o.cond for o in others)])


class _Constant:
    def __init__(self, cond) -> None:
        self.cond = cond


def _conds():
    text = torch.randn(1, 7, 16)
    pooled = torch.randn(1, 8)
    positive = [
        {
            "model_conds": {"c_crossattn": _Cond(text, "cross"), "y": _Cond(pooled), "guidance": _Constant(3.5)},
            "control": "a controlnet object",
            "cross_attn": text,
        }
    ]
    negative = [{"model_conds": {"c_crossattn": _Cond(torch.randn(1, 7, 16))}, "strength": 0.5}]
    return {"positive": positive, "negative": negative, "empty": None}, text, pooled


def test_cpu_device_copies_nothing() -> None:
    conds, _, _ = _conds()
    out, moved = conditioning_on_device(conds, "cpu")
    assert moved == 0
    assert out["positive"] is conds["positive"]


def test_tensors_move_inputs_untouched_other_keys_kept() -> None:
    conds, text, pooled = _conds()
    before = {k: v and [dict(e, model_conds=dict(e["model_conds"])) for e in v] for k, v in conds.items()}
    out, moved = conditioning_on_device(conds, "meta")

    assert moved == (text.numel() + pooled.numel() + 7 * 16) * 4
    pos = out["positive"][0]["model_conds"]
    assert pos["c_crossattn"].cond.device.type == "meta"
    assert pos["y"].cond.device.type == "meta"
    assert pos["c_crossattn"].tag == "cross" and type(pos["c_crossattn"]) is _Cond  # same class, attributes kept
    assert pos["guidance"] is conds["positive"][0]["model_conds"]["guidance"]  # no tensor: kept as is
    assert out["positive"][0]["control"] == "a controlnet object"
    assert out["positive"][0]["cross_attn"] is text  # only model_conds are used per call
    assert out["negative"][0]["strength"] == 0.5
    assert out["empty"] is None
    # The caller's dicts and COND objects still hold the CPU tensors.
    for k, v in before.items():
        for old, new in zip(v or [], conds[k] or [], strict=True):
            assert old["model_conds"] == new["model_conds"]
    assert conds["positive"][0]["model_conds"]["c_crossattn"].cond is text


def test_tensor_already_on_device_is_not_copied() -> None:
    on_meta = _Cond(torch.empty(2, 3, device="meta"))
    out, moved = conditioning_on_device({"positive": [{"model_conds": {"c": on_meta}}]}, "meta")
    assert moved == 0
    assert out["positive"][0]["model_conds"]["c"] is on_meta


def test_values_and_concat_equal_on_the_device(device) -> None:
    if device.type == "cpu":
        pytest.skip("values are compared on a GPU (SPEEDKIT_TEST_DEVICE=cuda); the CPU copies nothing")
    conds, _, _ = _conds()
    out, _ = conditioning_on_device(conds, device)
    a = conds["positive"][0]["model_conds"]["c_crossattn"]
    b = conds["negative"][0]["model_conds"]["c_crossattn"]
    on_host = a.concat([b]).to(device, torch.bfloat16)  # what ComfyUI does every call without the move
    on_dev = out["positive"][0]["model_conds"]["c_crossattn"].concat([out["negative"][0]["model_conds"]["c_crossattn"]])
    assert torch.equal(on_dev.to(torch.bfloat16), on_host)
