"""Per-tile conditioning crop math (pure; ControlNets are duck-typed stand-ins)."""

from __future__ import annotations

import pytest
import torch

from speedkit.usdu import cond
from speedkit.usdu.planner import Box

# A 1024x1024 source upscaled x2 to 2048x2048; the tile is the interior crop [480, 1056).
G = cond.TileGeometry(Box(480, 480, 1056, 1056), 2048, 2048, 1024, 1024, 576, 576)


def test_area_is_scaled_cropped_and_shifted_to_tile_latents():
    # area over source pixels x 256..768, y 256..512 -> canvas 512..1536 x 512..1024
    area = (256 // 8, 512 // 8, 256 // 8, 256 // 8)  # (h, w, y, x) in source latents
    assert cond.crop_area(area, G) == ((1024 - 512) // 8, (1056 - 512) // 8, (512 - 480) // 8, (512 - 480) // 8)
    assert cond.crop_area((8, 8, 0, 0), G) is None  # source 0..64 -> canvas 0..128: misses the tile
    # canvas 1024..2048 meets the crop 480..1056 in 1024..1056: 4 latents at offset (1024 - 480) / 8
    assert cond.crop_area(("percentage", 0.5, 0.5, 0.5, 0.5), G) == (4, 4, 68, 68)


def test_gligen_boxes_outside_are_dropped():
    pooled = torch.zeros(1, 768)
    g = ("position", "model", [(pooled, 8, 8, 0, 0), (pooled, 32, 32, 64, 64)])
    kind, model, boxes = cond.crop_gligen(g, G)
    assert (kind, model) == ("position", "model")
    # source 512..768 -> canvas 1024..1536, which meets the crop in 1024..1056
    assert len(boxes) == 1 and boxes[0][1:] == (4, 4, 68, 68)
    assert cond.crop_gligen(("position", "m", [(pooled, 8, 8, 0, 0)]), G) is None


def test_mask_and_hint_are_cut_to_the_crop_and_padded():
    # a hint at source size with a marker column at canvas x = 1000 (source x = 500)
    hint = torch.zeros(1, 3, 1024, 1024)
    hint[:, :, :, 500] = 1.0
    g = cond.TileGeometry(Box(480, 480, 1056, 1052), 2048, 1052, 1024, 526, 576, 576)  # crop 572 tall
    out = cond.crop_hint(hint, g, mode="nearest-exact")
    assert out.shape == (1, 3, 576, 576)
    cols = out[0, 0].sum(0).nonzero().flatten().tolist()
    assert 1000 - 480 in cols or 1001 - 480 in cols
    assert torch.equal(out[:, :, 571], out[:, :, 575])  # replicate padding at the bottom
    mask = torch.zeros(1024, 1024)
    mask[512:, :] = 1.0  # lower half of the picture
    m = cond.crop_mask(mask, G)
    assert m.shape == (576, 576)
    assert float(m[0, 0]) == 0.0 and float(m[-1, -1]) == 1.0
    assert float(m[1024 - 480 + 4, 10]) == 1.0 and float(m[1024 - 480 - 4, 10]) == 0.0


def test_reference_latent_is_cut_to_tile_latent_size():
    ref = torch.arange(128 * 128, dtype=torch.float32).reshape(1, 1, 128, 128).repeat(1, 16, 1, 1)
    out = cond.crop_latent(ref, G)
    assert out.shape == (1, 16, 72, 72)
    # canvas 480 / 2048 * 128 = 30: the tile starts 30 latent columns into the reference
    assert float(out[0, 0, 0, 0]) == pytest.approx(float(ref[0, 0, 30, 30]), abs=1.0)


class FakeControlNet:
    def __init__(self, hint, prev=None):
        self.cond_hint_original = hint
        self.previous_controlnet = prev
        self.upscale_algorithm = "nearest-exact"

    def copy(self):
        return FakeControlNet(self.cond_hint_original)

    def set_previous_controlnet(self, c):
        self.previous_controlnet = c
        return self


def test_whole_conditioning_is_cropped_without_touching_the_input():
    hint_a, hint_b = torch.rand(1, 3, 1024, 1024), torch.rand(1, 3, 512, 512)
    cn = FakeControlNet(hint_a, FakeControlNet(hint_b))
    mask = torch.ones(1, 1024, 1024)
    ref = torch.rand(1, 4, 128, 128)
    positive = [[torch.rand(1, 77, 768), {"pooled_output": torch.rand(1, 1280), "control": cn, "mask": mask}]]
    positive.append([torch.rand(1, 77, 768), {"reference_latents": [ref], "width": 99}])
    g2 = cond.TileGeometry(Box(1472, 0, 2048, 576), 2048, 2048, 1024, 1024, 576, 576)
    out = cond.crop_conditioning(positive, [G, g2], images=2)
    # originals untouched
    assert cn.cond_hint_original is hint_a and cn.previous_controlnet.cond_hint_original is hint_b
    assert positive[1][1]["width"] == 99 and "crop_w" not in positive[1][1]
    # the whole chain is copied and stacked per tile, each tile's slice batch = images
    c = out[0][1]["control"]
    assert c is not cn and c.cond_hint_original.shape == (4, 3, 576, 576)
    assert c.previous_controlnet.cond_hint_original.shape == (4, 3, 576, 576)
    assert out[0][1]["mask"].shape == (4, 576, 576)
    assert out[1][1]["reference_latents"][0].shape == (4, 4, 72, 72)
    # SDXL size conditioning: picture size, the (first) tile's offset and real size
    assert {k: out[1][1][k] for k in cond.SDXL_SIZE_KEYS} == {
        "width": 2048,
        "height": 2048,
        "crop_w": 480,
        "crop_h": 480,
        "target_width": 576,
        "target_height": 576,
    }


def test_area_entries_need_single_tiles_and_missing_areas_are_dropped():
    c = [[torch.rand(1, 77, 768), {"area": (8, 8, 0, 0)}], [torch.rand(1, 77, 768), {}]]
    assert cond.needs_single_tiles(c)
    corner = cond.TileGeometry(Box(0, 0, 576, 576), 2048, 2048, 1024, 1024, 576, 576)
    with pytest.raises(ValueError, match="one tile at a time"):
        cond.crop_conditioning(c, [G, corner], images=1)  # the area hits the corner tile only
    out = cond.crop_conditioning(c, [G], images=1)
    assert len(out) == 1 and "area" not in out[0][1]
    only_area = cond.crop_conditioning(c[:1], [G], images=1)
    assert len(only_area) == 1 and "area" not in only_area[0][1]  # kept unrestricted, not dropped to nothing


def test_conditioning_batch_must_match_images():
    cond.check_batch([[torch.rand(2, 77, 768), {}]], 2, "positive")
    cond.check_batch([[torch.rand(1, 77, 768), {}]], 2, "positive")
    with pytest.raises(ValueError, match="positive: conditioning 0 has batch 3 but the image batch is 2"):
        cond.check_batch([[torch.rand(3, 77, 768), {}]], 2, "positive")
    with pytest.raises(ValueError, match="negative: entry 0"):
        cond.check_batch([torch.rand(1, 77, 768)], 1, "negative")
    pooled3 = [[torch.rand(1, 77, 2048), {"pooled_output": torch.rand(3, 1280)}]]
    with pytest.raises(ValueError, match="positive: conditioning 0 pooled_output has batch 3 but the image batch is 2"):
        cond.check_batch(pooled3, 2, "positive")
    cond.check_batch(pooled3, 3, "positive")
    with pytest.raises(ValueError, match="negative: the CONDITIONING is empty; connect a text encoder"):
        cond.check_batch([], 1, "negative")


def sdxl_like_encode(calls: list):
    """Stand-in for a model's conditioning encoder: pooled prompt + the six size values
    (what SDXL's does, with the values themselves instead of their embeddings)."""

    def encode(params: dict) -> torch.Tensor:
        calls.append(dict(params))
        sizes = torch.tensor([[float(params[k]) for k in ("height", "width", "crop_h", "crop_w")]])
        targets = torch.tensor([[float(params["target_height"]), float(params["target_width"])]])
        pooled = params["pooled_output"]
        return torch.cat([pooled, sizes.expand(pooled.shape[0], -1), targets.expand(pooled.shape[0], -1)], dim=1)

    return encode


def one_call_rows(encode, entry: dict, images: int) -> torch.Tensor:
    """What one sampler call gives every sample: the entry encoded once, repeated to the batch."""
    y = encode(entry)
    return y.expand(images, -1) if y.shape[0] == 1 else y


@pytest.mark.parametrize("pooled_batch", [1, 2])
def test_batched_tiles_get_the_rows_each_tile_gets_alone(pooled_batch):
    images = 2
    geoms = [
        cond.TileGeometry(Box(x, y, x + 576, y + 576), 2048, 2048, 1024, 1024, 576, 576)
        for x, y in ((0, 0), (736, 0), (0, 736))
    ]
    positive = [[torch.rand(1, 77, 2048), {"pooled_output": torch.rand(pooled_batch, 8)}]]
    calls: list = []
    encode = sdxl_like_encode(calls)
    batched = cond.crop_conditioning(positive, geoms, images)
    rows = cond.per_tile_rows(encode, batched[0][1], cond.tile_size_values(geoms), images)
    assert rows.shape == (len(geoms) * images, 14)
    # the entry as it is (carrying tile 0's values), then once per tile
    assert [c["crop_w"] for c in calls] == [0, 0, 736, 0] and [c["crop_h"] for c in calls] == [0, 0, 0, 736]
    for k, g in enumerate(geoms):  # sample k * images + i = image i of tile k, sampled alone
        alone = cond.crop_conditioning(positive, [g], images)[0][1]
        assert torch.equal(rows[k * images : (k + 1) * images], one_call_rows(encode, alone, images))
    # without the per-tile rows every sample would carry tile 0's crop
    shared = one_call_rows(encode, batched[0][1], images)
    assert not torch.equal(rows[images : 2 * images], shared)


def test_per_tile_rows_is_none_when_the_encoder_ignores_sizes_or_has_no_vector():
    geoms = [G, cond.TileGeometry(Box(0, 0, 576, 576), 2048, 2048, 1024, 1024, 576, 576)]
    sizes = cond.tile_size_values(geoms)
    pooled = torch.rand(1, 8)
    assert cond.per_tile_rows(lambda p: pooled, {"pooled_output": pooled}, sizes, 1) is None
    assert cond.per_tile_rows(lambda p: None, {}, sizes, 1) is None
    assert sizes[1]["crop_w"] == 0 and sizes[0]["crop_w"] == 480


def test_tiles_share_a_call_only_where_areas_and_gligen_crop_alike():
    # Canvas 2048 from a 1024 source; tiles of 512 along the top row.
    row = [cond.TileGeometry(Box(x, 0, x + 512, 512), 2048, 2048, 1024, 1024, 512, 512) for x in range(0, 2048, 512)]
    # area over the left half of the source: 64 latents wide = 1024 canvas px = tiles 0 and 1
    left = [[torch.rand(1, 77, 768), {"area": (128, 64, 0, 0), "strength": 1.0}]]
    assert cond.split_by_scalars([left, []], row) == [(0, 2), (2, 4)]
    together = cond.crop_conditioning(left, row[:2], images=1)
    assert [d["area"] for _, d in together] == [(64, 64, 0, 0)]  # whole tile, the same for both
    outside = cond.crop_conditioning(left, row[2:], images=1)
    assert all("area" not in d for _, d in outside)
    # GLIGEN box on tile 1 only splits 0 | 1 | 2..3
    pooled = torch.rand(1, 768)
    gl = [[torch.rand(1, 77, 768), {"gligen": ("position", object(), [(pooled, 8, 8, 0, 40)])}]]
    assert cond.split_by_scalars([[], gl], row) == [(0, 1), (1, 2), (2, 4)]
    assert cond.split_by_scalars([[[torch.rand(1, 77, 768), {}]]], row) == [(0, 4)]


def test_per_tile_rows_keeps_the_samplers_vector_outside_the_size_elements():
    # ComfyUI's copy of a positive area entry in the negative list: the positive's params,
    # the negative's encoded vector. Only the size elements may come from the re-encoding.
    geoms = [G, cond.TileGeometry(Box(0, 0, 576, 576), 2048, 2048, 1024, 1024, 576, 576)]
    encode = sdxl_like_encode([])
    pos = cond.crop_conditioning([[torch.rand(1, 77, 2048), {"pooled_output": torch.rand(1, 8)}]], geoms, 1)[0][1]
    neg = dict(pos, pooled_output=torch.rand(1, 8))
    rows = cond.per_tile_rows(encode, pos, cond.tile_size_values(geoms), 1, current=encode(neg))
    for k, g in enumerate(geoms):
        alone_neg = dict(neg, **cond.sdxl_size_values(g))
        assert torch.equal(rows[k], encode(alone_neg)[0])
    # a vector encoded with other sizes cannot be patched exactly: left alone
    other = encode(dict(neg, crop_w=8))
    assert cond.per_tile_rows(encode, pos, cond.tile_size_values(geoms), 1, current=other) is None
    assert cond.per_tile_rows(encode, pos, cond.tile_size_values(geoms), 1, current=torch.rand(1, 3)) is None
