"""Prepared model copies and torch.compile results, kept in an explicit bounded cache.

Why a cache at all: compiling RRDB for one shape takes tens of seconds, so the compiled
function must survive between node runs. Why explicit: the cache is an object the caller
owns (the node class holds one; the CLI makes its own), bounded in size, with ``clear()``;
nothing is stored in module globals.

Entries hold *our own copies* of the model's module (the spandrel descriptor ComfyUI
passes around is shared and must never be cast or moved by us). Copies are parked on the
CPU between runs so the GPU is free for other nodes, unless a run asks to keep its copy
loaded (``UpscaleOptions.keep_loaded``): then that copy stays on the device until a later
run without the option, :meth:`ModelCache.offload`, or the host's memory manager (which
the ComfyUI adapter registers it with) moves it back.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

COMPILE_MODES: tuple[str, ...] = ("regional", "default", "max-autotune-no-cudagraphs")
"""How the engine compiles (first = default). ``regional``: only the repeated blocks (RRDB's
23 blocks compile once and are reused: on an H100 first compile 10 s instead of 48 s, a
restarted process 6.2 s instead of 13.9 s, frames 0-10 % slower); models without repeated
blocks are compiled whole. ``default``: the whole model. ``max-autotune-no-cudagraphs``:
the whole model with autotuned kernels (slow to compile).
cudagraph modes are not offered: they would pin every tile buffer."""

# A TORCHINDUCTOR_CACHE_DIR the user exported before the pack loaded (torch itself writes
# its default into the environment once it compiles anything, so it is read here, once).
_USER_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def model_fingerprint(module: torch.nn.Module, arch: str = "") -> str:
    """Identity of a model's weights, cheap enough to compute on every run.

    Hashes every tensor's name, shape and dtype plus an evenly strided sample of at most
    64 of its values: two different checkpoints of one architecture differ in the sample,
    and nothing depends on ``id()`` (which Python reuses after garbage collection).
    """
    h = hashlib.sha1(arch.encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() and flat.dtype.is_floating_point:
                step = max(1, flat.numel() // 64)
                h.update(flat[::step][:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """Where compiled kernels persist: ``$SPEEDKIT_CACHE_DIR``, else a
    ``$TORCHINDUCTOR_CACHE_DIR`` set before the pack loaded, else the user cache folder."""
    env = os.environ.get("SPEEDKIT_CACHE_DIR") or _USER_INDUCTOR_DIR
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-speedkit" / "inductor"


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot be used here, or None when it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, compile is only used on CUDA"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    major, _minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return f"the GPU (compute capability {major}.x) is too old for triton"
    return None


@contextlib.contextmanager
def inductor_cache_dir(path: Path) -> Iterator[None]:
    """Point inductor's on-disk cache at ``path`` for the duration of a compiled call.

    The previous value is restored afterwards, so other nodes keep theirs.
    """
    path.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


class _BiasAfterConv2d(torch.nn.Conv2d):
    """A Conv2d that adds its bias as a separate op.

    On cuDNN 9 a biased fp16/bf16 channels_last 3x3 conv runs about 2x slower than the same
    conv without bias (measured on an H100: 0.74 vs 0.36 ms for 64->64 at 1080p); the extra
    add costs far less. torch.compile fuses the add into the conv epilogue either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, None)
        return y.add_(self.bias.view(1, -1, 1, 1))


def split_conv_bias(module: torch.nn.Module) -> int:
    """Make every biased ``nn.Conv2d`` of ``module`` (our own copy, never a shared model) add
    its bias after the convolution. Returns how many convs changed."""
    changed = 0
    for m in module.modules():
        if type(m) is torch.nn.Conv2d and m.bias is not None and m.padding_mode == "zeros":
            m.__class__ = _BiasAfterConv2d
            changed += 1
    return changed


def repeated_blocks(module: torch.nn.Module, min_repeats: int = 4) -> list[torch.nn.Module]:
    """The children of the container holding the most same-class sub-modules (at least
    ``min_repeats``): RRDB's trunk, SwinIR's layers... Empty when nothing repeats."""
    best: list[torch.nn.Module] = []
    for container in module.modules():
        if not isinstance(container, (torch.nn.Sequential, torch.nn.ModuleList)):
            continue
        by_class: dict[type, list[torch.nn.Module]] = {}
        for child in container.children():
            # Only blocks with real work inside: a list of bare convs/activations gains nothing.
            if sum(1 for _ in child.modules()) > 2:
                by_class.setdefault(type(child), []).append(child)
        for group in by_class.values():
            if len(group) >= min_repeats and len(group) > len(best):
                best = group
    return best


