"""Train LoRA: every bad input gets a clear error (input name, value, fix) before any heavy work.

The node-level tests run ``TrainLoRA.execute`` with a stand-in ``comfy_api`` / ``folder_paths``,
the model family stubbed and the training run (``train``: VAE encoding, model loading, training)
replaced by a tripwire, so each test proves the input is refused before that work starts.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import lora_toy as toy
import pytest
import torch
from PIL import Image

from speedkit.lora_train import checkpoint, data, layers, run, trainer
from speedkit.lora_train.prepare import build_samples

ADAPTER = "speedkit.nodes.lora_train"
HEAVY_WORK = "heavy work started"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _image(path: Path, w: int = 64, h: int = 64) -> Path:
    Image.new("RGB", (w, h), (200, 40, 40)).save(path)
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        _image(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption {i}")
    return folder


@pytest.fixture
def node(monkeypatch, tmp_path):
    """The adapter module, importable without ComfyUI; its ``train`` fails the test if reached."""
    io = types.ModuleType("comfy_api.latest.io")
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = lambda *a, **kw: (a, kw)
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    for name, module in {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "comfy_api.latest.io", io)
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda kind: [str(tmp_path / "loras")]
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    saved = sys.modules.pop(ADAPTER, None)
    module = importlib.import_module(ADAPTER)
    family = run.Family("sd15", "eps", 8, 512, "sd_v1", "stable-diffusion-v1/lora", "diffusers", ())
    monkeypatch.setattr(module, "detect_family", lambda model: family)

    def tripwire(*args, **kwargs):
        raise AssertionError(HEAVY_WORK)

    monkeypatch.setattr(module, "train", tripwire)
    module.TrainLoRA.hidden = SimpleNamespace(unique_id="7")
    yield module
    sys.modules.pop(ADAPTER, None)  # later tests must not see the stand-in io
    if saved is not None:
        sys.modules[ADAPTER] = saved


def run_node(node, dataset: Path, **overrides):
    values = dict(
        model=None,
        clip=None,
        vae=None,
        dataset_folder=str(dataset),
        output_name="my_lora",
        steps=10,
        learning_rate=1e-4,
        rank=4,
        alpha=4.0,
        resolution=0,
        batch_size=1,
        target="attention",
        train_text_encoder=False,
    )
    values.update(overrides)
    return node.TrainLoRA.execute(**values)


def test_valid_inputs_reach_the_training_run(node, dataset):
    """The harness itself: good inputs pass every check, so the refusals below are real."""
    with pytest.raises(AssertionError, match=HEAVY_WORK):
        run_node(node, dataset)


# ----- buckets ---------------------------------------------------------------------------------


def test_min_bucket_above_max_bucket_names_both_inputs(node, dataset):
    with pytest.raises(
        ValueError,
        match=r"^min_bucket: 1024 is larger than max_bucket \(512\).*set min_bucket <= max_bucket, "
        r"e\.g\. min_bucket=512 and max_bucket=1024",
    ):
        run_node(node, dataset, resolution=768, min_bucket=1024, max_bucket=512)


def test_min_bucket_above_resolution_is_not_clamped(node, dataset):
    with pytest.raises(
        ValueError,
        match=r"^min_bucket: 768 is larger than resolution \(512, the model native size for resolution=0\).*"
        r"set min_bucket <= 512 or raise resolution",
    ):
        run_node(node, dataset, resolution=0, min_bucket=768, max_bucket=2048)


def test_max_bucket_below_resolution_is_not_clamped(node, dataset):
    with pytest.raises(
        ValueError, match=r"^max_bucket: 768 is smaller than resolution \(1024\).*set max_bucket >= 1024"
    ):
        run_node(node, dataset, resolution=1024, min_bucket=256, max_bucket=768)


def test_bucket_step_larger_than_resolution(node, dataset):
    with pytest.raises(ValueError, match=r"^bucket_step: 512 is larger than resolution \(256\).*bucket_step <= 256"):
        run_node(node, dataset, resolution=256, min_bucket=64, max_bucket=2048, bucket_step=512)


def test_bucket_step_not_a_multiple_of_8(node, dataset):
    with pytest.raises(ValueError, match=r"^bucket_step: 12 is not a positive multiple of 8.*e\.g\. 64"):
        run_node(node, dataset, bucket_step=12)


def test_max_bucket_not_a_multiple_of_the_step_gives_no_odd_bucket():
    for w, h in data.make_buckets(1024, 256, 2001, 64):
        assert w % 64 == 0 and h % 64 == 0 and max(w, h) <= 2001, (w, h)


# ----- output_name -----------------------------------------------------------------------------


def test_output_name_with_safetensors_extension_is_stripped_and_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="speedkit.lora_train.checkpoint"):
        assert checkpoint.validate_output_name("my lora.safetensors") == "my lora"
        assert checkpoint.validate_output_name("my lora") == "my lora"
    notes = [r.getMessage() for r in caplog.records if "ends in .safetensors" in r.getMessage()]
    assert notes == ["output_name: 'my lora.safetensors' ends in .safetensors; saving as my lora.safetensors"]
    assert checkpoint.validate_output_name(" Style.SafeTensors ") == "Style"


def test_output_name_with_extension_saves_a_single_extension(tmp_path):
    tr = tiny_trainer(steps=1)
    result = tr.run(tmp_path, run_info("my lora.safetensors"))
    assert result.lora_path == tmp_path / "my lora.safetensors"
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["my lora.safetensors"]


@pytest.mark.parametrize("bad", [".safetensors", "../evil.safetensors", "a/b.safetensors", "  ", "x:y"])
def test_output_name_paths_and_empty_names_keep_the_clear_message(bad):
    with pytest.raises(ValueError, match=r"^output_name\b.*(e\.g\.|such as) my_style"):
        checkpoint.validate_output_name(bad)


# ----- NaN / Inf numbers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [
        ("learning_rate", math.nan),
        ("text_encoder_lr", math.nan),
        ("alpha", math.inf),
        ("min_snr_gamma", math.inf),
        ("noise_offset", math.nan),
        ("caption_dropout", math.nan),
    ],
)
def test_nan_or_inf_number_names_the_input(node, dataset, name, value):
    with pytest.raises(ValueError, match=rf"^{name}: {value!r} is not a finite number; set it to a number such as"):
        run_node(node, dataset, **{name: value})


def test_inf_is_refused_by_the_core_config_too():
    with pytest.raises(ValueError, match=r"min_snr_gamma=inf is invalid"):
        trainer.TrainConfig(min_snr_gamma=math.inf).validate()
    with pytest.raises(ValueError, match=r"unet_lr=inf is invalid: it must be a finite number > 0"):
        trainer.TrainConfig(unet_lr=math.inf).validate()


def test_text_encoder_lr_zero_while_training_the_text_encoder(node, dataset):
    with pytest.raises(ValueError, match=r"^text_encoder_lr: 0 with train_text_encoder on .* e\.g\. 5e-5"):
        run_node(node, dataset, train_text_encoder=True, text_encoder_lr=0.0)


# ----- dataset_folder --------------------------------------------------------------------------


def test_dataset_folder_that_does_not_exist(node, tmp_path):
    with pytest.raises(ValueError, match=r"^dataset_folder: '.*nope' does not exist; give the path of a folder"):
        run_node(node, tmp_path / "nope")


def test_dataset_folder_that_is_a_file(node, tmp_path):
    with pytest.raises(ValueError, match=r"^dataset_folder: '.*a\.png' is a file, not a folder"):
        run_node(node, _image(tmp_path / "a.png"))


def test_dataset_folder_without_images(node, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"^dataset_folder: '.*' holds no image \(\.png.*add training images"):
        run_node(node, tmp_path)


def test_dataset_images_without_captions(node, dataset):
    _image(dataset / "zz.png")
    with pytest.raises(
        ValueError,
        match=r"^dataset_folder: 1 image\(s\) in .* have no \.txt caption \(e\.g\. zz\.png\).*default_caption",
    ):
        run_node(node, dataset)


def test_dataset_zero_byte_image(node, dataset):
    (dataset / "empty.png").write_bytes(b"")
    (dataset / "empty.txt").write_text("x")
    with pytest.raises(
        ValueError, match=r"^dataset_folder: cannot read image .*empty\.png \(empty file, 0 bytes\): remove it"
    ):
        run_node(node, dataset)


def test_dataset_garbage_image(node, dataset):
    (dataset / "garbage.jpg").write_bytes(b"this is not a jpeg" * 20)
    (dataset / "garbage.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^dataset_folder: cannot read image .*garbage\.jpg \(cannot identify"):
        run_node(node, dataset)


def test_dataset_tiny_image_is_found_before_encoding(node, dataset):
    _image(dataset / "tiny.png", 16, 200)
    (dataset / "tiny.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^dataset_folder: image .*tiny\.png is 16x200 px.*at least 32"):
        run_node(node, dataset)


def test_dataset_truncated_image_names_the_file_when_decoded(dataset):
    full = (dataset / "img1.png").read_bytes()
    (dataset / "img1.png").write_bytes(full[: len(full) // 2])
    items = data.scan_folder(dataset)  # the header is intact: only decoding finds the damage
    with pytest.raises(ValueError, match=r"^dataset_folder: cannot read image .*img1\.png \(.*truncated"):
        build_samples(
            items,
            resolution=64,
            min_bucket=64,
            max_bucket=128,
            bucket_step=64,
            no_upscale=False,
            encode_image=lambda pixels: torch.zeros(4, 8, 8),
        )


def test_dataset_folder_in_quotes_is_accepted(dataset):
    assert len(data.scan_folder(f' "{dataset}" ')) == 2


# ----- resume_from -----------------------------------------------------------------------------


def tiny_trainer(steps: int = 4, *, bad_at: int | None = None, **overrides) -> trainer.Trainer:
    """A Trainer on toy modules; ``bad_at``: the UNet returns NaN while that step (1-based) runs."""
    torch.manual_seed(0)
    unet = toy.TinyUNet("diffusers", dim=16, context_dim=16).requires_grad_(False)
    te = toy.TinyTextEncoder(16).requires_grad_(False)
    samples = [trainer.Sample(torch.randn(4, 4, 4), c, (32, 32, 0, 0, 32, 32), (32, 32)) for c in ("a", "b")]
    lora = layers.LoRASet()
    lora.add(unet, layers.find_unet_targets(unet, "attention"), rank=4, alpha=4, prefix="lora_unet")
    settings = dict(steps=steps, rank=4, alpha=4, unet_lr=1e-3, precision="fp32", grad_checkpointing=False)
    settings.update(overrides)
    state = {}

    def denoise(x, t, cond):
        out = unet(x, t, cond["context"])
        return out * math.nan if bad_at is not None and state["tr"].step + 1 == bad_at else out

    tr = trainer.Trainer(
        trainer.TrainConfig(**settings), lora, samples, denoise, lambda caps, batch: {"context": te(caps)[0]}, "cpu"
    )
    state["tr"] = tr
    return tr


def run_info(name: str = "my_lora") -> trainer.RunInfo:
    return trainer.RunInfo(name, "sd_v1", "stable-diffusion-v1/lora", "diffusers", resolution=32)


@pytest.fixture
def saved_state(tmp_path) -> Path:
    """A real state after 2 steps: <tmp>/my_lora-state.{json,safetensors} plus my_lora.safetensors."""
    tiny_trainer(steps=2, save_every=1).run(tmp_path, run_info())
    return tmp_path / "my_lora"


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "garbage": bytes(range(256)) * 4}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
@pytest.mark.parametrize("part", ["-state.json", "-state.safetensors"])
def test_damaged_resume_state_names_resume_from_the_file_and_the_fix(saved_state, part, how):
    damaged = saved_state.with_name(saved_state.name + part)
    _damage(damaged, how)
    with pytest.raises(ValueError) as err:
        checkpoint.load_state(saved_state)
    message = str(err.value)
    assert message.startswith(f"resume_from: the saved training state {damaged} is damaged ("), message
    assert "no file was changed" in message and "clear resume_from to start a new run" in message
    assert "intact <name>-state.json" in message


def test_resume_state_pair_from_two_saves_is_refused(saved_state):
    json_path = saved_state.with_name("my_lora-state.json")
    older = json_path.read_bytes()
    tr = tiny_trainer(steps=3, save_every=1)
    tr.load_state(saved_state)
    tr.run(saved_state.parent, run_info())  # step 3 rewrites both files
    json_path.write_bytes(older)  # as if a crash fell between the two renames
    with pytest.raises(ValueError, match=r"^resume_from: .*damaged \(.*\(step 3\) and my_lora-state\.json \(step 2\)"):
        checkpoint.load_state(saved_state)


def test_missing_resume_state_names_the_missing_file(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^resume_from: .* has no saved training state: nope-state\.safetensors and .*clear resume_from",
    ):
        checkpoint.load_state(tmp_path / "nope")


def test_damaged_resume_state_is_refused_before_any_work_and_nothing_is_overwritten(node, dataset, tmp_path):
    state_dir = tmp_path / "output" / "speedkit_lora_state"
    loras = tmp_path / "loras"
    tiny_trainer(steps=2, save_every=1).run(loras, run_info(), state_dir=state_dir)
    (state_dir / "my_lora-state.safetensors").write_bytes(b"\x00" * 7)
    before = {p: p.read_bytes() for p in [*loras.iterdir(), *state_dir.iterdir()]}
    with pytest.raises(ValueError, match=r"^resume_from: .*my_lora-state\.safetensors is damaged \(not a readable"):
        run_node(node, dataset, resume_from="my_lora", steps=10)
    assert {p: p.read_bytes() for p in [*loras.iterdir(), *state_dir.iterdir()]} == before


def test_resume_state_of_other_settings_is_refused_before_any_work(node, dataset, tmp_path):
    state_dir = tmp_path / "output" / "speedkit_lora_state"
    tiny_trainer(steps=2, save_every=1).run(tmp_path / "loras", run_info(), state_dir=state_dir)
    with pytest.raises(ValueError, match=r"^resume_from: .* was trained with rank=4 but this run has rank=8; set rank"):
        run_node(node, dataset, resume_from="my_lora", rank=8)


def test_diverged_step_keeps_the_last_good_lora_and_state(tmp_path):
    from safetensors import safe_open

    tr = tiny_trainer(steps=6, save_every=1, bad_at=3)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 3.*the LoRA of step 2 is kept"):
        tr.run(tmp_path, run_info())
    with safe_open(str(tmp_path / "my_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"
        assert all(bool(torch.isfinite(f.get_tensor(k)).all()) for k in f.keys())
    assert json.loads((tmp_path / "my_lora-state.json").read_text())["step"] == 2
    lora, _, _ = checkpoint.load_state(tmp_path / "my_lora")  # still a usable state
    assert all(bool(torch.isfinite(v).all()) for v in lora.values())


def test_failing_resumed_run_leaves_the_saved_files_untouched(saved_state):
    folder = saved_state.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    tr = tiny_trainer(steps=6, save_every=1, bad_at=3)
    tr.load_state(saved_state)
    with pytest.raises(FloatingPointError):
        tr.run(folder, run_info())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_interrupted_state_save_keeps_both_previous_files(saved_state, monkeypatch):
    folder = saved_state.parent
    before = {p.name: p.read_bytes() for p in folder.glob("my_lora-state.*")}
    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(".my_lora-state.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    tr = tiny_trainer(steps=3)
    tr.load_state(saved_state)
    tr.train_step()
    with pytest.raises(OSError, match="disk full while saving .*my_lora-state.json: the previous file is intact"):
        tr.save_state(saved_state)
    assert {p.name: p.read_bytes() for p in folder.glob("my_lora-state.*")} == before
    assert not list(folder.glob(".*tmp*"))
