"""Dataset scan, bad inputs, aspect buckets, crops, SDXL time_ids and caption augmentation."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from speedkit.lora_train import data


def _image(path, w, h, color=(200, 40, 40)):
    Image.new("RGB", (w, h), color).save(path)
    return path


def test_scan_pairs_images_with_captions(tmp_path):
    _image(tmp_path / "b.png", 64, 64)
    _image(tmp_path / "a.jpg", 64, 64)
    (tmp_path / "a.txt").write_text("a red square\n")
    (tmp_path / "b.txt").write_text("tag1, tag2")
    (tmp_path / "notes.md").write_text("ignored")
    items = data.scan_folder(tmp_path)
    assert [(i.image.name, i.caption) for i in items] == [("a.jpg", "a red square"), ("b.png", "tag1, tag2")]


def test_missing_captions_fail_or_use_default(tmp_path):
    _image(tmp_path / "a.png", 64, 64)
    with pytest.raises(ValueError, match=r"1 image\(s\).*no \.txt caption.*a\.png.*default_caption"):
        data.scan_folder(tmp_path)
    assert data.scan_folder(tmp_path, default_caption="photo of sks")[0].caption == "photo of sks"


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no image"):
        data.scan_folder(tmp_path)
    with pytest.raises(ValueError, match="dataset_folder: .*nope' does not exist"):
        data.scan_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="dataset_folder: empty"):
        data.scan_folder("  ")


def test_unreadable_and_tiny_images(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        data.load_image(bad)
    tiny = _image(tmp_path / "tiny.png", 16, 200)
    with pytest.raises(ValueError, match=r"tiny\.png is 16x200 px.*at least 32"):
        data.load_image(tiny)


def test_resolution_multiple():
    data.validate_resolution(1024, 64)
    with pytest.raises(ValueError, match=r"resolution=1000 must be a positive multiple of 64.*1024"):
        data.validate_resolution(1000, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        data.validate_resolution(514, 8)


def test_buckets_respect_area_sides_and_step():
    buckets = data.make_buckets(1024, 512, 2048, 64)
    assert (1024, 1024) in buckets and (768, 1344) in buckets and (1344, 768) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 512 <= w <= 2048 and 512 <= h <= 2048
        assert w * h <= 1024 * 1024
    with pytest.raises(ValueError, match="bucket_step"):
        data.make_buckets(1024, 512, 2048, 12)


def test_placement_time_ids_match_bucket_and_crop():
    buckets = data.make_buckets(1024, 512, 2048, 64)
    p = data.place((3000, 2000), buckets, 64, no_upscale=False)
    bw, bh = p.bucket
    assert abs(bw / bh - 1.5) < 0.1
    assert p.resized[0] >= bw and p.resized[1] >= bh
    assert abs(p.resized[0] / p.resized[1] - 1.5) < 0.01, "never stretched"
    assert (p.crop_left, p.crop_top) == ((p.resized[0] - bw) // 2, (p.resized[1] - bh) // 2)
    assert p.time_ids == (2000, 3000, p.crop_top, p.crop_left, bh, bw)


def test_no_upscale_keeps_small_images_small():
    buckets = data.make_buckets(512, 256, 1024, 64)
    up = data.place((300, 200), buckets, 64, no_upscale=False)
    assert up.bucket[0] * up.bucket[1] > 300 * 200
    small = data.place((300, 200), buckets, 64, no_upscale=True)
    assert small.bucket == (256, 192)
    assert small.resized[0] <= 300 and small.resized[1] <= 200


def test_render_crops_the_right_region():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 60, 100))  # white x < 60 -> x < 57.6 after resize, 9.6 px after the crop
    p = data.Placement(original=(200, 100), bucket=(96, 96), resized=(192, 96), crop_left=48, crop_top=0)
    out = data.render(img, p)
    assert out.shape == (96, 96, 3) and out.dtype == torch.float32
    assert out[:, :5].mean() > 0.9 and out[:, -10:].mean() < 0.05


def test_caption_dropout_shuffle_keep_tokens():
    rng = random.Random(0)
    caption = "sks person, red hat, smiling, outdoors, night"
    seen = set()
    for _ in range(50):
        out = data.process_caption(caption, rng, 0.0, True, 1)
        assert out.startswith("sks person, ")
        assert sorted(out.split(", ")) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5
    assert data.process_caption(caption, rng, 0.0, False, 0) == caption
    drops = sum(data.process_caption(caption, rng, 0.3, False, 0) == "" for _ in range(2000))
    assert 500 < drops < 700