def surrounding_modules(module: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules around ``blocks`` that hold the rest of the work, for compiling too.

    These are the children of the blocks' ancestors that are neither blocks nor ancestors.
    Inside an ``nn.Sequential`` ancestor, consecutive such children are first regrouped
    into one ``nn.Sequential`` (``module`` must be our own copy: this edits it), so that a
    conv, its upsample and its activation compile as one graph. For RRDBNet that is the
    first conv, the trunk's closing conv and the upsampling/HR convs, which run at up to
    16x the input's pixels: compiled, their bias/activation/upsample ops fuse instead of
    making extra passes over 8K feature maps (small graphs, seconds to compile).
    """
    inside = {id(b) for b in blocks}
    ancestors: set[int] = set()

    def walk(m: torch.nn.Module) -> bool:
        holds = False
        for child in m.children():
            if id(child) in inside or walk(child):
                holds = True
        if holds:
            ancestors.add(id(m))
        return holds

    walk(module)

    def surrounding(child: torch.nn.Module) -> bool:
        return id(child) not in inside and id(child) not in ancestors

    found: list[torch.nn.Module] = []
    for m in list(module.modules()):
        if id(m) not in ancestors:
            continue
        if isinstance(m, torch.nn.Sequential):
            groups: list[list[torch.nn.Module]] = []
            for child in m:
                if surrounding(child) and groups and surrounding(groups[-1][-1]):
                    groups[-1].append(child)
                else:
                    groups.append([child])
            if len(groups) < len(m):
                regrouped = [g[0] if len(g) == 1 else torch.nn.Sequential(*g) for g in groups]
                for name in list(m._modules):
                    del m._modules[name]
                for i, child in enumerate(regrouped):
                    m.add_module(str(i), child)
        for child in m.children():
            if surrounding(child) and any(True for _ in child.parameters()):
                found.append(child)
    return found


@dataclass
class _Entry:
    module: torch.nn.Module
    compiled: dict[tuple, Callable] = field(default_factory=dict)
    compile_failed: str | None = None
    regional: torch.nn.Module | None = None  # a second copy whose repeated blocks are compiled

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.module, self.regional) if m is not None]


def _versions(tensors: list[torch.Tensor]) -> int:
    """Sum of the in-place version counters (inference tensors, e.g. weights ComfyUI loaded
    under ``torch.inference_mode()``, have none and count as unchanged)."""
    return sum(0 if t.is_inference() else t._version for t in tensors)


class ModelCache:
    """Bounded LRU of prepared model copies (per fingerprint and dtype) and their
    compiled forms (per input shape).

    ``max_models`` copies are kept; the least recently used is dropped (with its
    compiled graphs) when a new one is added. Thread-safe for concurrent lookups.
    """

    def __init__(self, max_models: int = 2, cache_dir: Path | None = None) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.max_models = max_models
        self.cache_dir = cache_dir or default_cache_dir()
        self._entries: OrderedDict[tuple[str, torch.dtype], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._kept: list[torch.nn.Module] = []
        # Hashing every weight costs ~30 ms for RRDB, on every run of a node: remembered per
        # module object (weakly, so a freed model's entry goes with it) together with the
        # weights' in-place version counters, so an edited model is hashed again.
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self, module: torch.nn.Module, arch: str = "") -> str:
        """:func:`model_fingerprint` of ``module``, computed once per module and weights version."""
        known = self._fingerprints.get(module)
        if known is not None and known[0] == arch and known[2] == _versions(known[1]):
            return known[3]
        tensors = [*module.parameters(), *module.buffers()]
        value = model_fingerprint(module, arch)
        self._fingerprints[module] = (arch, tensors, _versions(tensors), value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._kept = []

    def module(
        self,
        source: torch.nn.Module,
        fingerprint: str,
        dtype: torch.dtype,
        transform: Callable[[torch.nn.Module], None] | None = None,
    ) -> torch.nn.Module:
        """Our own eval-mode copy of ``source`` in ``dtype`` (``source`` is left untouched).

        The copy lives on the CPU until the engine moves it; channels_last is applied on
        the device (it is a no-op for parameters that are not 4-D).
        """
        return self._entry(source, fingerprint, dtype, transform).module

    def _entry(
        self,
        source: torch.nn.Module,
        fingerprint: str,
        dtype: torch.dtype,
        transform: Callable[[torch.nn.Module], None] | None = None,
    ) -> _Entry:
        """The entry for ``(fingerprint, dtype)``; ``transform`` edits a new copy in place
        (callers that transform must use a fingerprint that says so)."""
        key = (fingerprint, dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        copy_ = copy.deepcopy(source).to(device="cpu", dtype=dtype).eval()
        if transform is not None:
            transform(copy_)
        for p in copy_.parameters():
            p.requires_grad_(False)
        entry = _Entry(copy_)
        with self._lock:
            self._entries[key] = entry
            while len(self._entries) > self.max_models:
                dropped, old = self._entries.popitem(last=False)
                # A copy kept on the GPU must not stay there through a reference held elsewhere
                # (e.g. the host's memory manager): park it before letting it go.
                for m in old.modules():
                    m.to("cpu")
                logger.info("upscale model cache full: dropped model %s (%s)", dropped[0], dropped[1])
        return entry

    def compiled(
        self,
        source: torch.nn.Module,
        fingerprint: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        mode: str = "regional",
        transform: Callable[[torch.nn.Module], None] | None = None,
    ) -> Callable | None:
        """The compiled callable of the copy for inputs of ``shape``, or None when
        compiling failed before for this model (the caller then runs eager)."""
        entry = self._entry(source, fingerprint, dtype, transform)
        if entry.compile_failed is not None:
            return None
        key = (tuple(shape), mode)
        fn = entry.compiled.get(key)
        if fn is None and mode == "regional":
            if entry.regional is None:
                blocks = repeated_blocks(entry.module)
                if not blocks:
                    logger.info("upscale: no repeated blocks in this model, compiling it whole instead")
                    fn = self.compiled(source, fingerprint, dtype, shape, "default", transform)
                    entry.compiled[key] = fn
                    return fn
                # Our own copy; Module.compile() marks it in place, so it is kept apart from
                # the eager copy. Dynamo reuses one graph for every same-shaped block.
                entry.regional = copy.deepcopy(entry.module)
                blocks = repeated_blocks(entry.regional)
                for m in blocks + surrounding_modules(entry.regional, blocks):
                    m.compile(dynamic=False)
            fn = entry.regional
            entry.compiled[key] = fn
        elif fn is None:
            # dynamic=False: one static graph per tile shape; a run uses one shape.
            fn = torch.compile(entry.module, mode=mode, dynamic=False, fullgraph=False)
            entry.compiled[key] = fn
        return fn

    def mark_compile_failed(self, fingerprint: str, dtype: torch.dtype, reason: str) -> None:
        entry = self._entries.get((fingerprint, dtype))
        if entry is not None:
            entry.compile_failed = reason
            entry.compiled.clear()

    def offload(self, keep: Iterable[torch.nn.Module] = ()) -> None:
        """Move every cached copy to the CPU (frees the GPU for other nodes), except the
        modules in ``keep`` (the copies a run was asked to keep loaded), which
        :meth:`kept_modules` then lists until the next call."""
        keep = list(keep)
        with self._lock:
            self._offload_locked(keep)

    def offload_in_background(self) -> threading.Thread:
        """Move every cached copy to the CPU in a worker thread, returning at once.

        For a cancelled run (which keeps nothing loaded): moving a copy to the CPU waits for the
        GPU work already queued with its weights (up to a batch or two), which would delay the
        Cancel by as long. The cache stays locked until the move is done, so the next run waits
        for it instead of picking up a copy that is being moved; :meth:`kept_modules` answers at
        once (nothing is kept).
        """
        self._lock.acquire()
        self._kept = []

        def work() -> None:
            try:
                self._offload_locked([])
            except Exception as exc:  # noqa: BLE001 - the copies stay where they are; the next run moves them
                logger.warning("upscale: moving the model copies to the CPU failed: %s", exc)
            finally:
                self._lock.release()

        thread = threading.Thread(target=work, name="speedkit-upscale-offload", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._lock.release()
            raise
        return thread

    def _offload_locked(self, keep: list[torch.nn.Module]) -> None:
        kept = {id(m) for m in keep}
        for entry in self._entries.values():
            for m in entry.modules():
                if id(m) not in kept:
                    m.to("cpu")
        self._kept = keep

    def kept_modules(self) -> list[torch.nn.Module]:
        """The cached copies the last run kept loaded on its device (still in the cache)."""
        if not self._kept:  # nothing kept: no need to wait for a move in progress
            return []
        with self._lock:
            live = {id(m) for entry in self._entries.values() for m in entry.modules()}
            return [m for m in self._kept if id(m) in live]
