"""Train LoRA in a worker process (``lora_train.worker``), on the CPU with the toy models.

The worker is how the CUDA-graph steps run under ComfyUI's default allocator; here the same
machinery runs forced on the CPU (``SPEEDKIT_TRAIN_WORKER=1``) so every part is seen without a
GPU: the LoRA a worker trains is the one the host's own process trains, events reach the host's
hooks, sample images are rendered by the host from the step's LoRA, Cancel saves and stops,
a worker that cannot start leaves the run to the host, a crash mid-run is an error naming what
was kept, and no child process outlives any of it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

import lora_toy as toy
import pytest
import torch
from safetensors.torch import load_file
from test_lora_run import Cancelled, Recorder, ToyModel, make_dataset, make_job

from speedkit import process_tree
from speedkit.lora_train import run, worker
from speedkit.lora_train.inputs import Extras
from speedkit.lora_train.sample_prompts import SamplePrompt

TESTS_DIR = str(Path(toy.__file__).resolve().parent)


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def _all_children() -> set[int]:
    import os

    return {pid for pid, ppid, _ in process_tree._proc_table() if ppid == os.getpid()}


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _worker_env(monkeypatch):
    monkeypatch.setenv(worker.WORKER_ENV, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's threads: deterministic and light on CI
    _BEFORE.clear()
    _BEFORE.update(_all_children())  # e.g. the integration tier's ComfyUI server in the same session


def _children() -> set[int]:
    """Child processes of this test process that the test started and left running."""
    return _all_children() - _BEFORE


class WorkerToy(ToyModel):
    """A host that can train in a worker process: its UNet loads whole, by-reference denoise."""

    def __init__(self, *args, factory=toy.toy_denoise, paths=(TESTS_DIR,), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.factory, self.paths = factory, list(paths)
        self.handover_factory = factory
        self.handles: list[tuple[Path, list[str]]] = []
        self.rooms = 0  # make_room calls (once per worker run, after the hand-off)
        self.inference_mode: list[bool] = []  # whether each sample round ran in inference mode

    @contextlib.contextmanager
    def load(self, keep_text_encoder):
        self.loads.append(keep_text_encoder)
        yield run.LoadedUNet(
            self.unet,
            self.factory(self.unet, torch.float32),
            self.device,
            torch.float32,
            cuda_graphs=True,
            handle="the model",
            denoise_factory=self.handover_factory,
        )

    def worker_setup(self):
        return worker.WorkerSetup(self.paths)

    def lora_handle(self, lora_file):
        self.handles.append((lora_file, sorted(load_file(str(lora_file)))))
        self.inference_mode.append(torch.is_inference_mode_enabled())
        return "the model + LoRA file"

    def make_room(self):
        self.rooms += 1


def _in_process(tmp_path, dataset, monkeypatch, **job):
    monkeypatch.setenv(worker.WORKER_ENV, "0")
    model, hooks = WorkerToy(), Recorder()
    outcome = run.TrainingRun(make_job(tmp_path / "host", dataset, **job), model, hooks).run()
    monkeypatch.setenv(worker.WORKER_ENV, "1")
    return outcome, hooks


def test_a_worker_trains_the_lora_the_host_process_trains(tmp_path, dataset, monkeypatch, caplog):
    reference, ref_hooks = _in_process(tmp_path, dataset, monkeypatch)
    model, hooks = WorkerToy(), Recorder()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with caplog.at_level(logging.INFO):
        outcome = run.TrainingRun(make_job(tmp_path / "worker", dataset), model, hooks).run()

    assert "training in a separate process" in caplog.text
    assert "Train LoRA worker: Train LoRA: 4 steps in" in caplog.text  # the child's log, relayed
    assert outcome.lora_path == tmp_path / "worker" / "loras" / "toy_lora.safetensors"
    ours, theirs = load_file(str(outcome.lora_path)), load_file(str(reference.lora_path))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-7)
    assert outcome.losses == pytest.approx(reference.losses, rel=1e-5)
    assert [e[2] for e in hooks.of("progress") if e[1] == "train"] == [0, 1, 2, 3, 4]
    assert hooks.of("loss")[-1][1] == 4 and hooks.of("loss")[-1][2] == pytest.approx(outcome.losses[-1])
    assert model.loads == [False]
    assert model.rooms == 1  # the host freed the worker's room once, after handing the UNet over
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert not _children()


def test_samples_are_rendered_by_the_host_from_the_steps_lora_and_validation_comes_back(tmp_path, dataset, monkeypatch):
    prompt = SamplePrompt("a red cube", "", 64, 64, 7, 4, 5.0)
    extras = Extras(prompts=(prompt, prompt), sample_every=3, validation_split=0.25, validate_every=2)
    reference, _ = _in_process(tmp_path, dataset, monkeypatch, extras=extras, steps=5)
    model, hooks = WorkerToy(), Recorder()
    outcome = run.TrainingRun(make_job(tmp_path / "worker", dataset, extras=extras, steps=5), model, hooks).run()

    assert [step for step, _ in outcome.validation_points] == [2, 4, 5]
    for (_, ours), (_, theirs) in zip(outcome.validation_points, reference.validation_points, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)
    assert [(e[1], e[3]) for e in hooks.of("loss") if e[2] is None] == list(outcome.validation_points)
    # the host rendered with its own model and the LoRA of steps 3 and 5, written by the worker
    assert model.renderer.calls == [("the model + LoRA file", 3), ("the model + LoRA file", 5)]
    final_keys = sorted(load_file(str(outcome.lora_path)))
    assert [keys for _, keys in model.handles] == [final_keys, final_keys]
    assert all(not path.exists() for path, _ in model.handles)  # the job folder is gone
    # as ComfyUI samples anywhere (KSampler): the host's weights may be inference tensors
    assert model.inference_mode == [True, True]
    assert [e[1] for e in hooks.of("preview")] == [3, 3, 5, 5]
    assert len(outcome.sample_images) == 2 and float(outcome.sample_images[0][0, 0, 0]) == pytest.approx(0.05)
    assert not _children()


def test_cancel_saves_the_lora_and_a_resume_state_then_raises_the_hosts_cancel(tmp_path, dataset):
    model, hooks = WorkerToy(), Recorder(stop_at=2)
    job = make_job(tmp_path, dataset, steps=400)
    with pytest.raises(Cancelled):
        run.TrainingRun(job, model, hooks).run()

    state = tmp_path / "state" / "toy_lora-state.json"
    assert (tmp_path / "loras" / "toy_lora.safetensors").is_file() and state.is_file()
    import json

    step = json.loads(state.read_text())["step"]
    assert 2 <= step < 400
    assert not _children()


def test_a_worker_that_cannot_start_leaves_the_run_to_the_host(tmp_path, dataset, caplog):
    model, hooks = WorkerToy(paths=()), Recorder()  # the child cannot import the toy UNet's module
    with caplog.at_level(logging.INFO):
        outcome = run.TrainingRun(make_job(tmp_path, dataset), model, hooks).run()

    assert "the training process did not start" in caplog.text and "lora_toy" in caplog.text
    assert len(outcome.losses) == 4 and outcome.lora_path.is_file()
    assert model.loads == [False, False]  # loaded for the worker, then again to train here
    assert not _children()


def test_a_crash_in_the_worker_is_an_error_and_the_host_lives_on(tmp_path, dataset):
    model = WorkerToy(factory=functools.partial(toy.crashing_denoise, after=2))
    with pytest.raises(RuntimeError, match=r"ended unexpectedly \(exit code 134\)"):
        run.TrainingRun(make_job(tmp_path, dataset, steps=6), model, Recorder()).run()
    assert not _children()


def test_a_cancel_while_the_host_renders_samples_stops_the_worker_after_it_saved(tmp_path, dataset):
    prompt = SamplePrompt("a red cube", "", 64, 64, 7, 4, 5.0)
    model, hooks = WorkerToy(), Recorder()

    def cancel_in_render(handle):
        raise Cancelled

    model.lora_handle = cancel_in_render
    job = make_job(tmp_path, dataset, steps=50, extras=Extras(prompts=(prompt,), sample_every=3))
    with pytest.raises(Cancelled):
        run.TrainingRun(job, model, hooks).run()
    assert (tmp_path / "loras" / "toy_lora.safetensors").is_file()
    assert (tmp_path / "state" / "toy_lora-state.json").is_file()
    assert not _children()


def test_runs_that_cannot_use_cuda_graphs_stay_in_the_host_process(tmp_path, dataset, monkeypatch):
    for name, settings in {"fp16": {"precision": "fp16"}, "te": {"train_te": True}}.items():
        model = WorkerToy()
        paths = run.TrainingRun(make_job(tmp_path / name, dataset, **settings), model, Recorder())._worker_setup({})
        assert paths is None, name
    monkeypatch.setenv(worker.WORKER_ENV, "auto")  # auto: only under cudaMallocAsync on CUDA
    assert run.TrainingRun(make_job(tmp_path, dataset), WorkerToy(), Recorder())._worker_setup({}) is None
    monkeypatch.setenv(worker.WORKER_ENV, "1")
    assert run.TrainingRun(make_job(tmp_path, dataset), WorkerToy(), Recorder())._worker_setup({}).import_paths == [
        TESTS_DIR
    ]


def test_the_child_allocates_without_the_hosts_allocator_backend_and_imports_the_host_paths_first():
    base = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync", "X": "1", "PYTHONPATH": "/site"}
    env = worker.child_env(["/comfy"], base)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["X"] == "1"
    pack_parent = str(Path(worker.__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(os.pathsep) == ["/comfy", pack_parent, "/site"]
    assert (
        env[worker.CHILD_ENV] == "1"
        and f'"{worker.CHILD_ENV}"'
        in (Path(pack_parent) / Path(worker.__file__).resolve().parents[1].name / "__init__.py").read_text()
    )
    env = worker.child_env([], {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,backend:cudaMallocAsync"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_the_child_finds_the_hosts_names_of_the_packs_classes_under_its_own():
    """ComfyUI names the pack by its folder path; the child imports it by its folder name."""
    import io
    import pickle

    from speedkit.lora_train.trainer import TrainConfig

    data = pickle.dumps(TrainConfig(rank=7), protocol=0)  # text names: renamed in place
    renamed = data.replace(b"speedkit.lora_train.trainer", b"/x/custom_nodes/Pack.lora_train.trainer")
    loaded = worker._unpickler_module("/x/custom_nodes/Pack").Unpickler(io.BytesIO(renamed)).load()
    assert type(loaded) is TrainConfig and loaded.rank == 7


def test_a_model_the_host_cannot_hand_over_trains_here_and_the_early_worker_ends(tmp_path, dataset, caplog):
    model, hooks = WorkerToy(), Recorder()
    model.handover_factory = None  # e.g. a UNet only the host knows how to call
    with caplog.at_level(logging.INFO):
        outcome = run.TrainingRun(make_job(tmp_path, dataset), model, hooks).run()
    assert "training in this process: ValueError: the model is not fully loaded" in caplog.text
    assert len(outcome.losses) == 4 and model.loads == [False, False]
    assert not _children() and not list(Path("/dev/shm").glob(f"speedkit_train_{os.getpid()}_*"))


def test_an_error_in_the_worker_reaches_the_node_as_it_would_in_comfyuis_process(tmp_path, dataset):
    """A ValueError names the input to change: it arrives as a ValueError with its message, and
    the LoRA of the steps done is saved, as in-process."""
    message = "resume_from: made-up mismatch; set rank to 4"
    model = WorkerToy(factory=functools.partial(toy.raising_denoise, after=3, message=message))
    with pytest.raises(ValueError) as info:
        run.TrainingRun(make_job(tmp_path, dataset, steps=8), model, Recorder()).run()
    assert str(info.value) == message
    assert (tmp_path / "loras" / "toy_lora.safetensors").is_file()
    assert not _children()


def test_error_events_become_the_hosts_exceptions():
    oom = worker._reraised(
        {"kind": "OutOfMemoryError", "message": "CUDA out of memory. Tried 2 GiB\nmore", "oom": True}
    )
    assert isinstance(oom, torch.OutOfMemoryError) and "Tried 2 GiB" in str(oom) and "batch size" in str(oom)
    other = worker._reraised({"kind": "KeyError", "message": "'x'", "oom": False})
    assert type(other) is RuntimeError and "KeyError: 'x'" in str(other)
    disk = worker._reraised({"kind": "OSError", "message": "No space left on device", "oom": False})
    assert type(disk) is OSError and str(disk) == "No space left on device"


def test_a_pack_folder_name_the_host_paths_would_shadow_keeps_the_run_in_the_host(tmp_path):
    name = worker._pack_dir().name
    assert worker.pack_import_blocker([str(tmp_path)]) is None
    (tmp_path / f"{name}.py").write_text("")  # e.g. a pack folder named main beside ComfyUI's main.py
    assert "is also a module" in worker.pack_import_blocker([str(tmp_path)])


def test_matmul_weights_are_held_in_the_autocast_dtype_and_compute_what_autocast_computes():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 4)
    ).to(torch.float16)
    norm = torch.nn.GroupNorm(2, 8).to(torch.float16)
    x = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = net(x)
    assert worker.matmul_weights_to(torch.nn.ModuleList([net, norm]), torch.bfloat16) == 4  # conv, linear: w + b
    assert norm.weight.dtype == torch.float16  # norms keep their weights (CUDA autocast runs them in fp32)
    assert net[0].weight.dtype == net[3].bias.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = net(x)
    assert torch.equal(before, after)
    assert worker.matmul_weights_to(net, torch.bfloat16) == 0
    own_cast = torch.nn.Linear(4, 4).to(torch.float16)
    own_cast.comfy_cast_weights = True  # ComfyUI casts this one to the input's dtype in every call
    assert worker.matmul_weights_to(own_cast, torch.bfloat16) == 0 and own_cast.weight.dtype == torch.float16


def test_a_worker_run_under_autocast_trains_the_lora_the_host_trains(tmp_path, dataset, monkeypatch, caplog):
    """Weights in another dtype than the run computes in (an fp16 checkpoint trained in bf16 on a
    GPU; fp32 weights trained in bf16 here, where CPU autocast cannot mix fp16 norms): the worker
    holds its copy's Linear/Conv weights in the compute dtype, which changes no value autocast
    computes with."""
    reference, _ = _in_process(tmp_path, dataset, monkeypatch, precision="bf16")
    model = WorkerToy()
    with caplog.at_level(logging.INFO):
        outcome = run.TrainingRun(make_job(tmp_path / "worker", dataset, precision="bf16"), model, Recorder()).run()
    assert "Linear/Conv weights held in torch.bfloat16" in caplog.text
    ours, theirs = load_file(str(outcome.lora_path)), load_file(str(reference.lora_path))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert outcome.losses == reference.losses
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())  # the host's model untouched


_HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "w")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(600)
"""


