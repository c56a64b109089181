"""Train LoRA in a worker process, where the CUDA-graph steps can run under any host allocator.

ComfyUI allocates GPU memory with PyTorch's cudaMallocAsync backend on NVIDIA. Under it a CUDA
graph recording that fails aborts the whole process (the allocator frees the failed recording's
memory from tensor destructors, which cannot raise), so in ComfyUI's own process the trainer
never records graphs and an SDXL step runs eagerly, bound by the host (thousands of small kernel
launches per step). A child process started with the same Python but without that allocator
setting (PyTorch's native allocator) records and replays the steps as a script would; a failed
recording there is a Python error that falls back to eager steps, and even a hard crash ends only
the child: the host process, its queue and the last saved LoRA stay.

Parent side (:class:`WorkerProcess`): the child is started first, so that it imports the host's
model code and sets up CUDA while the host loads the UNet; the UNet module as the host loaded it
(its weights with every patch merged) and the run's data (a pickled :class:`WorkerJob`) go to a
job folder (:func:`write_job`), then the child is told to go; its log lines are relayed to this
process's log; its events become the run's hooks (progress, loss points, validation points);
sample images are rendered here on request (the host's sampler lives in the host); Cancel asks
the child to save and stop, and anything that goes wrong here stops the child's whole process
tree.

Child side (:func:`child_main`): loads the module on the device and runs the same
:class:`~.run.TrainingRun` step loop the host would run, with CUDA graphs allowed.

Wire: the child writes events to its stdout as JSON, one per line after :data:`EVENT_PREFIX`;
every other line of its output is log text. The parent writes commands to the child's stdin,
one per line: ``go`` (the job is written), ``stop`` (save the LoRA and a resume state, then end)
and ``continue`` (the sample images of the requested step are rendered). End of stdin means the parent is gone: the
child saves and stops.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from .. import process_tree
from ..torch_utils import is_oom_error, malloc_async_active

if TYPE_CHECKING:
    from .run import Family, Job, RunHooks
    from .trainer import Sample

logger = logging.getLogger(__name__)

EVENT_PREFIX = "\x1espeedkit-train-event "
"""Starts every event line of the child's stdout (a record separator no log line begins with)."""
SETUP_FILE, JOB_FILE, UNET_FILE = "setup.pt", "job.pt", "unet.pt"
WORKER_ENV = "SPEEDKIT_TRAIN_WORKER"
"""``0``: never train in a worker process; ``1``: always when the run allows CUDA graphs (also on
the CPU, for tests); unset/``auto``: when the host's allocator rules the graphs out in its own
process (cudaMallocAsync, ComfyUI's default on NVIDIA)."""
STOP_GRACE_S = 120.0
"""How long a stopped child may take to save its LoRA and resume state before it is killed."""
TAIL_LINES = 30
MESSAGE_CHARS = 4000
RERAISED = {"ValueError": ValueError, "FloatingPointError": FloatingPointError, "OSError": OSError}
"""Errors of the child raised again as the same class with the same message: they name the input
to change (a resume state that does not fit, a diverged run, a full disk), as in ComfyUI's process."""


def _reraised(failure: dict[str, Any]) -> BaseException:
    """The host-side exception for the child's error event."""
    kind, message = failure["kind"], failure["message"]
    if failure.get("oom"):
        return torch.OutOfMemoryError(
            f"Train LoRA: out of GPU memory in the training process ({message.splitlines()[0]}); lower the "
            f"batch size or resolution, or turn gradient_checkpointing on"
        )
    cls = RERAISED.get(kind)
    if cls is not None:
        return cls(message)
    return RuntimeError(f"Train LoRA: training failed in its process: {kind}: {message}")


class WorkerUnavailable(RuntimeError):
    """The worker ended before it started training: the run can go on in the host's process."""


DenoiseFactory = Callable[[nn.Module, torch.dtype], Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]]


def ldm_unet_denoise(unet: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]:
    """``denoise(x, t, cond)`` over an LDM-style UNet called as ``unet(x, timesteps, context=,
    y=, transformer_options=)`` computing in ``dtype`` (ComfyUI's SD1.5/SDXL UNet).

    Module level so the worker can be handed it by reference (a host closure does not pickle).
    """

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        y = cond.get("y")
        return unet(
            x.to(dtype),
            t.float(),
            context=cond["context"].to(dtype),
            y=None if y is None else y.to(dtype),
            transformer_options={},  # fresh per call: the UNet writes into it
        )

    return denoise


