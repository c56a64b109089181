"""On-disk cache of frozen text-encoder outputs: reuse, validity keys, corruption, atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

from speedkit.lora_train import text_cache, trainer

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red cube", "a blue ball", "green tree, sky", "a red cube"]  # one caption twice
LAYOUT = text_cache.Layout("toy", context_dim=32, pooled_dim=32)


class CountingCLIP:
    """A real CLIP text transformer (random weights, tiny config) behind a byte tokenizer,
    returning what ComfyUI's CLIP returns for one caption: cond [1, 77, D] and pooled [1, D]."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, layer: int = -1) -> None:
        torch.manual_seed(seed)
        config = transformers.CLIPTextConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            eos_token_id=2,
        )
        self.model = transformers.CLIPTextModel(config).eval().to(dtype)
        self.layer = layer
        self.calls: list[str] = []

    def tokens(self, text: str) -> torch.Tensor:
        ids = [1] + [b + 3 for b in text.encode()[:75]] + [2]
        return torch.tensor([ids + [2] * (77 - len(ids))])

    def __call__(self, text: str) -> dict[str, torch.Tensor]:
        self.calls.append(text)
        with torch.no_grad():
            out = self.model(self.tokens(text), output_hidden_states=True)
        cond = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        return {"cond": cond, "pooled": out.pooler_output}

    def fingerprint(self) -> str:
        probe = self("probe text")
        self.calls.pop()
        return text_cache.encoder_fingerprint(self.model.state_dict().items(), probe)


def make_cache(folder, clip: CountingCLIP, layout=LAYOUT) -> text_cache.TextEncoderCache:
    return text_cache.TextEncoderCache(folder, clip, clip.fingerprint(), layout)


def test_second_run_loads_bit_identical_without_encoding(tmp_path):
    first = CountingCLIP()
    cache = make_cache(tmp_path, first)
    got = [cache.get(c) for c in CAPTIONS]
    assert first.calls == CAPTIONS[:3]  # the repeated caption is already on disk
    assert (cache.hits, cache.misses) == (1, 3)
    assert len(list(tmp_path.glob("te-*.safetensors"))) == 3

    second = CountingCLIP()  # a new process: same weights, nothing in memory
    again = make_cache(tmp_path, second)
    loaded = [again.get(c) for c in CAPTIONS]
    assert second.calls == []
    assert (again.hits, again.misses) == (4, 0)
    for caption, a, b in zip(CAPTIONS, got, loaded, strict=True):
        fresh = second(caption)
        for key in ("cond", "pooled"):
            assert b[key].dtype == fresh[key].dtype
            assert torch.equal(b[key], fresh[key]), (caption, key)
            assert torch.equal(a[key], fresh[key])


def test_half_precision_outputs_stay_bit_identical(tmp_path):
    clip = CountingCLIP(dtype=torch.bfloat16)
    make_cache(tmp_path, clip).get("a red cube")
    loaded = make_cache(tmp_path, CountingCLIP(dtype=torch.bfloat16)).get("a red cube")
    assert loaded["cond"].dtype == torch.bfloat16
    assert torch.equal(loaded["cond"], clip("a red cube")["cond"])


def test_changed_caption_or_encoder_invalidates(tmp_path):
    make_cache(tmp_path, CountingCLIP()).get("a red cube")

    other_text = CountingCLIP()
    make_cache(tmp_path, other_text).get("a red cube, smiling")
    assert other_text.calls == ["a red cube, smiling"]

    finetuned = CountingCLIP()  # a fine-tune moves (nearly) every weight a little
    with torch.no_grad():
        for p in finetuned.model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    make_cache(tmp_path, finetuned).get("a red cube")
    assert finetuned.calls == ["a red cube"]

    one_tensor = CountingCLIP()  # only the final norm changed: still a different encoder
    norm = next(n for n, m in one_tensor.model.named_modules() if n.endswith("final_layer_norm"))
    with torch.no_grad():
        one_tensor.model.get_submodule(norm).weight.mul_(1.01)
    make_cache(tmp_path, one_tensor).get("a red cube")
    assert one_tensor.calls == ["a red cube"]

    skip = CountingCLIP(layer=-2)  # same weights, clip skip (like a pending patch): only the probe tells
    make_cache(tmp_path, skip).get("a red cube")
    assert skip.calls == ["a red cube"]
    assert torch.equal(
        make_cache(tmp_path, CountingCLIP(layer=-2)).get("a red cube")["cond"], skip("a red cube")["cond"]
    )


def test_layout_is_part_of_the_key(tmp_path):
    def sd15(text):
        return {"cond": torch.full((1, 77, 768), float(len(text)))}

    def sdxl(text):
        return {"cond": torch.full((1, 77, 2048), float(len(text))), "pooled": torch.ones(1, 1280)}

    a = text_cache.TextEncoderCache(tmp_path, sd15, "same-fingerprint", text_cache.Layout("sd15", 768))
    b = text_cache.TextEncoderCache(tmp_path, sdxl, "same-fingerprint", text_cache.Layout("sdxl", 2048, 1280))
    assert a.get("x")["cond"].shape == (1, 77, 768)
    assert b.get("x")["cond"].shape == (1, 77, 2048)
    assert a.path_for("x") != b.path_for("x")
    # an entry copied under the other layout's name is refused (metadata and shapes) and rewritten
    os.replace(a.path_for("x"), b.path_for("x"))
    assert b.get("x")["pooled"].shape == (1, 1280)
    assert (b.misses, b.hits) == (2, 0)
    assert b.get("x")["cond"].shape == (1, 77, 2048)
    assert b.hits == 1