def test_job_folders_no_server_holds_are_removed_before_a_new_one_is_made(tmp_path):
    held = tmp_path / "speedkit_train_1_held"  # a server's run in progress holds its lock
    ended = tmp_path / "speedkit_train_2_ended"  # its server is gone: the lock is free
    young = tmp_path / "speedkit_train_3_young"  # no lock yet: its server may be about to take it
    old = tmp_path / "speedkit_train_4_old"  # no lock and long untouched: left by an ended server
    other = tmp_path / "unrelated_folder"
    for folder in (held, ended, young, old, other):
        folder.mkdir()
        (folder / "unet.pt").write_bytes(b"x")
    (ended / worker.LOCK_FILE).write_text("")
    os.utime(old, (1e9, 1e9))
    lock = worker.hold_folder_lock(held)
    try:
        assert not worker.stale_job_folder(held) and worker.stale_job_folder(ended)
        assert worker.remove_stale_job_folders(tmp_path) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in (held, young, other))
    finally:
        lock.close()
    assert worker.stale_job_folder(held)  # the kernel releases the lock with its holder
    killed = tmp_path / "speedkit_train_5_killed"
    killed.mkdir()
    holder = subprocess.Popen(  # a server killed mid-run: its lock goes with it
        [sys.executable, "-c", _HOLD_LOCK, str(killed / worker.LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    assert not worker.stale_job_folder(killed)
    holder.kill()
    holder.wait()
    assert worker.stale_job_folder(killed)
    folder = worker.job_folder(0)
    try:
        assert folder.name.startswith(f"speedkit_train_{os.getpid()}_")
    finally:
        folder.rmdir()