@dataclass
class WorkerSetup:
    """What a host tells a worker process so that it can load the host's UNet module."""

    import_paths: list[str]  # put first on the child's sys.path (where the module's classes live)
    # ``(module, attribute, value)`` set in the child before the UNet is loaded: the host's own
    # settings its model code reads at import time (e.g. ComfyUI's parsed command line)
    module_attrs: list[tuple[str, str, Any]] = field(default_factory=list)
    # modules the child imports while the host still prepares the UNet (they are needed to load it)
    preload: list[str] = field(default_factory=list)
    model_bytes: int = 0  # about how large the UNet file will be (where the job folder goes)


@dataclass
class WorkerJob:
    """Everything the child needs besides the UNet module (pickled; plain data and the pack's own classes)."""

    job: Job
    family: Family
    rename: Callable[[str], str] | None
    samples: list[Sample]
    cond_cache: dict
    held: list[Sample]
    held_conds: list[dict[str, torch.Tensor]] | None
    device: str
    dtype: torch.dtype
    denoise_factory: DenoiseFactory
    render_samples: bool  # sample prompts were given: the host renders them at the run's sampling steps


def allocator_rules_out_graphs(device: torch.device) -> bool:
    """True where this process allocates with cudaMallocAsync on ``device``'s CUDA (see the module docstring)."""
    return device.type == "cuda" and malloc_async_active()


JOB_PREFIX = "speedkit_train_"
LOCK_FILE = ".lock"
UNLOCKED_GRACE_S = 600.0
"""A job folder without a lock file is left alone this long (its server may be about to lock it)."""


def job_folder(needed_bytes: int) -> Path:
    """A fresh folder for the job files, named for this process: in RAM (``/dev/shm``) when it has
    room, else the temp folder. Folders that an ended server left behind go first."""
    shm = Path("/dev/shm")
    prefix = f"{JOB_PREFIX}{os.getpid()}_"
    for base in (shm, Path(tempfile.gettempdir())):
        remove_stale_job_folders(base)
    if shm.is_dir():
        try:
            if shutil.disk_usage(shm).free > needed_bytes * 1.2 + 2**30:
                return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix=prefix))


def hold_folder_lock(folder: Path) -> IO[str] | None:
    """Lock ``folder`` for as long as the returned file stays open (an advisory ``flock``, which
    the kernel releases when the holder ends, however it ends); None where there is no ``flock``
    (the run goes on; only the clean-up after a killed server is lost)."""
    try:
        import fcntl
    except ImportError:  # Windows: no stale-folder clean-up there either
        return None
    try:
        handle = open(folder / LOCK_FILE, "w")  # noqa: SIM115 - held until the run ends
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without flock: the folder is only cleaned up by its own run
        handle.close()
        return None
    return handle


def stale_job_folder(folder: Path) -> bool:
    """Whether no server holds ``folder`` any more: its lock file can be locked, or it has none and
    is older than :data:`UNLOCKED_GRACE_S`. Folders we cannot open (another user's) count as held."""
    try:
        import fcntl
    except ImportError:
        return False
    lock = folder / LOCK_FILE
    try:
        if not lock.exists():
            return time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        return True
    except OSError:
        return False


