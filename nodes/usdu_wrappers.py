"""The two ModelPatcher wrappers the USDU nodes add to a *clone* of the user's MODEL.

Both go through ComfyUI's public wrapper API (``ModelPatcher.add_wrapper_with_key`` with a
``comfy.patcher_extension.WrappersMP`` point), live only as long as the clone and never
modify the MODEL the user connected:

- ``CALC_COND_BATCH`` (:func:`with_tile_adm`): every tile of a batched sampler call gets its
  own SDXL size/crop vector;
- ``DIFFUSION_MODEL`` (:func:`with_cuda_graphs`): the denoiser's calls are replayed as CUDA
  graphs where that is safe (:mod:`usdu.graphs`).
"""

from __future__ import annotations

import logging

import torch

from .. import torch_utils
from ..usdu import cond as usdu_cond
from ..usdu import graphs as graphs_mod
from ..usdu.forward_args import ForwardArgs

logger = logging.getLogger(__name__)

TILE_ADM_KEY = "speedkit_usdu_tile_adm"
"""Key of the sampler wrapper that gives every tile of a batch its own SDXL size vector."""
GRAPHS_KEY = "speedkit_usdu_cuda_graphs"
"""Key of the diffusion-model wrapper that replays repeated tile shapes as CUDA graphs."""


def with_tile_adm(model, sizes: list[dict], images: int):
    """A clone of ``model`` whose sampler rebuilds each conditioning entry's encoded vector
    (``y``: SDXL's pooled prompt + size/crop embeddings) per tile of the batch.

    ComfyUI encodes ``y`` once per entry from scalar ``width``/``crop_w``/... values and
    repeats it over the batch, so all tiles of one call would share the first tile's
    crop. The wrapper (on ComfyUI's ``calc_cond_batch``, before ControlNets and the model
    see ``y``) re-encodes every entry with each tile's values through the model's own
    ``encode_adm`` and stacks the rows job-major (``usdu.cond.per_tile_rows``): only the
    elements that depend on the sizes are replaced, and only when ComfyUI's ``y`` agrees
    with the re-encoded entry on all of them (otherwise, e.g. for unCLIP entries whose
    encoding needs the sampler's seed, the entry is left alone).
    The user's MODEL is not modified.
    """
    import comfy.conds
    import comfy.patcher_extension as pe

    prompt_types = ("positive", "negative")
    memo: dict = {}

    def rebuild(base, entry: dict, prompt_type: str, x_in: torch.Tensor) -> dict:
        y_cond = entry.get("model_conds", {}).get("y")
        current = getattr(y_cond, "cond", None)
        if not isinstance(current, torch.Tensor) or not hasattr(base, "encode_adm"):
            return entry
        # ComfyUI copies positive area entries into the negative list with the negative's
        # vector (same uuid, other `y`): key on both.
        key = (entry.get("uuid", id(entry)), id(y_cond))
        if key not in memo:
            params = {k: v for k, v in entry.items() if k not in ("model_conds", "uuid")}
            params.setdefault("prompt_type", prompt_type)
            params["device"] = x_in.device
            params.setdefault("noise", x_in)
            try:
                rows = usdu_cond.per_tile_rows(lambda p: base.encode_adm(**p), params, sizes, images, current)
            except Exception as exc:  # noqa: BLE001 - a model's encoder we cannot call: keep ComfyUI's vector
                logger.warning(
                    "USDU: could not re-encode the conditioning per tile (%s); the batch shares tile 1's", exc
                )
                rows = None
            if rows is None:
                logger.debug("USDU: conditioning vector not rebuilt per tile (model ignores sizes, or not exact)")
            memo[key] = None if rows is None else comfy.conds.CONDRegular(rows.to(current))
        if memo[key] is None:
            return entry
        out = dict(entry)
        out["model_conds"] = {**entry["model_conds"], "y": memo[key]}
        return out

    def wrapper(executor, base, conds, x_in, timestep, model_options):
        if x_in.shape[0] == len(sizes) * images:
            conds = [
                None if c is None else [rebuild(base, e, prompt_types[min(i, 1)], x_in) for e in c]
                for i, c in enumerate(conds)
            ]
        return executor(base, conds, x_in, timestep, model_options)

    patched = model.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, TILE_ADM_KEY, wrapper)
    return patched


OWN_CODE = ("comfy.", "torch.")
"""Module prefixes of the layer classes recorded under cudaMallocAsync: ComfyUI's and PyTorch's."""


