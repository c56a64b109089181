"""diffusers reads our SD1.5 kohya file the way we train it (skipped without diffusers + peft).

A tiny diffusers ``UNet2DConditionModel`` (SD1.5 block layout) gets our LoRA layers, random up
weights, and is saved with our kohya writer. diffusers' own loader must accept every key (no
"unexpected keys") and its LoRA-patched UNet must give the same output as ours.
"""

from __future__ import annotations

import logging

import pytest
import torch

from speedkit.lora_train import checkpoint, layers

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("peft", reason="diffusers loads LoRAs through peft, which is not installed")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def load_in_diffusers(path, caplog) -> tuple[torch.nn.Module, list[str]]:
    """diffusers' own kohya loading; returns the patched UNet and its "unexpected keys" warnings."""
    from diffusers.utils import logging as diffusers_logging

    unet = tiny_unet()
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    diffusers_logging.enable_propagation()  # diffusers' loggers do not reach caplog otherwise
    try:
        with caplog.at_level(logging.WARNING):
            diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="speedkit")
    finally:
        diffusers_logging.disable_propagation()
    return unet, [r.getMessage() for r in caplog.records if "unexpected keys" in r.getMessage()]


@pytest.mark.parametrize("preset", ["attention", "attention+mlp"])
def test_diffusers_loads_the_file_and_agrees(tmp_path, preset, caplog):
    ours = tiny_unet().requires_grad_(False)
    lora = layers.LoRASet()
    lora.add(ours, layers.find_unet_targets(ours, preset), rank=4, alpha=2.0, prefix="lora_unet")
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.2)
    path = checkpoint.save_lora(tmp_path / "sd15.safetensors", lora.state_dict(torch.float32), {})
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([321]), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = ours(x, t, encoder_hidden_states=ctx).sample

    theirs, unexpected = load_in_diffusers(path, caplog)
    assert unexpected == []
    with torch.no_grad():
        got = theirs(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        base = tiny_unet()(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(got, base, atol=1e-4), "the LoRA must change the output"


def test_the_unexpected_key_check_works(tmp_path, caplog):
    """Guard for the test above: a key diffusers cannot place is reported by the same check."""
    unet = tiny_unet()
    lora = layers.LoRASet()
    lora.add(unet, layers.find_unet_targets(unet, "attention"), rank=4, alpha=2.0, prefix="lora_unet")
    tensors = lora.state_dict(torch.float32)
    bogus = "lora_unet_down_blocks_0_attentions_0_bogus_layer"
    tensors.update(
        {
            f"{bogus}.lora_down.weight": torch.zeros(4, 32),
            f"{bogus}.lora_up.weight": torch.zeros(32, 4),
            f"{bogus}.alpha": torch.tensor(2.0),
        }
    )
    path = checkpoint.save_lora(tmp_path / "bogus.safetensors", tensors, {})
    _, unexpected = load_in_diffusers(path, caplog)
    assert unexpected and "bogus" in unexpected[0]