def remove_stale_job_folders(base: Path) -> int:
    """Remove the job folders in ``base`` that no server holds (a server killed mid-run never ran
    its own clean-up: a UNet file left in ``/dev/shm`` holds gigabytes of RAM until a reboot);
    returns how many were removed. The lock, not the process id in the name, decides: a process
    id says nothing across containers that share ``/dev/shm``."""
    if not base.is_dir():
        return 0
    removed = 0
    for folder in base.glob(f"{JOB_PREFIX}*"):
        if folder.is_dir() and stale_job_folder(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("Train LoRA: removed %d job folder(s) of training runs whose server had ended", removed)
    return removed


def write_job(folder: Path, unet: nn.Module, job: WorkerJob) -> None:
    """Write the UNet (as loaded: device tensors are copied to the file) and the job into ``folder``."""
    started = time.perf_counter()
    torch.save(unet, folder / UNET_FILE)
    torch.save(job, folder / JOB_FILE)
    logger.info(
        "Train LoRA: model handed to the training process (%.1f GiB in %.1f s)",
        (folder / UNET_FILE).stat().st_size / 2**30,
        time.perf_counter() - started,
    )


CHILD_ENV = "SPEEDKIT_TRAIN_WORKER_CHILD"
"""Set (``1``) in the worker's environment: the pack's ``__init__`` then registers no ComfyUI nodes
(the child imports the pack only to run :func:`child_main`)."""
_CHILD_MAIN = (
    "import importlib, sys; "
    "sys.exit(importlib.import_module(sys.argv[1] + '.lora_train.worker').child_main(sys.argv[2], sys.argv[3]))"
)


def _pack_dir() -> Path:
    """The pack's folder as the host found it (a linked folder keeps its link's name)."""
    return Path(os.path.abspath(__file__)).parent.parent


def pack_import_blocker(import_paths: list[str]) -> str | None:
    """Why the child could not import the pack by its folder name, or None when it can: a dot in
    the name would split it, and a module of that name in the host's import paths (which come
    first) would be imported instead (a pack folder named ``main`` beside ComfyUI's ``main.py``)."""
    name = _pack_dir().name
    if "." in name:
        return f"the pack's folder name {name!r} has a dot"
    for path in import_paths:
        if (Path(path) / name).exists() or (Path(path) / f"{name}.py").exists():
            return f"the pack's folder name {name!r} is also a module in {path}"
    return None


def child_env(import_paths: list[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """The host's environment without an allocator backend choice (the child uses PyTorch's native
    one), the host's import paths and then the pack's parent folder on ``PYTHONPATH``."""
    env = process_tree.subprocess_env(base=base)
    conf = [p for p in env.get("PYTORCH_CUDA_ALLOC_CONF", "").split(",") if p and not p.strip().startswith("backend")]
    if conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(conf)
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    paths = [*import_paths, str(_pack_dir().parent), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[CHILD_ENV] = "1"
    return env


def _command(folder: Path) -> list[str]:
    """The worker's command line: this Python importing the pack by its folder name (argv: that
    name, the pack's package name in the host, the job folder)."""
    return [sys.executable, "-c", _CHILD_MAIN, _pack_dir().name, _package(), str(folder)]


def _package() -> str:
    """This pack's package name in this process (ComfyUI names it by its folder path)."""
    return __name__.rsplit(".", 2)[0]


def _unpickler_module(host_package: str) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` that finds the host's names of the pack's classes
    under this process's name of the pack (the host pickled them under its own)."""
    here = _package()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module == host_package or module.startswith(host_package + "."):
                module = here + module[len(host_package) :]
            return super().find_class(module, name)

    shim = types.ModuleType("speedkit_worker_pickle")
    shim.Unpickler = Unpickler  # type: ignore[attr-defined]
    shim.load = pickle.load  # type: ignore[attr-defined]
    shim.__version__ = "1"  # type: ignore[attr-defined]
    return shim


@dataclass
class WorkerResult:
    lora_path: Path
    losses: list[float]
    validation_points: list[tuple[int, float]]
    cancelled: bool


class WorkerProcess:
    """A worker process on a job folder: started early (it imports and sets up CUDA while the host
    still writes the UNet), told to go, followed to its end; the folder is removed at the end.

    ``follow`` raises :class:`WorkerUnavailable` when the child ends before training starts,
    ``RuntimeError`` when it fails later (with its message; the files it saved are kept).
    """

    def __init__(self, folder: Path, setup: WorkerSetup, device: torch.device) -> None:
        self.folder = folder
        self._lock = hold_folder_lock(folder)  # until _close: marks the folder as in use
        torch.save({"module_attrs": setup.module_attrs, "preload": setup.preload, "device": str(device)},
                   folder / SETUP_FILE)  # fmt: skip
        self.proc = subprocess.Popen(
            _command(folder),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(setup.import_paths),
            cwd=str(folder),  # holds no module: nothing shadows the host's imports
            **process_tree.popen_kwargs(),
        )
        self.lines: queue.Queue = queue.Queue()
        self.tail: list[str] = []
        self.stop_sent = False
        threading.Thread(target=process_tree.split_lines, args=(self.proc.stdout, self.lines), daemon=True).start()

    def send(self, command: str) -> None:
        try:
            self.proc.stdin.write((command + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):  # the child is gone; its end shows as EOF on its output
            pass

    def go(self) -> None:
        """The job files are written: train."""
        self.send("go")

    def stop(self) -> None:
        if not self.stop_sent:
            self.stop_sent = True
            self.send("stop")

    def abandon(self) -> None:
        """The host could not write the job: end the child and remove the folder."""
        self.stop()
        self._close()

    def _close(self) -> None:
        if self.proc.poll() is None:
            process_tree.kill_process_tree(self.proc, grace_s=3.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()

    def _log(self, line: str) -> None:
        self.tail = [*self.tail[-(TAIL_LINES - 1) :], line]
        logger.info("Train LoRA worker: %s", line)

    def follow(self, hooks: RunHooks, render: Callable[[int, Path], None] | None) -> WorkerResult:
        """Relay the child's events to ``hooks`` until it ends; ``render(step, lora_file)`` renders
        the sample images of ``step`` with the LoRA saved in ``lora_file``."""
        started = False
        result: WorkerResult | None = None
        failure: dict[str, Any] | None = None
        try:
            while True:
                try:
                    line = self.lines.get(timeout=0.1)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line.startswith(EVENT_PREFIX):
                    event = json.loads(line[len(EVENT_PREFIX) :])
                    kind = event.pop("event")
                    if kind == "ready":
                        started = True
                    elif kind == "progress":
                        hooks.progress("train", event["step"], event["total"])
                    elif kind == "loss":
                        hooks.loss(event["step"], event["total"], event["loss"], event.get("validation_loss"))
                    elif kind == "samples":
                        if render is not None and not self.stop_sent:
                            render(event["step"], Path(event["lora"]))
                        self.send("continue")
                    elif kind == "done":
                        result = WorkerResult(
                            Path(event["lora"]),
                            [float(x) for x in event["losses"]],
                            [(int(s), float(v)) for s, v in event["validation"]],
                            bool(event["cancelled"]),
                        )
                    elif kind == "error":
                        failure = event
                elif line:
                    self._log(line)
                if not self.stop_sent and hooks.should_stop():
                    self.stop()
            code = self.proc.wait()
        except BaseException:
            # something failed here (a Cancel while rendering samples, an error in a hook): let the
            # child save what it trained, then make sure nothing of it is left running
            if self.proc.poll() is None:
                self.stop()
                try:
                    self.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    logger.warning("Train LoRA: the training process did not stop in %.0f s; killed", STOP_GRACE_S)
            raise
        finally:
            self._close()
        if result is not None:
            return result
        tail = "\n".join(self.tail[-10:])
        if failure is not None:
            if not started:
                raise WorkerUnavailable(f"{failure['kind']}: {failure['message'].splitlines()[0]}")
            raise _reraised(failure)
        if not started:
            raise WorkerUnavailable(f"it ended with exit code {code} before training; last output:\n{tail}")
        raise RuntimeError(
            f"Train LoRA: the training process ended unexpectedly (exit code {code}); the LoRA and resume state "
            f"of the last save_every step are kept. Last output:\n{tail}"
        )


# ----- the child ----------------------------------------------------------------------------


class _Wire:
    """The child's end: events out, commands in (read by a thread)."""

    def __init__(self) -> None:
        self.out = sys.stdout
        self.stop = threading.Event()
        self.resume = threading.Event()
        self.go = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in sys.stdin:
            command = raw.strip()
            if command == "go":
                self.go.set()
            elif command == "stop":
                self.stop.set()
                self.resume.set()
                self.go.set()
            elif command == "continue":
                self.resume.set()
        self.stop.set()  # the parent is gone
        self.resume.set()
        self.go.set()

    def emit(self, event: str, **fields: Any) -> None:
        self.out.write(EVENT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
        self.out.flush()


def _child_hooks(wire: _Wire):
    from .run import RunHooks

    class ChildHooks(RunHooks):
        def progress(self, phase: str, done: int, total: int) -> None:
            if phase == "train":
                wire.emit("progress", step=done, total=total)

        def loss(self, step: int, total: int, loss: float | None, validation_loss: float | None = None) -> None:
            wire.emit("loss", step=step, total=total, loss=loss, validation_loss=validation_loss)

        def should_stop(self) -> bool:
            return wire.stop.is_set()

    return ChildHooks()


class _RemoteRenderer:
    """Sample images in the worker: the LoRA of the step goes to a file, the host renders it."""

    def __init__(self, wire: _Wire, folder: Path, lora: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.wire, self.folder, self.lora = wire, folder, lora
        self.last: list[torch.Tensor] = []

    def render(self, handle: object, step: int, preview=None) -> list[Path]:
        from safetensors.torch import save_file

        if self.wire.stop.is_set():
            return []
        path = self.folder / f"samples_{step:06d}.safetensors"
        save_file(self.lora(), str(path))
        self.wire.resume.clear()
        self.wire.emit("samples", step=step, lora=str(path))
        self.wire.resume.wait()
        path.unlink(missing_ok=True)
        return []


def matmul_weights_to(unet: nn.Module, dtype: torch.dtype) -> int:
    """Give the Linear and Conv layers of the worker's own UNet copy their weights and biases in
    ``dtype``, the dtype autocast casts them to in every call; returns how many tensors changed.

    Autocast rounds such a weight to ``dtype`` each time a layer runs (forward, checkpoint
    recompute), so the values the kernels see are the same, bit for bit; what goes is those
    cast kernels and their memory traffic in every step (an SDXL UNet's 2.6 B weights, twice a
    step with checkpointing). Norm layers keep their weights: autocast runs them in fp32. Layers
    that cast their own weights on every call (ComfyUI's ``comfy_cast_weights`` or weight
    functions: patches, quantized weights) and tensor subclasses are left as they are: their
    cast follows the input's dtype, not autocast's. Only ever applied to the worker's copy,
    never to the host's model.
    """
    changed = 0
    for module in unet.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if (
            getattr(module, "comfy_cast_weights", False)
            or getattr(module, "weight_function", None)
            or getattr(module, "bias_function", None)
        ):
            continue
        for name in ("weight", "bias"):
            tensor = getattr(module, name, None)
            plain = type(tensor) in (torch.Tensor, nn.Parameter)
            if plain and tensor.dtype in (torch.float16, torch.bfloat16, torch.float32) and tensor.dtype != dtype:
                with torch.no_grad():
                    setattr(module, name, nn.Parameter(tensor.detach().to(dtype), requires_grad=tensor.requires_grad))
                changed += 1
    return changed


def _no_text_encoder(captions, samples):
    raise RuntimeError("the training process has no text encoder: every caption must be encoded up front")


def child_main(host_package: str, folder_arg: str) -> int:
    """Entry of the worker process (see :data:`_CHILD_MAIN`); the exit code says whether it trained."""
    from .run import PRECISION_DTYPES, LoadedUNet, TrainingRun, WorkerModelSide, _Between

    # the pack's own lines (progress of the run, its closing figures) reach the host's log; the
    # host model code's import chatter (device banners) only when it warns
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger(__name__.rsplit(".", 2)[0]).setLevel(logging.INFO)
    folder = Path(folder_arg)
    wire = _Wire()
    try:
        # while the host still writes the UNet: its settings, its model code, a CUDA context
        setup = torch.load(folder / SETUP_FILE, weights_only=False)
        for module, attribute, value in setup["module_attrs"]:
            setattr(importlib.import_module(module), attribute, value)
        for module in setup["preload"]:
            importlib.import_module(module)
        device = torch.device(setup["device"])
        torch.empty(1, device=device)
        wire.go.wait()
        if wire.stop.is_set():
            return 0
        unpickler = _unpickler_module(host_package)
        job: WorkerJob = torch.load(folder / JOB_FILE, weights_only=False, pickle_module=unpickler)
        started = time.perf_counter()
        # mmap: the file (in RAM) goes to the device without a second host copy
        unet = torch.load(
            folder / UNET_FILE, map_location=device, weights_only=False, mmap=True, pickle_module=unpickler
        )
        (folder / UNET_FILE).unlink(missing_ok=True)
        logger.info("model loaded in %.1f s (%s)", time.perf_counter() - started, device)
        side = WorkerModelSide(job.family, device, job.rename)
        run = TrainingRun(job.job, side, _child_hooks(wire))  # type: ignore[arg-type]
        renderer = None
        if job.render_samples:
            renderer = _RemoteRenderer(wire, folder, lambda: run.lora.state_dict(torch.float32))
        compute = PRECISION_DTYPES[job.job.config.precision]
        if job.job.config.precision != "fp32" and compute != job.dtype:  # the run computes under autocast
            changed = matmul_weights_to(unet, compute)
            logger.info("%d Linear/Conv weights held in %s, the dtype autocast computes them in", changed, compute)
        loaded = LoadedUNet(unet, job.denoise_factory(unet, job.dtype), device, job.dtype)
        # the server renders the samples with its own copy of the model while this process trains
        reserve = sum(t.numel() * t.element_size() for t in unet.parameters()) if renderer is not None else 0
        between = _Between(job.held, job.held_conds, renderer, reserve)
        wire.emit("ready")
        lora_path, losses = run._train_on(loaded, job.samples, _no_text_encoder, job.cond_cache, between)
        wire.emit(
            "done",
            lora=str(lora_path),
            losses=losses,
            validation=run.validation_points,
            cancelled=wire.stop.is_set(),
        )
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        logger.exception("training process failed")
        wire.emit("error", kind=type(exc).__name__, message=str(exc)[:MESSAGE_CHARS], oom=is_oom_error(exc))
        return 1
