"""ComfyUI adapter for fbcache/: the ``SpeedKit_FirstBlockCache`` model patch node."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..fbcache import (
    CACHE_MODES,
    HIT_RESIDUALS,
    HOLDER_KEY,
    FBCacheHolder,
    conditioning_on_device,
    dit_diffusion_wrapper,
    make_block_replacement,
    resolve_family,
    step_apply_model_wrapper,
    unet_diffusion_wrapper,
    unet_input_block_patch,
    validate_settings,
)
from . import comfy_bridge

logger = logging.getLogger(__name__)

WRAPPER_KEY = "speedkit_fbcache"
DEFAULT_MODE = "tail"  # benchmarks/fbcache_cost.py: same speed as per_block, 15x less extra memory
DEFAULT_MAX_HITS = 2  # benchmarks/fbcache_quality.py: bounded runs of hits win at <= 2x
DEFAULT_HIT_RESIDUAL = "extrapolate"  # benchmarks/fbcache_quality.py: ~+5 dB PSNR at the same settings


def _send_ui_text(node_id: str | None, text: str) -> None:
    comfy_bridge.send_progress_text(text, node_id)


def outer_sample_wrapper(executor, *args, **kwargs):
    """``OUTER_SAMPLE``: a fresh holder per sampling run, the report and a reset at the end."""
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    holder: FBCacheHolder = options[HOLDER_KEY].clone()
    holder.prepare(guider.model_patcher.model.model_sampling.percent_to_sigma)
    options[HOLDER_KEY] = holder
    logger.info(
        "First Block Cache on (%s): threshold %s, sigma window (%.4g, %.4g], max_consecutive_hits %s, mode %s",
        holder.description,
        holder.threshold,
        holder.end_sigma,
        holder.start_sigma,
        holder.max_consecutive_hits,
        holder.cache_mode,
    )
    try:
        return executor(*args, **kwargs)
    finally:
        text = holder.summary_text()
        if not holder.stats:
            text = (
                f"First Block Cache was attached ({holder.description}) but its hooks never ran: this model did "
                "not call them, so nothing was cached. Please report the model type."
            )
            logger.warning(text)
        else:
            logger.info(text)
        _send_ui_text(holder.report_node_id, text)
        holder.reset()
        holder.active = False
        guider.model_options = original


def sampler_sample_wrapper(executor, guider, *args, **kwargs):
    """``SAMPLER_SAMPLE``: the run's conditioning stays on the model's device (see fbcache/conditioning.py).

    Runs after ComfyUI built the run's own cond dicts, so the user's CONDITIONING is not touched;
    the guider gets them back when the sampler returns.
    """
    original = getattr(guider, "conds", None)
    device = getattr(getattr(guider, "model_patcher", None), "load_device", None)
    if not isinstance(original, dict) or device is None:  # a guider of another shape: leave it as it is
        return executor(guider, *args, **kwargs)
    guider.conds, moved = conditioning_on_device(original, device)
    if moved:
        logger.info(
            "First Block Cache: the conditioning (%.1f MiB) stays on %s for this run, so cached steps do not wait "
            "for a host-side copy.",
            moved / 2**20,
            device,
        )
    try:
        return executor(guider, *args, **kwargs)
    finally:
        guider.conds = original


def apply_first_block_cache(model, holder: FBCacheHolder):
    """Clone ``model`` (a ModelPatcher) and attach ``holder`` with the hook that fits its network."""
    import comfy.patcher_extension as pe

    if not all(hasattr(model, a) for a in ("clone", "model_options", "add_wrapper_with_key", "get_model_object")):
        raise ValueError(
            f"model is a {type(model).__module__}.{type(model).__name__}, not a ComfyUI MODEL (ModelPatcher): "
            "connect the MODEL output of a checkpoint or diffusion-model loader."
        )
    try:
        diffusion_model = model.get_model_object("diffusion_model")
    except AttributeError as exc:
        raise ValueError(
            f"model ({type(model.model).__name__}) has no diffusion_model: First Block Cache only patches "
            "diffusion models."
        ) from exc
    family = resolve_family(diffusion_model)
    patched = model.clone()
    options = patched.model_options["transformer_options"]
    if HOLDER_KEY in options:
        logger.warning("First Block Cache: the model already had a First Block Cache; its settings are replaced.")
        for wrapper_type in (
            pe.WrappersMP.OUTER_SAMPLE,
            pe.WrappersMP.SAMPLER_SAMPLE,
            pe.WrappersMP.DIFFUSION_MODEL,
            pe.WrappersMP.APPLY_MODEL,
        ):
            patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    options[HOLDER_KEY] = holder

    if family.kind == "unet":
        if holder.cache_mode == "per_block":
            logger.info(
                "First Block Cache: %s blocks change shape and take skip connections, so per_block caching "
                "is not possible; using one tail residual.",
                family.name,
            )
        patches = options.setdefault("patches", {})
        patches = options["patches"] = dict(patches)
        old = [p for p in patches.get("input_block_patch", []) if p is not unet_input_block_patch]
        patches["input_block_patch"] = [*old, unet_input_block_patch]
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, unet_diffusion_wrapper)
        holder.description = f"{family.name}: first ResBlock, tail residual"
    elif family.kind == "dit":
        if family.per_block_only and holder.cache_mode != "per_block":
            logger.info("First Block Cache: %s: %s, so per_block residuals are used.", family.name, family.reason)
            holder.cache_mode = "per_block"
        existing = options.get("patches_replace", {}).get("dit", {})
        for kind, count in family.stacks:
            for i in range(count):
                previous = existing.get((kind, i))
                if getattr(previous, "_speedkit_fbcache", False):
                    previous = previous._speedkit_previous
                fn = make_block_replacement(kind, i, family.stacks, previous)
                fn._speedkit_fbcache = True
                fn._speedkit_previous = previous
                patched.set_model_patch_replace(fn, "dit", kind, i)
        # APPLY_MODEL: every family passes through it with ``control`` (SD3's MMDiT has no DIFFUSION_MODEL hook).
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, dit_diffusion_wrapper)
        blocks = ", ".join(f"{n} {k}s" for k, n in family.stacks)
        holder.description = f"{family.name}: {blocks}, {holder.cache_mode} residuals"
    else:
        logger.warning("First Block Cache: %s.", family.reason)
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, step_apply_model_wrapper)
        holder.description = f"{family.name}: whole-step skip"
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample_wrapper)
    logger.info("First Block Cache attached to %s.", holder.description)
    return patched


class FirstBlockCache(io.ComfyNode):
    """Skip the remaining blocks of a sampling step when the first block's residual barely changed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_FirstBlockCache",
            display_name="First Block Cache (SpeedKit)",
            category="SpeedKit/model_patches",
            description=(
                "Speeds up sampling: every step runs the model's first block and compares its residual with the "
                "one of the last fully computed step. When the relative change is below the threshold, the other "
                "blocks are skipped and their cached residual is added back. Works on SD1.5/SDXL UNets and on "
                "Flux, Chroma, SD3, Wan, HunyuanVideo, LTXV and Qwen-Image; other models (e.g. Nunchaku) skip "
                "whole steps. On UNets, steps that use a ControlNet are always computed. Put it after LoRA "
                "loaders. The log and this node report steps computed/skipped."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to speed up (after any LoRA loaders)."),
                io.Float.Input(
                    "residual_diff_threshold",
                    default=0.1,
                    min=0.0,
                    max=2.0,
                    step=0.005,
                    tooltip=(
                        "Skip a step when mean|r - r_ref| / mean|r_ref| of the first block's residual is below this "
                        "(relative, unitless). Higher = faster, lower quality. 0 = off: the model is returned "
                        "unchanged. Typical: 0.05-0.12 Flux, 0.1-0.25 SDXL."
                    ),
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the schedule (0-1) before which every step is computed (the layout forms early).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Fraction of the schedule (0-1) after which every step is computed (fine detail).",
                ),
                io.Int.Input(
                    "max_consecutive_hits",
                    default=DEFAULT_MAX_HITS,
                    min=-1,
                    max=1000,
                    tooltip=(
                        "At most this many skipped steps in a row, then one is computed (counted per "
                        "conditioning). -1 = unlimited, 0 = never skip. Default 2: in our benchmark it gave "
                        "clearly higher PSNR than unlimited at the same speedup up to about 2x."
                    ),
                    advanced=True,
                ),
                io.Combo.Input(
                    "cache_mode",
                    options=list(CACHE_MODES),
                    default=DEFAULT_MODE,
                    tooltip=(
                        "tail (default): one cached residual per block stack. per_block: every skipped block adds "
                        "its own residual. Same result without ControlNet; measured on a Flux-size DiT (H100, 50 % "
                        "hits) tail is as fast (1.89x vs 1.87x) with 92 MiB instead of 1.5 GiB extra memory. "
                        "With ControlNet a DiT switches to per_block by itself; UNets always use tail."
                    ),
                    advanced=True,
                ),
                io.Combo.Input(
                    "hit_residual",
                    options=list(HIT_RESIDUALS),
                    default=DEFAULT_HIT_RESIDUAL,
                    tooltip=(
                        "What a skipped step adds back. extrapolate (default): a straight-line prediction along "
                        "the noise schedule from the residuals of the last two computed steps; in our benchmark "
                        "about 5 dB (1.4-6.6) higher PSNR than reuse at the same settings, for one more cached residual of GPU "
                        "memory (+52 MiB on a Flux-size model, tail mode). reuse: the residual of the last "
                        "computed step as is (classic First Block Cache)."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Boolean.Input(
                    "verbose",
                    default=False,
                    tooltip="Log the relative change and the decision of every model call (for tuning the threshold).",
                    advanced=True,
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with First Block Cache attached (the input model is unchanged).")
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        residual_diff_threshold: float = 0.1,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        max_consecutive_hits: int = DEFAULT_MAX_HITS,
        cache_mode: str = DEFAULT_MODE,
        verbose: bool = False,
        hit_residual: str = DEFAULT_HIT_RESIDUAL,
    ) -> io.NodeOutput:
        validate_settings(
            residual_diff_threshold, start_percent, end_percent, max_consecutive_hits, cache_mode, hit_residual
        )
        if residual_diff_threshold == 0 or max_consecutive_hits == 0:
            logger.info("First Block Cache is off (threshold 0 or max_consecutive_hits 0): model returned unchanged.")
            return io.NodeOutput(model)
        holder = FBCacheHolder(
            residual_diff_threshold,
            start_percent,
            end_percent,
            max_consecutive_hits,
            cache_mode,
            verbose,
            hit_residual=hit_residual,
        )
        holder.report_node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        return io.NodeOutput(apply_first_block_cache(model, holder))


NODES: list[type[io.ComfyNode]] = [FirstBlockCache]
