"""Run real musubi-tuner utility scripts (no GPU, no model downloads) through our runner.

``convert_lora.py`` and ``lora_post_hoc_ema.py`` only need torch + safetensors, so with
``MUSUBI_TUNER_ROOT`` (set by tests/conftest.py when tests/setup_comfyui.sh extracted the tree)
they run for real: the command lines, working directory, environment (``src`` on PYTHONPATH)
and success checks are the ones the nodes use. ``MUSUBI_TUNER_PYTHON`` names musubi's venv;
without it the test interpreter stands in (it has torch and safetensors, all these two
scripts import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speedkit.musubi import lora_file
from speedkit.musubi.commands import convert_lora_argv, post_hoc_ema_argv
from speedkit.musubi.env import MusubiEnv, validate_env
from speedkit.musubi.runner import MusubiRunError, run_command

ROOT = os.environ.get("MUSUBI_TUNER_ROOT", "")
PYTHON = os.environ.get("MUSUBI_TUNER_PYTHON") or (sys.executable if ROOT else "")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (ROOT and PYTHON), reason="set MUSUBI_TUNER_ROOT (a musubi-tuner v0.3.4 checkout)"),
]


@pytest.fixture(scope="module")
def env() -> MusubiEnv:
    e = MusubiEnv(root=Path(ROOT), python=Path(PYTHON))
    probe = subprocess.run([PYTHON, "-c", "import torch, safetensors"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("MUSUBI_TUNER_PYTHON cannot import torch and safetensors")
    validate_env(e, ("convert_lora", "lora_post_hoc_ema"))  # these two scripts need no accelerate
    return e


def musubi_lora(path: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"):
        sd[f"{name}.lora_down.weight"] = torch.randn(4, 16, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(32, 4, generator=g) * scale
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return sd


def test_convert_lora_round_trip_with_real_musubi(env, tmp_path):
    src = tmp_path / "lora.safetensors"
    original = musubi_lora(src)
    assert lora_file.detect_lora_format(lora_file.read_safetensors_keys(src)[0]) == "default"
    other = tmp_path / "lora_other.safetensors"
    run_command(convert_lora_argv(env, str(src), str(other), "other"), cwd=env.root, env=env.run_env(),
                log_path=tmp_path / "c1.log", expected_outputs=[other])  # fmt: skip
    keys = lora_file.read_safetensors_keys(other)[0]
    assert lora_file.detect_lora_format(keys) == "other" and all(k.startswith("diffusion_model.") for k in keys)
    back = tmp_path / "lora_back.safetensors"
    run_command(convert_lora_argv(env, str(other), str(back), "default"), cwd=env.root, env=env.run_env(),
                expected_outputs=[back])  # fmt: skip
    restored = load_file(str(back))

    def delta(sd, name):  # what the LoRA adds to the weight: up @ down * alpha / rank
        down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
        return up @ down * float(sd[f"{name}.alpha"]) / down.shape[0]

    for name in {k.rsplit(".", 2)[0] for k in original if k.endswith("lora_down.weight")}:
        torch.testing.assert_close(delta(restored, name), delta(original, name), rtol=1e-4, atol=1e-4)


def test_post_hoc_ema_with_real_musubi(env, tmp_path):
    a, b = tmp_path / "a-000001.safetensors", tmp_path / "a-000002.safetensors"
    sa, sb = musubi_lora(a, 1.0), musubi_lora(b, 3.0)
    out = tmp_path / "ema.safetensors"
    argv = post_hoc_ema_argv(env, [str(a), str(b)], str(out), beta=0.5, no_sort=True)
    result = run_command(argv, cwd=env.root, env=env.run_env(), log_path=tmp_path / "ema.log", expected_outputs=[out])
    assert result.returncode == 0
    merged = load_file(str(out))
    key = "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"
    lo, hi = torch.minimum(sa[key], sb[key]), torch.maximum(sa[key], sb[key])
    m = merged[key].float()
    assert bool(((m >= lo - 1e-4) & (m <= hi + 1e-4)).all())  # an average of the two checkpoints
    assert not torch.allclose(m, sa[key]) and not torch.allclose(m, sb[key])


def lycoris_file(path: Path, kind: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small LoHa or LoKr with the names musubi's networks.loha / networks.lokr save."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"):  # 32 x 16
        if kind == "loha":
            for w, shape in (("w1_a", (32, 4)), ("w1_b", (4, 16)), ("w2_a", (32, 4)), ("w2_b", (4, 16))):
                sd[f"{name}.hada_{w}"] = torch.randn(*shape, generator=g) * scale
        else:
            sd[f"{name}.lokr_w1"] = torch.randn(4, 4, generator=g) * scale
            sd[f"{name}.lokr_w2_a"] = torch.randn(8, 2, generator=g) * scale
            sd[f"{name}.lokr_w2_b"] = torch.randn(2, 4, generator=g) * scale
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_convert_loha_lokr_round_trip_with_real_musubi(env, tmp_path, kind):
    """convert_lora.py (v0.3.4) maps hada_* / lokr_* tensors both ways: the Convert node accepts these files."""
    src = tmp_path / f"{kind}.safetensors"
    original = lycoris_file(src, kind)
    info = lora_file.inspect_lora(lora_file.read_safetensors_keys(src)[0])
    assert (info.kind, info.layout) == (kind, "default")
    lora_file.check_convertible(info)
    other = tmp_path / f"{kind}_other.safetensors"
    run_command(convert_lora_argv(env, str(src), str(other), "other"), cwd=env.root, env=env.run_env(),
                expected_outputs=[other])  # fmt: skip
    info = lora_file.inspect_lora(lora_file.read_safetensors_keys(other)[0])
    assert (info.kind, info.layout) == (kind, "other")  # auto direction: back to musubi
    back = tmp_path / f"{kind}_back.safetensors"
    run_command(convert_lora_argv(env, str(other), str(back), "default"), cwd=env.root, env=env.run_env(),
                expected_outputs=[back])  # fmt: skip
    restored = load_file(str(back))
    assert set(restored) == set(original)
    for key, value in original.items():
        torch.testing.assert_close(restored[key].float(), value.float())


def test_post_hoc_ema_of_lokr_checkpoints_with_real_musubi(env, tmp_path):
    """lora_post_hoc_ema.py averages tensor by tensor, whatever the network type."""
    a, b = tmp_path / "k-000001.safetensors", tmp_path / "k-000002.safetensors"
    sa, sb = lycoris_file(a, "lokr", 1.0), lycoris_file(b, "lokr", 3.0)
    lora_file.check_same_tensors([(str(a), list(sa)), (str(b), list(sb))])
    out = tmp_path / "ema.safetensors"
    argv = post_hoc_ema_argv(env, [str(a), str(b)], str(out), beta=0.5, no_sort=True)
    run_command(argv, cwd=env.root, env=env.run_env(), log_path=tmp_path / "ema.log", expected_outputs=[out])
    merged = load_file(str(out))
    key = "lora_unet_single_blocks_1_linear1.lokr_w1"
    torch.testing.assert_close(merged[key], (sa[key] + sb[key]) / 2)
    assert lora_file.inspect_lora(list(merged)).kind == "lokr"


def test_real_script_failure_is_reported(env, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(MusubiRunError) as info:
        run_command(convert_lora_argv(env, str(missing), str(tmp_path / "o.safetensors"), "other"), cwd=env.root,
                    env=env.run_env(), log_path=tmp_path / "f.log", expected_outputs=[tmp_path / "o.safetensors"])  # fmt: skip
    assert info.value.returncode != 0 and "Traceback" in (tmp_path / "f.log").read_text()
