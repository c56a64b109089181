"""Dataset TOML: musubi's schema rules, our stricter checks, writing, scanning captions."""

from __future__ import annotations

import pytest
import tomllib
from PIL import Image

from speedkit.musubi import dataset as ds
from speedkit.musubi.dataset import DatasetConfigError, validate_config


def problems(config, strict=True) -> str:
    with pytest.raises(DatasetConfigError) as info:
        validate_config(config, strict=strict)
    return "\n".join(info.value.problems)


def test_good_image_and_video_config_round_trip(tmp_path):
    config = ds.build_config(
        {"resolution": (960, 544), "caption_extension": ".txt", "enable_bucket": True, "batch_size": None},
        [
            {"image_directory": str(tmp_path / "img"), "cache_directory": str(tmp_path / "c1")},
            {"video_directory": str(tmp_path / "vid"), "target_frames": [1, 25], "source_fps": 30.0,
             "frame_extraction": "head"},
        ],
    )  # fmt: skip
    assert "batch_size" not in config["general"] and config["general"]["resolution"] == [960, 544]
    assert validate_config(config) == []
    path = ds.write_config(config, tmp_path / "d.toml")
    text = path.read_text()
    assert "source_fps = 30.0" in text and "resolution = [960, 544]" in text
    assert tomllib.loads(text) == config


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"datasets": [{"video_directory": "/v", "source_fps": 30}]}, "source_fps = 30 must be a float (write 30.0"),
        ({"general": {"cache_directory": "/c"}, "datasets": []}, "general.cache_directory: unknown key (cache_directory must be set per dataset"),
        ({"datasets": [{"image_directory": "/i", "target_frames": [1]}]}, "datasets[0].target_frames: unknown key (a video-only key"),
        ({"dataset": []}, "dataset: unknown top-level key"),
        ({"general": {"resolution": [1, 2, 3]}}, "general.resolution = [1, 2, 3] must be an integer or [width, height]"),
        ({"general": {"enable_bucket": "true"}}, "general.enable_bucket = 'true' must be true or false"),
        ({"general": {"batch_size": True}}, "general.batch_size = True must be an integer"),
        ({"datasets": [{"video_directory": "/v", "target_frames": ["1"]}]}, "target_frames = ['1'] must be a list of integers"),
        ({"datasets": [{"image_directory": "/i", "colour_aug": True}]}, "datasets[0].colour_aug: unknown key"),
    ],
)  # fmt: skip
def test_schema_errors_name_the_key(config, needle):
    assert needle in problems(config, strict=False)


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"general": {"resolution": [960, 540], "caption_extension": ".txt"}, "datasets": [{"image_directory": "/i"}]},
         "datasets[0].resolution = [960, 540] (width, height): both must be positive multiples of 16, e.g. [960, 544]"),
        ({"datasets": [{"image_directory": "/a", "caption_extension": ".txt"},
                       {"image_directory": "/b", "cache_directory": "/a", "caption_extension": ".txt"}]},
         "datasets[1].cache_directory: datasets[0] and datasets[1] share the cache folder"),
        ({"datasets": [{"image_directory": "/a"}]}, "datasets[0].caption_extension is not set"),
        ({"datasets": [{"image_jsonl_file": "/a.jsonl"}]}, "cache_directory is required with image_jsonl_file"),
        ({"datasets": [{"num_repeats": 2}]}, "datasets[0]: set image_directory (or image_jsonl_file)"),
        ({"datasets": []}, "no [[datasets]] entry"),
        ({"datasets": [{"video_directory": "/v", "caption_extension": ".txt", "frame_extraction": "random"}]},
         "frame_extraction = 'random' must be one of head, chunk, slide, uniform, full"),
    ],
)  # fmt: skip
def test_strict_checks(config, needle):
    assert needle in problems(config)


def test_target_frames_not_4n_plus_1_is_a_warning():
    warnings = validate_config(
        {"datasets": [{"video_directory": "/v", "caption_extension": ".t", "target_frames": [24]}]}
    )
    assert warnings == ["datasets[0].target_frames 24 is not 4*N+1; musubi will use 21"]


def test_load_toml_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ds.load_toml(tmp_path / "nope.toml")
    (tmp_path / "x.yaml").write_text("a: 1")
    with pytest.raises(ValueError, match="must be a .toml or .json file"):
        ds.load_toml(tmp_path / "x.yaml")
    (tmp_path / "bad.toml").write_text("[general\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        ds.load_toml(tmp_path / "bad.toml")


def test_scan_finds_media_and_missing_captions(tmp_path):
    for name in ("a.png", "b.jpg", "c.webp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("caption a")
    (tmp_path / "notes.md").write_text("ignored")
    config = {"general": {"caption_extension": ".txt"}, "datasets": [{"image_directory": str(tmp_path)}]}
    scan = ds.scan_dataset(config["datasets"][0], 0, config["general"])
    assert [p.name for p in scan.items] == ["a.png", "b.jpg", "c.webp"]
    assert scan.captions[tmp_path / "a.png"] == "caption a"
    assert [p.name for p in scan.missing_captions] == ["b.jpg", "c.webp"]
    with pytest.raises(DatasetConfigError, match="2 of 3 images have no caption \\(b.jpg, c.webp\\)"):
        ds.check_dataset_files(config)
    assert ds.check_dataset_files(config, require_captions=False)[0].count == 3


def test_empty_folder_and_missing_folder_are_errors(tmp_path):
    with pytest.raises(DatasetConfigError, match="has no images"):
        ds.check_dataset_files({"datasets": [{"image_directory": str(tmp_path)}]})
    with pytest.raises(DatasetConfigError, match="is not a folder: check the path"):
        ds.check_dataset_files({"datasets": [{"video_directory": str(tmp_path / "gone")}]})


def test_jsonl_dataset_scan(tmp_path):
    jl = tmp_path / "v.jsonl"
    jl.write_text('{"video_path": "/a.mp4", "caption": "a"}\n{"video_path": "/b.mp4"}\n')
    scan = ds.scan_dataset({"video_jsonl_file": str(jl)})
    assert scan.kind == "video" and scan.count == 2 and len(scan.missing_captions) == 1