def run_modules(model) -> list[torch.nn.Module]:
    """The modules ``model``'s diffusion model runs: its own object patches in, and any other
    clone's patches out. Clones share one module tree, and ComfyUI leaves the last loaded
    clone's object patches applied to it until another clone loads; the originals wait in the
    shared ``object_patches_backup`` and ``get_model_object`` resolves a path as ``model`` sees it."""
    diffusion = model.model.diffusion_model
    keys = {*getattr(model, "object_patches_backup", {}), *getattr(model, "object_patches", {})}
    keys = {k for k in keys if k == "diffusion_model" or k.startswith("diffusion_model.")}
    modules = [
        m
        for name, m in diffusion.named_modules(prefix="diffusion_model")
        if not any(name == k or name.startswith(k + ".") for k in keys)
    ]
    for key in sorted(keys):
        obj = model.get_model_object(key) if hasattr(model, "get_model_object") else None
        if isinstance(obj, torch.nn.Module):
            modules.extend(obj.modules())
    return modules


def foreign_layer(model) -> str | None:
    """The first layer the diffusion model runs (object patches included) whose class comes from
    neither ComfyUI nor PyTorch (another extension's quantized or custom layers), or None."""
    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion, torch.nn.Module):
        return "a diffusion model that is not a torch module"
    for module in run_modules(model):
        origin = type(module).__module__
        if not origin.startswith(OWN_CODE):
            return f"{type(module).__name__} from {origin}"
    return None


def graph_blocker(model, device: torch.device) -> str | None:
    """Why the model's calls cannot be replayed as CUDA graphs, or None when they can.

    Under cudaMallocAsync (ComfyUI's default on NVIDIA) a capture that fails aborts the process,
    so there only ComfyUI's and PyTorch's own layers are recorded: another extension's layers may
    call kernels outside PyTorch's dispatcher, where the checked run before a capture cannot see
    a sync or an allocation."""
    if device.type != "cuda":
        return "not a CUDA device"
    if torch_utils.malloc_async_active() and (foreign := foreign_layer(model)) is not None:
        return (
            f"the model runs {foreign}, not ComfyUI's own model code (under ComfyUI's default "
            "cudaMallocAsync allocator only that is recorded; --disable-cuda-malloc records it too)"
        )
    if getattr(model, "is_dynamic", lambda: False)():
        return "the model is streamed by ComfyUI's dynamic VRAM manager"
    options = model.model_options.get("transformer_options", {})
    for key in ("patches", "patches_replace"):
        if any(options.get(key, {}).values()):
            return f"the model carries {key} (e.g. FBCache, IPAdapter, attention patches)"
    wrappers = options.get("wrappers", {})
    if any(any(v.values()) if isinstance(v, dict) else v for v in wrappers.values()):
        return "the model carries wrappers from another node"
    if model.model_options.get("model_function_wrapper") is not None:
        return "the model carries a model_function_wrapper"
    return None


def with_cuda_graphs(model, device: torch.device):
    """A clone of ``model`` whose diffusion-model calls go through a :class:`GraphRunner`
    (returned too, to close after the run), or ``(model, None)`` when that is not safe."""
    import comfy.patcher_extension as pe

    reason = graph_blocker(model, device)
    if reason is not None:
        logger.info("USDU: CUDA graphs not used: %s", reason)
        return model, None
    diffusion = model.model.diffusion_model

    def weights():
        yield from diffusion.parameters()
        yield from diffusion.buffers()

    runner_ = graphs_mod.GraphRunner(weights)
    try:
        forward = ForwardArgs(diffusion._forward)
    except (AttributeError, TypeError, ValueError):
        logger.info("USDU: CUDA graphs not used: the diffusion model has no inspectable _forward")
        return model, None

    def wrapper(executor, *args, **kwargs):
        # Every argument by name (UNet and DiTs pass them positionally); ControlNet residuals
        # and anything unusual run eagerly.
        named = forward.name(args, kwargs)
        if named is None:
            return executor(*args, **kwargs)
        control = named.pop("control", None)
        options = named.pop("transformer_options", {})
        if control is not None:
            return executor(*args, **kwargs)
        if getattr(model.model, "model_lowvram", False):
            # Weights are cast in per layer from the CPU: keep ComfyUI's own streaming in charge.
            runner_.disable("the model is only partially loaded on the GPU (lowvram)")

        def call(**tensors):
            return executor(**tensors, control=None, transformer_options=options)

        return runner_(call, **named)

    patched = model.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, GRAPHS_KEY, wrapper)
    return patched, runner_
