"""Hook functions that run the first blocks, ask the holder, and skip or compute the rest.

They only touch the arguments ComfyUI hands to its sanctioned extension points (no ComfyUI
import), so they are unit-testable with stand-in networks of the same structure:

- UNet (SD1.5/SDXL): :func:`unet_input_block_patch` (a ``input_block_patch``) sees the output of
  ``input_blocks[0]`` (conv in) and of ``input_blocks[n_first]`` (the first ResBlock by default)
  inside the model's own ``_forward``; on a hit it raises :class:`SkipRemainingBlocks`, which
  :func:`unet_diffusion_wrapper` (a ``DIFFUSION_MODEL`` wrapper) turns into
  ``out(h + cached residual)``. No forward code is copied: every other patch, ControlNet residual
  and wrapper runs untouched on computed steps. UNet blocks change shape and take skip
  concatenations, so the UNet always uses one (tail) residual from ``input_blocks[n_first]``'s
  output to the input of ``out`` (with ``n_last`` 1: of the last output block, which a hit then
  runs itself with conv-in's output as its skip connection, :func:`unet_output_block_patch`),
  and ``n_first`` stays within the first resolution level. A
  call that carries ControlNet residuals is computed in full: they enter the skipped blocks' skip
  connections and pass through the output blocks, so no cached residual can stand in for the
  current ones.
- DiTs: :func:`make_block_replacement` builds a ``patches_replace["dit"]`` entry for each block.
  The first ``n_first`` blocks always run and the first block's input and the last of them's
  output form the residual that decides; the last ``n_last`` blocks always run too (on the
  predicted state, DBCache's "Fn/Bn"). On a hit the blocks in between return ``input + cached
  residual`` (``per_block``) or pass their input through with the span's single residual added
  at its last block (``tail``). Blocks that add into their input tensor and return it (ComfyUI's
  Flux and LTXV blocks) are detected, and their inputs are copied before a residual is taken.
- Whole-step skips (``skip_whole_step``, UNets and DiTs, only where the skips are known before
  the call): :func:`whole_step_apply_model_wrapper` (UNets) and :func:`dit_diffusion_wrapper`
  return ``x - sigma * forecast`` for a planned skip without calling the network, the forecast
  made from the predictions of the last computed calls (:func:`_whole_step`).
- Anything else (Nunchaku wrappers, unknown families): :func:`step_apply_model_wrapper` (an
  ``APPLY_MODEL`` wrapper) skips whole model calls, comparing the model input with the last
  computed one and reusing (or forecasting) that call's noise/velocity prediction.

torch.compile: every hook that branches on the cache state is ``torch.compiler.disable``'d, the
entry points non-recursively, so dynamo graph-breaks around them and never guards on a hit or a
step; the model code they call (a block, the UNet's forward) is still compiled, once, whatever
the cache decides (tests/unit/test_fbcache_forecast.py checks this with error_on_recompile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .holder import HOLDER_KEY, FBCacheHolder

logger = logging.getLogger(__name__)

STREAMS = ("img", "txt")


class SkipRemainingBlocks(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the UNet forward on a cache hit; carries the first block's output."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__("first block cache hit")
        self.h = h


def _active_holder(transformer_options: dict | None) -> FBCacheHolder | None:
    if not transformer_options:
        return None
    holder = transformer_options.get(HOLDER_KEY)
    if holder is None or not holder.active:
        return None
    return holder


def _options_of(args: tuple, kwargs: dict) -> dict | None:
    """A wrapped model call's ``transformer_options`` (keyword, or positional in
    ``UNetModel._forward`` / ``BaseModel._apply_model``)."""
    transformer_options = kwargs.get("transformer_options")
    if transformer_options is None and len(args) > 5:
        transformer_options = args[5]
    return transformer_options


def _sigma_like(x: torch.Tensor, sigma) -> torch.Tensor | float:
    """``sigma`` broadcastable against ``x`` (one value per batch entry), kept away from 0."""
    if isinstance(sigma, torch.Tensor):
        return sigma.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype).clamp_min(1e-6)
    return max(float(sigma), 1e-6)


def _call_state(args: tuple, kwargs: dict, control_message: str) -> tuple[dict | None, FBCacheHolder | None]:
    """``(transformer_options, holder)`` of a wrapped model call; the holder is None when this
    call must simply run (cache off, or ControlNet residuals present, which are logged)."""
    transformer_options = _options_of(args, kwargs)
    holder = _active_holder(transformer_options)
    if holder is not None and _has_control(_find_control(args, kwargs)):
        holder.compute_uncached(transformer_options, control_message)
        holder = None
    return transformer_options, holder


# ---------------------------------------------------------------------------------------- UNet
UNET_CONTROL_MESSAGE = (
    "ControlNet/T2I-Adapter residuals are present: a UNet step that uses them is always computed (no skipping "
    "while the ControlNet is active). They enter the skipped blocks' skip connections and pass through the "
    "output blocks, so a cached residual cannot carry the current step's ControlNet signal."
)


def _has_control(control) -> bool:
    """True when ``control`` (ComfyUI's {'input'|'middle'|'output': [tensor|None, ...]}) adds anything."""
    if not isinstance(control, dict):
        return False
    return any(t is not None for value in control.values() if isinstance(value, (list, tuple)) for t in value)


@torch.compiler.disable  # branches on the cache state (see the module docstring)
def unet_input_block_patch(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """``input_block_patch``: remember conv-in's output, decide after ``input_blocks[n_first]``."""
    holder = _active_holder(transformer_options)
    if holder is None or holder.call is None:
        return h
    block = transformer_options.get("block")
    scratch = holder.call.scratch
    if block == ("input", 0):
        scratch["h0"] = h
        if holder.n_last:
            scratch["skip0"] = h  # the skip connection the last output block concatenates
    elif block == ("input", holder.n_first) and "h0" in scratch:
        h0 = scratch.pop("h0")
        if holder.decide(h - h0):
            raise SkipRemainingBlocks(h)
        scratch["anchor"] = h
    return h


@torch.compiler.disable  # branches on the cache state (see the module docstring)
def unet_output_block_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
    """``output_block_patch`` (only with ``n_last``): remember the state entering the last output
    block, before its skip concatenation; the tail residual then ends there."""
    holder = _active_holder(transformer_options)
    if holder is not None and holder.call is not None and holder.n_last:
        scratch = holder.call.scratch
        if transformer_options.get("block") == ("output", scratch.get("last_output")):
            scratch["pre_last"] = h
    return h, hsp


@torch.compiler.disable
def _register_pre_hook(module: torch.nn.Module, fn):
    return module.register_forward_pre_hook(fn)


@torch.compiler.disable
def _remove_hook(handle) -> None:
    handle.remove()


@torch.compiler.disable
def _unet_tail_hit(
    holder: FBCacheHolder, unet, skip: SkipRemainingBlocks, dtype: torch.dtype, context, transformer_options: dict
) -> torch.Tensor:
    h = skip.h + holder.cached("tail")["h"]
    scratch = holder.call.scratch
    if holder.n_last and "emb" in scratch:  # run the last output block on the predicted state
        last = scratch["last_output"]
        hsp = scratch["skip0"]
        patches = transformer_options.get("patches", {}).get("output_block_patch", [])
        transformer_options["block"] = ("output", last)
        for p in patches:  # other nodes' patches see what they would see on a computed step
            if p is not unet_output_block_patch:
                h, hsp = p(h, hsp, transformer_options)
        h = unet.output_blocks[last](torch.cat([h, hsp], dim=1), scratch["emb"], context, transformer_options, None)
    return unet.out(h.type(dtype))


@torch.compiler.disable
def _unet_capture_tail(holder: FBCacheHolder, h_out: torch.Tensor) -> None:
    call = holder.call
    if call is not None and call.hit is False and "anchor" in call.scratch:
        anchor = call.scratch.pop("anchor")
        end = call.scratch.get("pre_last", h_out) if holder.n_last else h_out
        if end.shape != anchor.shape:  # a UNet whose last output block takes another width
            logger.info("First Block Cache: n_last 1 -> 0 (the last output block's input has another shape).")
            holder.n_last, end = 0, h_out
        holder.store("tail", {"h": end - anchor})
        holder.finish_compute()


def _emb_layer(unet) -> torch.nn.Module | None:
    """The first ResBlock of ``input_blocks[1]`` (called as ``layer(x, emb)``), whose input gives
    the timestep embedding the last output block needs on a hit; None when there is none."""
    blocks = getattr(unet, "input_blocks", None)
    if blocks is None or len(blocks) < 2:
        return None
    return next((m for m in blocks[1] if hasattr(m, "emb_layers")), None)


@torch.compiler.disable(recursive=False)  # the UNet's forward (executor) is still compiled
def unet_diffusion_wrapper(executor, *args, **kwargs):
    """``DIFFUSION_MODEL`` wrapper of ``UNetModel``: per-call state and the skip path."""
    transformer_options, holder = _call_state(args, kwargs, UNET_CONTROL_MESSAGE)
    if holder is None:
        return executor(*args, **kwargs)
    unet = executor.class_obj
    x = args[0] if args else kwargs["x"]
    context = kwargs["context"] if "context" in kwargs else (args[2] if len(args) > 2 else None)
    call = holder.begin_call(transformer_options)

    def capture_tail(_module, inputs):
        _unet_capture_tail(holder, inputs[0])

    def capture_emb(_module, inputs):
        call.scratch["emb"] = inputs[1]

    # Live only for this call (removed in finally): the input of the final norm/conv, and (n_last)
    # the timestep embedding as the first ResBlock receives it.
    handles = [_register_pre_hook(unet.out, capture_tail)]
    emb_layer = _emb_layer(unet) if holder.n_last else None
    if emb_layer is not None:
        call.scratch["last_output"] = len(unet.output_blocks) - 1
        handles.append(_register_pre_hook(emb_layer, capture_emb))
    since = holder.trace_count()
    try:
        out = executor(*args, **kwargs)
        holder.note_output(out, since)
        return out
    except SkipRemainingBlocks as skip:
        return _unet_tail_hit(holder, unet, skip, x.dtype, context, transformer_options)
    finally:
        for handle in handles:
            _remove_hook(handle)
        holder.end_call()


# ---------------------------------------------------------------------------------------- DiT
@torch.compiler.disable
def _residuals(before: dict, after: dict) -> dict[str, torch.Tensor | None] | None:
    """``after - before`` for every stream; None when a stream cannot be expressed as a residual."""
    out: dict[str, torch.Tensor | None] = {}
    for key, value in after.items():
        if value is None:
            out[key] = None
            continue
        base = before.get(key)
        if not isinstance(value, torch.Tensor) or not isinstance(base, torch.Tensor) or base.shape != value.shape:
            return None
        out[key] = value - base
    return out


def _shape_message(where: str) -> str:
    return (
        f"block {where} changes the shape of its streams, so no residual can stand in for it: every step is "
        "computed (no speedup)"
    )


def _replaced_message(kind: str, index: int) -> str:
    return (
        f"block {kind} {index} is replaced by another node in some model calls (e.g. Skip Layer Guidance), so "
        "those calls cannot form a tail residual and are always computed; cache_mode per_block can skip them"
    )


@torch.compiler.disable
def _inputs_for_residual(holder: FBCacheHolder, args: dict, keys: tuple[str, ...]) -> tuple[dict, bool]:
    """The block inputs a residual is taken against, copied while blocks may write into their input.

    Some networks' blocks update their input tensor in place and return it (LTXV's
    ``x += attn(...)``), so ``output - input`` read after the block would be zero. Until a whole
    call has shown that no block does that (``holder.copy_inputs`` False), the inputs are cloned.
    """
    if holder.copy_inputs is False:
        return args, False
    return {k: (v.clone() if isinstance(v := args.get(k), torch.Tensor) else v) for k in keys if k in args}, True


@torch.compiler.disable  # reads storage pointers: host-side bookkeeping, like the holder's decision
def _note_aliasing(holder: FBCacheHolder, kind: str, index: int, args: dict, out: dict, copied: bool) -> bool:
    """True when a block returned (a view of) its input tensor; switches input copying on for the run."""
    for key, value in out.items():
        base = args.get(key)
        if not isinstance(value, torch.Tensor) or not isinstance(base, torch.Tensor):
            continue
        if value is base or value.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
            if holder.copy_inputs is not True:
                holder.copy_inputs = True
                logger.info(
                    "First Block Cache: block %s %d updates its input in place; block inputs are copied before "
                    "residuals are taken.",
                    kind,
                    index,
                )
            return True
    return False


@torch.compiler.disable
def _inject(args: dict, residual: dict[str, torch.Tensor | None]) -> dict:
    return {k: (None if r is None else args[k] + r) for k, r in residual.items()}


def cached_span(stacks: tuple[tuple[str, int], ...], kind: str, n_first: int, n_last: int) -> tuple[int, int] | None:
    """Local block indices ``[lo, hi)`` of ``kind`` that a hit skips (None: none of them).

    Blocks are numbered in execution order over all stacks; the first ``n_first`` and the last
    ``n_last`` always run, the ones in between are cached.
    """
    total = sum(n for _, n in stacks)
    start = 0
    for k, n in stacks:
        if k == kind:
            lo = max(n_first, start) - start
            hi = min(total - n_last, start + n) - start
            return (lo, hi) if lo < hi else None
        start += n
    return None


def clamp_blocks(stacks: tuple[tuple[str, int], ...], n_first: int, n_last: int) -> tuple[int, int, str]:
    """``(n_first, n_last)`` a network with ``stacks`` allows, and why they were lowered ("" if not).

    The deciding residual is taken on the first stack's image stream, so ``n_first`` stays within
    the first stack; at least one block must be left to cache.
    """
    total = sum(n for _, n in stacks)
    first_count = stacks[0][1]
    f, b = n_first, n_last
    reasons = []
    if f > first_count:
        f = first_count
        reasons.append(f"n_first {n_first} -> {f} (the deciding blocks must lie in the first stack of {first_count})")
    if f + b >= total:
        b = max(0, total - f - 1)
        if f + b >= total:
            f = max(1, total - 1)
        reasons.append(f"n_last {n_last} -> {b} (at least one of the {total} blocks must be left to cache)")
    return f, b, "; ".join(reasons)


def make_block_replacement(
    kind: str,
    index: int,
    stacks: tuple[tuple[str, int], ...],
    previous: Callable | None = None,
) -> Callable[[dict, dict], dict]:
    """A ``patches_replace["dit"][(kind, index)]`` function for a network with ``stacks``.

    ``stacks`` lists (kind, number of blocks) in execution order; the first block of the first
    stack is the "first block". The holder's ``n_first`` / ``n_last`` say which blocks always
    run (see :func:`cached_span`). ``previous`` is a replacement that another node had installed
    for this block: it still runs on computed steps.
    """
    counts = dict(stacks)
    first_kind, last_kind = stacks[0][0], stacks[-1][0]
    in_first_stack = kind == first_kind
    is_final = kind == last_kind and index == counts[kind] - 1

    @torch.compiler.disable(recursive=False)  # not a frame of its own: the block it calls is compiled
    def compute(args: dict, extra: dict) -> dict:
        if previous is not None:
            return previous(args, extra)
        return extra["original_block"](args)

    @torch.compiler.disable(recursive=False)  # branches on the cache state; the block itself is still compiled
    def replacement(args: dict, extra: dict) -> dict:
        holder = _active_holder(args.get("transformer_options"))
        if holder is None:
            return compute(args, extra)
        n_first = holder.n_first
        if in_first_stack and index < n_first:  # the deciding head: always runs
            if index == 0:
                holder.begin_call(args["transformer_options"])
                before, copied = _inputs_for_residual(holder, args, ("img",))
                holder.call.scratch["head_input"] = before["img"]
            call = holder.call
            if call is None or "head_input" not in call.scratch:  # block 0 did not run through us
                return compute(args, extra)
            out = compute(args, extra)
            _note_aliasing(holder, kind, index, args, out, index == 0 and copied)
            if index == n_first - 1:
                holder.decide(out["img"] - call.scratch.pop("head_input"))
            return out
        call = holder.call
        if call is None or call.hit is None:  # the deciding blocks did not run through us: stay out of the way
            return compute(args, extra)
        span = cached_span(stacks, kind, n_first, holder.n_last)
        in_span = span is not None and span[0] <= index < span[1]
        if call.hit:
            if not in_span:  # the always-computed tail blocks run on the predicted state
                return compute(args, extra)
            if holder.cache_mode == "per_block":
                return _inject(args, holder.cached((kind, index)))
            if index == span[1] - 1:
                return _inject(args, holder.cached((kind, "tail")))
            return {k: args.get(k) for k in holder.cached((kind, "keys"))}

        scratch = call.scratch
        needs_input = in_span and (holder.cache_mode == "per_block" or index == span[0])
        before, copied = _inputs_for_residual(holder, args, STREAMS) if needs_input else (args, False)
        out = compute(args, extra)
        if _note_aliasing(holder, kind, index, args, out, copied) and needs_input and not copied:
            scratch["no_cache"] = (
                f"block {kind} {index} overwrote its input in place before it was copied; this step's residuals "
                "are not used (later steps copy the inputs)"
            )
        if in_span:
            _store_span_residual(holder, scratch, kind, index, span, before, out)
        if is_final:
            _finish_dit_call(holder, scratch, stacks, n_first)
        return out

    return replacement


@torch.compiler.disable
def _store_span_residual(
    holder: FBCacheHolder, scratch: dict, kind: str, index: int, span: tuple[int, int], before: dict, out: dict
) -> None:
    """On a computed call: keep the residual(s) of the cached blocks (per block, or the span's tail)."""
    if holder.cache_mode == "per_block":
        res = _residuals(before, out)
        if res is None:
            scratch.setdefault("no_cache", _shape_message(f"{kind} {index}"))
        else:
            holder.store((kind, index), res)
        return
    if index == span[0]:
        scratch[kind] = {k: before.get(k) for k in out}
        holder.store((kind, "keys"), dict.fromkeys(out))
    if index == span[1] - 1:
        if kind not in scratch:
            scratch.setdefault("no_cache", _replaced_message(kind, span[0]))
        else:
            res = _residuals(scratch.pop(kind), out)
            if res is None:
                scratch.setdefault("no_cache", _shape_message(f"{kind} stack"))
            else:
                holder.store((kind, "tail"), res)


@torch.compiler.disable
def _finish_dit_call(holder: FBCacheHolder, scratch: dict, stacks: tuple[tuple[str, int], ...], n_first: int) -> None:
    """After the final block of a computed call: let its residuals serve hits, or say why not."""
    open_spans = [k for k, _ in stacks if k in scratch]
    if open_spans and holder.cache_mode == "tail":
        # a span started but its last block is another node's replacement in these calls
        kind = open_spans[0]
        span = cached_span(stacks, kind, n_first, holder.n_last)
        scratch.setdefault("no_cache", _replaced_message(kind, span[1] - 1 if span else 0))
    if "no_cache" in scratch:
        holder.warn_once(scratch["no_cache"])
    else:
        holder.finish_compute()
    if holder.copy_inputs is None:
        holder.copy_inputs = False  # a whole call ran without any block writing into its input
    holder.end_call()


def _find_control(args: tuple, kwargs: dict):
    control = kwargs.get("control")
    if control is None:
        for value in args:
            if isinstance(value, dict) and HOLDER_KEY not in value and ("input" in value or "output" in value):
                return value
    return control


def _whole_step(holder: FBCacheHolder, args: tuple, kwargs: dict, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``APPLY_MODEL`` level, ``skip_whole_step``: a planned skip returns ``x - sigma * forecast``
    without running any block; a computed call runs (``run``) and its prediction is kept for the
    forecasts. Calls with ControlNet residuals always run (the block hooks handle them)."""
    if not holder.skips_whole_steps or len(args) < 2 or _has_control(_find_control(args, kwargs)):
        return run()
    x = args[0]
    s = _sigma_like(x, args[1])
    forecast = holder.skip_whole(_options_of(args, kwargs) or {}, tuple(x.shape))
    if forecast is not None:
        return x - forecast * s
    holder.last_call = None  # set again if this call reaches the block hooks (a call that does not is not kept)
    denoised = run()
    holder.record_whole((x - denoised) / s)
    return denoised


@torch.compiler.disable(recursive=False)  # the model call itself is still compiled
def whole_step_apply_model_wrapper(executor, *args, **kwargs):
    """``APPLY_MODEL`` wrapper of the UNet families: whole-step skips (:func:`_whole_step`); the
    UNet's own hooks sit inside the ``DIFFUSION_MODEL`` wrapper."""
    holder = _active_holder(_options_of(args, kwargs))
    if holder is None:
        return executor(*args, **kwargs)
    return _whole_step(holder, args, kwargs, lambda: executor(*args, **kwargs))


@torch.compiler.disable(recursive=False)  # the model call itself is still compiled
def dit_diffusion_wrapper(executor, *args, **kwargs):
    """Wrapper of block-hooked DiTs: switch tail to per_block under ControlNet.

    The adapter registers it as an ``APPLY_MODEL`` wrapper (``apply_model(x, t, c_concat,
    c_crossattn, control, transformer_options)``), which every family passes through; SD3's
    MMDiT has no ``DIFFUSION_MODEL`` wrapper point. It also accepts the ``DIFFUSION_MODEL``
    argument order (``control`` is found by its shape).

    A tail residual would carry the reference step's ControlNet residuals of the skipped blocks,
    and the model adds the current step's on top; per-block residuals exclude them, so every
    skipped block gets exactly the current ControlNet residual.

    It also closes the holder's call around every model call: the block hooks close it at the
    final block, but when another node replaces that block in some calls (Skip Layer Guidance),
    a call would stay open and a later call whose first block is replaced too would see it.
    """
    holder = _active_holder(kwargs.get("transformer_options"))
    if holder is None:
        holder = next((_active_holder(a) for a in reversed(args) if isinstance(a, dict) and HOLDER_KEY in a), None)
    if holder is None:
        return executor(*args, **kwargs)
    if holder.cache_mode == "tail" and _has_control(_find_control(args, kwargs)):
        holder.switch_mode("per_block", "ControlNet residuals present")

    def run() -> torch.Tensor:
        since = holder.trace_count()
        try:
            denoised = executor(*args, **kwargs)
            if holder.run_mode == "calibrating" and len(args) > 1 and isinstance(denoised, torch.Tensor):
                holder.note_output(_prediction(args[0], args[1], denoised), since)
            return denoised
        finally:
            holder.end_call()

    return _whole_step(holder, args, kwargs, run)


@torch.compiler.disable
def _prediction(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """The noise/velocity prediction ``(x - denoised) / sigma`` behind an APPLY_MODEL result."""
    return (x - denoised) / _sigma_like(x, sigma)


# ---------------------------------------------------------------------------------------- step
STEP_CONTROL_MESSAGE = (
    "ControlNet residuals are present: whole-step caching computes every call that uses them (a reused "
    "prediction would carry an older step's ControlNet signal)."
)


@torch.compiler.disable(recursive=False)  # the model call itself is still compiled
def step_apply_model_wrapper(executor, *args, **kwargs):
    """``APPLY_MODEL`` wrapper for networks without block hooks: skip whole calls.

    The compared "first block residual" is the model input itself; on a hit the last computed
    call's ``(x - denoised) / sigma`` (the noise or velocity prediction) is reused.
    """
    transformer_options, holder = _call_state(args, kwargs, STEP_CONTROL_MESSAGE)
    if holder is None:
        return executor(*args, **kwargs)
    x = args[0]
    sigma = args[1]
    holder.begin_call(transformer_options)
    try:
        s = _sigma_like(x, sigma)
        since = holder.trace_count()
        if holder.decide(x):
            return x - holder.cached("step")["eps"] * s
        denoised = executor(*args, **kwargs)
        eps = (x - denoised) / s
        holder.store("step", {"eps": eps})
        holder.note_output(eps, since)
        holder.finish_compute()
        return denoised
    finally:
        holder.end_call()
