"""The training run (``lora_train.run``) on toy models: no ComfyUI, every host hook observed.

A :class:`ToyModel` plays the host's model side (a tiny UNet and text encoder, a pooling "VAE")
and :class:`Recorder` its UI, so each test sees exactly what the run asks of a host: when it
loads, what it encodes, which progress, loss and preview events it sends, and what it leaves
behind (no LoRA layer in the model, text encoders back in eval mode).
"""

from __future__ import annotations

import contextlib
import json

import lora_toy as toy
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from speedkit.lora_train import data, layers, run
from speedkit.lora_train.inputs import Extras
from speedkit.lora_train.sample_prompts import SamplePrompt
from speedkit.lora_train.trainer import TrainConfig

CAPTIONS = ["a red cube", "a blue ball", "green tree, sky", "yellow sun"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Cancelled(Exception):
    """Stands in for the host's cancel exception."""


class Recorder(run.RunHooks):
    def __init__(self, stop_at: int | None = None, cancel_now: bool = False) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at
        self.cancelled = cancel_now

    def progress(self, phase, done, total):
        self.events.append(("progress", phase, done, total))

    def preview(self, step, total, image):
        self.events.append(("preview", step, tuple(image.shape)))

    def loss(self, step, total, loss, validation_loss=None):
        self.events.append(("loss", step, loss, validation_loss))

    def should_stop(self):
        steps = [e[2] for e in self.events if e[:2] == ("progress", "train")]
        self.cancelled = self.stop_at is not None and max(steps, default=0) >= self.stop_at
        return self.cancelled

    def check_interrupt(self):
        if self.cancelled:
            raise Cancelled

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


class Renderer:
    def __init__(self, prompts, folder, name, reencode) -> None:
        self.prompts, self.folder, self.name, self.reencode = prompts, folder, name, reencode
        self.last: list[torch.Tensor] = []
        self.calls: list[tuple] = []

    def render(self, handle, step, preview=None):
        self.calls.append((handle, step))
        self.last = [torch.full((8, 8, 3), step / 100.0) for _ in self.prompts]
        for image in self.last:
            preview(image)
        return []


class ToyModel:
    """``run.ModelSide`` over lora_toy's models."""

    def __init__(self, family: str = "sd15", te_dim: int = 16) -> None:
        torch.manual_seed(0)
        sdxl = family == "sdxl"
        self.family = run.Family(family, "eps", 8, 64, "sd_v1", "toy/lora", "toy", (("te", "lora_te"),))
        self.device = torch.device("cpu")
        self.latent_encoder_id = "toy-pool"
        self.unet = toy.TinyUNet("ldm", dim=16, context_dim=te_dim, adm_dim=te_dim + 6 if sdxl else 0)
        self.unet.requires_grad_(False)
        self.te = toy.TinyTextEncoder(te_dim, length=77).requires_grad_(False)  # 77 tokens, as CLIP
        self.texts: list[str] = []
        self.loads: list[bool] = []
        self.size_ids: list[tuple] = []
        self.text_trained: list[int] = []
        self.renderer: Renderer | None = None

    def encode_image(self, pixels):
        return F.avg_pool2d(pixels.permute(2, 0, 1), 8).mean(0, keepdim=True).repeat(4, 1, 1)

    def encode_text(self, caption):
        self.texts.append(caption)
        hidden, pooled = self.te([caption])
        return {"cond": hidden, "pooled": pooled} if self.family.name == "sdxl" else {"cond": hidden}

    def size_conditioning(self, pooled, time_ids, device):
        self.size_ids.append(tuple(time_ids))
        return torch.cat([pooled, torch.tensor([time_ids], dtype=torch.float32) / 64], dim=1)

    def text_encoder_identity(self):
        return self.te.state_dict().items(), f"toy|{self.family.name}"

    def text_encoders(self):
        return [("lora_te", self.te)]

    def unet_key_rename(self):
        return None

    def text_training(self, modules):
        self.text_trained.append(len(modules))
        return contextlib.nullcontext()

    def sample_renderer(self, prompts, folder, name, reencode):
        self.renderer = Renderer(prompts, folder, name, reencode)
        return self.renderer

    @contextlib.contextmanager
    def load(self, keep_text_encoder):
        self.loads.append(keep_text_encoder)

        def denoise(x, t, cond):
            return self.unet(x, t, cond["context"], cond.get("y"))

        yield run.LoadedUNet(self.unet, denoise, self.device, torch.float32, cuda_graphs=False, handle="the model")


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def make_dataset(folder):
    """Four 64-px images with captions in ``folder``."""
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def make_job(tmp_path, dataset, *, extras: Extras | None = None, cache: bool = False, **config) -> run.Job:
    settings = dict(steps=4, rank=4, alpha=4, unet_lr=1e-3, precision="fp32", grad_checkpointing=False, seed=1)
    settings.update(config)
    return run.Job(
        items=data.scan_folder(dataset),
        name="toy_lora",
        resolution=64,
        buckets=run.Buckets(64, 64, 8, False),
        config=TrainConfig(**settings),
        lora_dir=tmp_path / "loras",
        state_dir=tmp_path / "state",
        dataset_dir=dataset,
        extras=extras or Extras(),
        cache_dir=dataset / "_latent_cache" if cache else None,
    )


def no_lora_left(module: torch.nn.Module) -> bool:
    return not any(isinstance(m, layers.LoRALayer) for m in module.modules())


def test_run_trains_saves_and_leaves_the_model_as_it_was(tmp_path, dataset):
    model, hooks = ToyModel(), Recorder()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    outcome = run.TrainingRun(make_job(tmp_path, dataset), model, hooks).run()

    assert outcome.lora_path == tmp_path / "loras" / "toy_lora.safetensors" and outcome.lora_path.is_file()
    assert len(outcome.losses) == 4 and outcome.validation_points == [] and outcome.sample_images == []
    keys = load_file(str(outcome.lora_path))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    # fixed captions: encoded once up front, so the text encoder need not stay loaded
    assert model.loads == [False] and sorted(model.texts) == sorted(CAPTIONS)
    assert no_lora_left(model.unet)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    latents = [e for e in hooks.of("progress") if e[1] == "latents"]
    assert latents[-1] == ("progress", "latents", 4, 4)
    assert [e[2] for e in hooks.of("progress") if e[1] == "train"] == [0, 1, 2, 3, 4]
    assert hooks.of("loss")[-1][:2] == ("loss", 4) and hooks.of("loss")[-1][2] == outcome.losses[-1]


def test_validation_and_sample_images_run_between_steps(tmp_path, dataset):
    prompt = SamplePrompt("a red cube", "", 64, 64, 7, 4, 5.0)
    extras = Extras(prompts=(prompt, prompt), sample_every=3, validation_split=0.25, validate_every=2)
    model, hooks = ToyModel(), Recorder()
    outcome = run.TrainingRun(make_job(tmp_path, dataset, extras=extras, steps=5), model, hooks).run()

    assert [step for step, _ in outcome.validation_points] == [2, 4, 5]
    assert [(e[1], e[3]) for e in hooks.of("loss") if e[2] is None] == list(outcome.validation_points)
    renderer = model.renderer
    assert renderer.folder == tmp_path / "loras" / "toy_lora_samples" and not renderer.reencode
    assert renderer.calls == [("the model", 3), ("the model", 5)]
    assert [e[1] for e in hooks.of("preview")] == [3, 3, 5, 5]
    assert len(outcome.sample_images) == 2 and float(outcome.sample_images[0][0, 0, 0]) == pytest.approx(0.05)
    assert len(outcome.losses) == 5


def test_sdxl_text_encoder_lora_trains_with_size_conditioning(tmp_path, dataset):
    model, hooks = ToyModel("sdxl"), Recorder()
    job = make_job(tmp_path, dataset, train_te=True, te_lr=1e-3, steps=2)
    outcome = run.TrainingRun(job, model, hooks).run()

    keys = load_file(str(outcome.lora_path))
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert model.loads == [True] and model.text_trained == [1]
    assert model.size_ids and all(ids == (64, 64, 0, 0, 64, 64) for ids in model.size_ids)
    assert no_lora_left(model.te) and no_lora_left(model.unet) and not model.te.training


def test_cancel_saves_the_lora_and_a_resume_state_then_raises(tmp_path, dataset):
    model, hooks = ToyModel(), Recorder(stop_at=2)
    with pytest.raises(Cancelled):
        run.TrainingRun(make_job(tmp_path, dataset, steps=10), model, hooks).run()
    assert (tmp_path / "loras" / "toy_lora.safetensors").is_file()
    state = json.loads((tmp_path / "state" / "toy_lora-state.json").read_text())
    assert state["step"] == 2
    assert no_lora_left(model.unet)


def test_cancel_while_encoding_stops_before_loading(tmp_path, dataset):
    model = ToyModel()
    with pytest.raises(Cancelled):
        run.TrainingRun(make_job(tmp_path, dataset), model, Recorder(cancel_now=True)).run()
    assert model.loads == [] and not (tmp_path / "loras").exists()


def test_text_encoder_outputs_are_cached_on_disk_for_the_next_run(tmp_path, dataset):
    first = ToyModel(te_dim=768)
    run.TrainingRun(make_job(tmp_path, dataset, cache=True, steps=1), first).run()
    files = list((dataset / "_latent_cache" / run.TEXT_CACHE_SUBDIR).glob("te-*.safetensors"))
    assert len(files) == len(CAPTIONS)
    second = ToyModel(te_dim=768)
    run.TrainingRun(make_job(tmp_path, dataset, cache=True, steps=1), second).run()
    assert second.texts == [run.TEXT_CACHE_PROBE]  # only the fingerprint probe is encoded again


def test_shuffled_captions_keep_the_text_encoder_loaded_and_skip_the_disk_cache(tmp_path, dataset):
    model = ToyModel(te_dim=768)
    run.TrainingRun(make_job(tmp_path, dataset, cache=True, shuffle_captions=True, steps=2), model).run()
    assert model.loads == [True]
    assert not (dataset / "_latent_cache" / run.TEXT_CACHE_SUBDIR).exists()


def test_materialize_inference_tensors_makes_frozen_weights_usable_by_autograd():
    with torch.inference_mode():
        layer = torch.nn.Linear(3, 3)
        layer.register_buffer("scale", torch.ones(3))
    assert run.materialize_inference_tensors(layer) == 3
    weight = layer.weight
    assert not torch.is_inference(weight) and not weight.requires_grad
    x = torch.ones(1, 3, requires_grad=True)
    (layer(x) * layer.scale).sum().backward()
    assert x.grad is not None