def test_encoder_output_not_matching_layout_is_an_error(tmp_path):
    cache = text_cache.TextEncoderCache(
        tmp_path, lambda t: {"cond": torch.zeros(1, 77, 768)}, "fp", text_cache.Layout("sdxl", 2048, 1280)
    )
    with pytest.raises(ValueError, match="layout sdxl"):
        cache.get("x")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "stale_text"])
def test_corrupt_or_stale_entry_is_recovered(tmp_path, damage):
    clip = CountingCLIP()
    cache = make_cache(tmp_path, clip)
    good = cache.get("a blue ball")
    path = cache.path_for("a blue ball")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 16 + raw[16:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # another caption's valid entry under this name
        cache.get("a red cube")
        os.replace(cache.path_for("a red cube"), path)

    again = CountingCLIP()
    recovered = make_cache(tmp_path, again)
    out = recovered.get("a blue ball")
    assert again.calls == ["a blue ball"]
    assert torch.equal(out["cond"], good["cond"])
    third = CountingCLIP()
    assert torch.equal(make_cache(tmp_path, third).get("a blue ball")["cond"], good["cond"])
    assert third.calls == []  # the entry was rewritten


def test_writes_are_atomic_and_failures_do_not_stop_training(tmp_path, monkeypatch):
    clip = CountingCLIP()
    cache = make_cache(tmp_path, clip)
    cache.get("a red cube")
    assert [p.name for p in tmp_path.iterdir()] == [cache.path_for("a red cube").name]  # no temp file left

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(text_cache.os, "replace", refuse)
    out = cache.get("a blue ball")
    assert out["cond"].shape == (1, 77, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.path_for("a red cube").name]


def test_trainer_conditioning_through_the_cache(tmp_path):
    """The frozen-TE path of a run: precompute (fixed captions) and per-step caption dropout both
    go through the disk cache, and a second run encodes nothing."""
    samples = [trainer.Sample(torch.zeros(4, 4, 4), c, (64, 64, 0, 0, 64, 64), (32, 32)) for c in CAPTIONS]

    def encoder(cache):
        def encode(captions, batch):
            return trainer.stack_conditioning([{"context": cache.get(c)["cond"].float()} for c in captions])

        return encode

    clip = CountingCLIP()
    first = trainer.precompute_conditioning(encoder(make_cache(tmp_path, clip)), samples)
    again_clip = CountingCLIP()
    second = trainer.precompute_conditioning(encoder(make_cache(tmp_path, again_clip)), samples)
    assert again_clip.calls == []
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k]["context"], second[k]["context"]) for k in first)

    # caption dropout, no shuffle: the texts are the captions and "" (a bounded set, cached once)
    dropout_clip = CountingCLIP()
    cache = make_cache(tmp_path, dropout_clip)
    encode = encoder(cache)
    for caption in ["", *CAPTIONS, ""]:
        encode([caption], samples[:1])
    assert dropout_clip.calls == [""]


def _image_dataset(folder):
    from PIL import Image

    from speedkit.lora_train import data

    for i, color in enumerate([(200, 20, 20), (20, 200, 20)]):
        Image.new("RGB", (64 + 32 * i, 64), color).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption {i}")
    return data.scan_folder(folder)


def test_latent_disk_cache_reuse_and_corruption(tmp_path):
    """The latent half of the disk cache: reused bit-identically, corrupt entries re-encoded, atomic."""
    from speedkit.lora_train.prepare import build_samples

    items = _image_dataset(tmp_path)
    cache_dir = tmp_path / "_latent_cache"
    calls = []

    def encode_image(pixels):
        calls.append(pixels.shape)
        return torch.nn.functional.avg_pool2d(pixels.permute(2, 0, 1), 8)[:, :, :] * 3 - 1

    def build():
        return build_samples(
            items,
            resolution=64,
            min_bucket=64,
            max_bucket=128,
            bucket_step=64,
            no_upscale=False,
            encode_image=encode_image,
            cache_dir=cache_dir,
            encoder_id="vae",
        )

    first = build()
    assert len(calls) == 2
    files = sorted(cache_dir.glob("*.safetensors"))
    assert len(files) == 2 and not list(cache_dir.glob(".*.tmp"))
    second = build()
    assert len(calls) == 2, "the second run must load, not encode"
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(first, second, strict=True))

    files[0].write_bytes(files[0].read_bytes()[:20])  # truncated by a crash or a full disk
    third = build()
    assert len(calls) == 3
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(first, third, strict=True))
    build()
    assert len(calls) == 3, "the corrupt entry was rewritten"
