"""ComfyUI adapter for fbcache/: the ``SpeedKit_FirstBlockCache`` model patch node."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..fbcache import (
    CACHE_MODES,
    HIT_RESIDUALS,
    HOLDER_KEY,
    FBCacheHolder,
    clamp_blocks,
    conditioning_on_device,
    dit_diffusion_wrapper,
    make_block_replacement,
    measured_psnr,
    resolve_family,
    step_apply_model_wrapper,
    unet_diffusion_wrapper,
    unet_first_level,
    unet_input_block_patch,
    unet_output_block_patch,
    validate_settings,
    whole_step_apply_model_wrapper,
)
from . import comfy_bridge

logger = logging.getLogger(__name__)

WRAPPER_KEY = "speedkit_fbcache"
DEFAULT_MODE = "tail"  # benchmarks/fbcache_cost.py: same speed as per_block, 15x less extra memory
DEFAULT_MAX_HITS = 2  # bounded runs of hits: see docs/fbcache.md (quality vs speed)
DEFAULT_HIT_RESIDUAL = "extrapolate"  # kept for saved workflows; taylor1 measured faster with euler (docs/fbcache.md)
DEFAULT_MIN_STEPS = 8  # distilled/few-step schedules have no step to spare


def _send_ui_text(node_id: str | None, text: str) -> None:
    comfy_bridge.send_progress_text(text, node_id)


def _sampler_name(sampler) -> str:
    function = getattr(sampler, "sampler_function", None)
    return getattr(function, "__name__", type(sampler).__name__)


def outer_sample_wrapper(executor, *args, **kwargs):
    """``OUTER_SAMPLE``: a fresh holder per sampling run, the report and a reset at the end.

    ``outer_sample(noise, latent_image, sampler, sigmas, ...)``: the run's sigmas and sampler
    decide whether the cache runs (``min_steps``) and which calibrated plan applies.
    """
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    holder: FBCacheHolder = options[HOLDER_KEY].clone()
    holder.prepare(guider.model_patcher.model.model_sampling.percent_to_sigma)
    holder.cfg = float(getattr(guider, "cfg", 1.0) or 1.0)
    options[HOLDER_KEY] = holder
    noise = args[0] if args else kwargs.get("noise")
    sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    schedule = sigmas.detach().float().cpu().tolist() if hasattr(sigmas, "detach") else None  # one sync per run
    shape = tuple(noise.shape) if hasattr(noise, "shape") else ()
    mode = holder.begin_run(schedule, _sampler_name(sampler), shape)
    if mode != "off":
        logger.info(
            "First Block Cache on (%s): threshold %s, sigma window (%.4g, %.4g], max_consecutive_hits %s, mode %s",
            holder.description,
            "chosen by calibration" if mode == "calibrating" else f"{holder.threshold:.4g}",
            holder.end_sigma,
            holder.start_sigma,
            holder.max_consecutive_hits,
            holder.cache_mode,
        )
    finished = False
    try:
        out = executor(*args, **kwargs)
        finished = True
        return out
    finally:
        if finished and mode == "calibrating":
            holder.finish_calibration(holder.value_range)
        text = holder.summary_text()
        if mode != "off" and not holder.stats and not finished:
            # cancelled (or failed) before the model reached its first block: nothing to report
            text = f"First Block Cache ({holder.description}): the run stopped before its first step."
            logger.info(text)
        elif mode != "off" and not holder.stats:
            text = (
                f"First Block Cache was attached ({holder.description}) but its hooks never ran: this model did "
                "not call them, so nothing was cached. Please report the model type."
            )
            logger.warning(text)
        elif mode != "off":
            logger.info(text)
        _send_ui_text(holder.report_node_id, text)
        holder.reset()
        holder.active = False
        guider.model_options = original


def _note_value_range(guider, samples) -> None:
    """Calibration runs: the value range of the run's latent (model space), the quality estimate's peak."""
    options = getattr(guider, "model_options", None)
    holder = options.get("transformer_options", {}).get(HOLDER_KEY) if isinstance(options, dict) else None
    if isinstance(holder, FBCacheHolder) and holder.run_mode == "calibrating" and hasattr(samples, "amax"):
        holder.value_range = float(samples.amax() - samples.amin())  # one sync, calibration runs only


def _run_holder(guider) -> FBCacheHolder | None:
    """The holder of the sampling run (set on the guider's model options by ``outer_sample_wrapper``)."""
    options = getattr(guider, "model_options", None)
    holder = options.get("transformer_options", {}).get(HOLDER_KEY) if isinstance(options, dict) else None
    return holder if isinstance(holder, FBCacheHolder) else None


def _count_steps(holder: FBCacheHolder | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pass the sampler a callback that also tells ``holder`` each finished step (then a planned
    run decides its skips without waiting for the GPU, see FBCacheHolder.count_steps).

    ``sampler.sample(guider, sigmas, extra_args, callback, noise, ...)``: the callback is the third
    argument; ComfyUI calls it as ``callback(step, x0, x, total_steps)``.
    """
    if holder is None or not holder.active:
        return args, kwargs
    in_args = len(args) > 2
    if not in_args and "callback" not in kwargs:
        return args, kwargs  # a sampler of another signature: decisions keep waiting for the GPU
    callback = args[2] if in_args else kwargs["callback"]
    step_done = holder.count_steps()

    def counting_callback(*args, **kwargs):
        step = args[0] if args else kwargs.get("step")
        if isinstance(step, int):  # another sampler's own calling convention: no count, so no deciding ahead
            if len(args) >= 3:  # ComfyUI's callback(step, x0, x, total_steps): the step's prediction and latent
                step_done(step, args[1], args[2])
            else:
                step_done(step)
        if callback is not None:
            return callback(*args, **kwargs)
        return None

    if in_args:
        return (*args[:2], counting_callback, *args[3:]), kwargs
    return args, {**kwargs, "callback": counting_callback}


def _extra_args(args: tuple, kwargs: dict) -> dict | None:
    extra = args[1] if len(args) > 1 else kwargs.get("extra_args")
    return extra if isinstance(extra, dict) else None


def _with_extra_args(args: tuple, kwargs: dict, extra: dict) -> tuple[tuple, dict]:
    if len(args) > 1:
        return (args[0], extra, *args[2:]), kwargs
    return args, {**kwargs, "extra_args": extra}


def _snapshot(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The sampler's arguments with their own ``extra_args`` dict: some samplers (the CFG++ ones)
    replace its model options during the run, and a quality check run must start from the original."""
    extra = _extra_args(args, kwargs)
    return _with_extra_args(args, kwargs, dict(extra)) if extra is not None else (args, kwargs)


def _interrupted(exc: BaseException) -> bool:
    """The user's cancel (ComfyUI's interrupt exception), which must reach ComfyUI."""
    import comfy.model_management

    return isinstance(exc, comfy.model_management.InterruptProcessingException)


def _check_plan(executor, guider, args: tuple, kwargs: dict, reference) -> None:
    """Quality targets, calibration run: sample the same inputs with candidate plans and keep the
    fastest whose measured PSNR against this run holds (fbcache/quality_check.py).

    ``args``/``kwargs``: the sampler's arguments as the run got them. Each check run gets its own
    holder (planned by the candidate) through a copy of ``extra_args``' model options, and the
    user's callback (progress, previews, cancel). A check run that fails for another reason than a
    cancel is logged and the estimate decides; the calibration run's result is returned either way.
    """
    holder = _run_holder(guider)
    if holder is None or holder.run_mode != "calibrating" or holder.target_psnr <= 0 or not holder.check_quality:
        return
    extra = _extra_args(args, kwargs)
    options = extra.get("model_options") if extra is not None else None
    if not isinstance(options, dict):
        return  # a sampler of another signature: the estimate decides

    def measure(candidate) -> float | None:
        trial = holder.trial(candidate)
        trial_options = {
            **options,
            "transformer_options": {**options.get("transformer_options", {}), HOLDER_KEY: trial},
        }
        trial_args, trial_kwargs = _with_extra_args(args, kwargs, {**extra, "model_options": trial_options})
        trial_args, trial_kwargs = _count_steps(trial, trial_args, trial_kwargs)
        try:
            samples = executor(guider, *trial_args, **trial_kwargs)
            logger.info("First Block Cache: quality check run: %s", trial.summary_text())
            return measured_psnr(reference, samples, holder.value_range)
        except Exception as exc:
            if _interrupted(exc):
                raise
            logger.warning(
                "First Block Cache: a quality check run failed (%s: %s); the estimated PSNR decides.",
                type(exc).__name__,
                exc,
            )
            return None
        finally:
            trial.reset()

    holder.finish_calibration(holder.value_range, measure)


def sampler_sample_wrapper(executor, guider, *args, **kwargs):
    """``SAMPLER_SAMPLE``: the run's conditioning stays on the model's device (see
    fbcache/conditioning.py); a quality target's calibration run checks its plan here.

    Runs after ComfyUI built the run's own cond dicts, so the user's CONDITIONING is not touched;
    the guider gets them back when the sampler returns.
    """
    original_args, original_kwargs = _snapshot(args, kwargs)
    args, kwargs = _count_steps(_run_holder(guider), args, kwargs)
    original = getattr(guider, "conds", None)
    device = getattr(getattr(guider, "model_patcher", None), "load_device", None)
    keep_on_device = isinstance(original, dict) and device is not None  # else a guider of another shape
    if keep_on_device:
        guider.conds, moved = conditioning_on_device(original, device)
        if moved:
            logger.info(
                "First Block Cache: the conditioning (%.1f MiB) stays on %s for this run, so cached steps do not "
                "wait for a host-side copy.",
                moved / 2**20,
                device,
            )
    try:
        samples = executor(guider, *args, **kwargs)
        _note_value_range(guider, samples)
        _check_plan(executor, guider, original_args, original_kwargs, samples)
        return samples
    finally:
        if keep_on_device:
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
    holder.flow = _is_flow(model)

    if family.kind == "unet":
        _fit_unet_blocks(holder, diffusion_model, family.name)
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
        old = [p for p in patches.get("output_block_patch", []) if p is not unet_output_block_patch]
        patches["output_block_patch"] = [*old, unet_output_block_patch] if holder.n_last else old
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, unet_diffusion_wrapper)
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, whole_step_apply_model_wrapper)
        first = "first ResBlock" if holder.n_first == 1 else f"first {holder.n_first} ResBlocks"
        last = ", last output block computed" if holder.n_last else ""
        holder.description = f"{family.name}: {first}, tail residual{last}"
    elif family.kind == "dit":
        n_first, n_last, why = clamp_blocks(family.stacks, holder.n_first, holder.n_last)
        if why:
            logger.info("First Block Cache: %s: %s.", family.name, why)
        holder.n_first, holder.n_last = n_first, n_last
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
        layout = f", F{holder.n_first}B{holder.n_last}" if (holder.n_first, holder.n_last) != (1, 0) else ""
        holder.description = f"{family.name}: {blocks}, {holder.cache_mode} residuals{layout}"
    else:
        logger.warning("First Block Cache: %s.", family.reason)
        if (holder.n_first, holder.n_last) != (1, 0):
            logger.info("First Block Cache: n_first/n_last do not apply to whole-step skipping.")
        patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, step_apply_model_wrapper)
        holder.description = f"{family.name}: whole-step skip"
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample_wrapper)
    logger.info("First Block Cache attached to %s.", holder.description)
    return patched


def _is_flow(model) -> bool:
    """True for flow-matching models (ComfyUI's CONST model sampling: Flux, SD3, Wan, ...)."""
    sampling = getattr(getattr(model, "model", None), "model_sampling", None)
    return any(cls.__name__ == "CONST" for cls in type(sampling).__mro__)


def _fit_unet_blocks(holder: FBCacheHolder, unet, name: str) -> None:
    """Lower n_first/n_last to what a UNet allows (logged): the tail residual needs equal shapes."""
    limit = unet_first_level(unet)
    if holder.n_first > limit:
        logger.info(
            "First Block Cache: %s: n_first %d -> %d (the deciding blocks must stay before the first downsampling, "
            "where the tail residual keeps its shape).",
            name,
            holder.n_first,
            limit,
        )
        holder.n_first = limit
    if holder.n_last > 1:
        logger.info(
            "First Block Cache: %s: n_last %d -> 1 (a UNet's output blocks take the skip connections of the "
            "blocks before them; only the last one's comes from a block that always runs).",
            name,
            holder.n_last,
        )
        holder.n_last = 1


class FirstBlockCache(io.ComfyNode):
    """Skip the middle blocks of a sampling step when the first blocks' residual barely changed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SpeedKit_FirstBlockCache",
            display_name="First Block Cache (SpeedKit)",
            category="SpeedKit/model_patches",
            description=(
                "Speeds up sampling: every step runs the model's first block(s) and compares their residual with "
                "the one of the last fully computed step. When the relative change is below the threshold, the "
                "blocks after them are skipped and their residual is added back, reused or forecast from the last "
                "computed steps. A speed or quality target plans which steps to skip instead (the first run of "
                "each sampler/step count then computes every step). Runs under min_steps steps are not cached. "
                "Works on SD1.5/SDXL UNets and on Flux, Chroma, SD3, Wan, HunyuanVideo, LTXV and Qwen-Image; "
                "other models (e.g. Nunchaku) skip whole steps. On UNets, steps that use a ControlNet are always computed. Put it "
                "after LoRA loaders. The log and this node report steps computed/skipped."
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
                        "conditioning). -1 = unlimited, 0 = never skip. Bounded runs keep more quality at the "
                        "same speed (docs/fbcache.md); 3 suits taylor1."
                    ),
                    advanced=True,
                ),
                io.Combo.Input(
                    "cache_mode",
                    options=list(CACHE_MODES),
                    default=DEFAULT_MODE,
                    tooltip=(
                        "tail (default): one cached residual per block stack. per_block: every skipped block adds "
                        "its own residual (much more memory). Same result without ControlNet. With ControlNet a DiT "
                        "switches to per_block by itself; UNets always use tail."
                    ),
                    advanced=True,
                ),
                io.Boolean.Input(
                    "verbose",
                    default=False,
                    tooltip="Log the relative change and the decision of every model call (for tuning the threshold).",
                    advanced=True,
                ),
                io.Combo.Input(
                    "hit_residual",
                    options=list(HIT_RESIDUALS),
                    default=DEFAULT_HIT_RESIDUAL,
                    tooltip=(
                        "What a skipped step adds back for the skipped blocks. reuse: the residual of the last "
                        "computed step as is (classic First Block Cache). extrapolate (default): a straight line "
                        "along the noise schedule through the last two computed steps. taylor1 / taylor2: a Taylor "
                        "forecast in the step index from the last two / three computed steps (keeps one / two more "
                        "residuals in memory than reuse). fit1: a straight line fitted to the last three computed "
                        "steps (smoother; suits multistep samplers such as dpmpp_2m)."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Int.Input(
                    "n_first",
                    default=1,
                    min=1,
                    max=64,
                    tooltip=(
                        "Blocks computed at the start of every step; the change of their residual decides whether "
                        "the rest is skipped. 1 = classic First Block Cache. More = a better decision, a costlier "
                        "skipped step. UNets: at most the blocks before the first downsampling."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Int.Input(
                    "n_last",
                    default=0,
                    min=0,
                    max=64,
                    tooltip=(
                        "Blocks computed at the end of every step, also on skipped steps (they refine the "
                        "predicted state). 0 = none. UNets: at most 1 (the last output block)."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Int.Input(
                    "min_steps",
                    default=DEFAULT_MIN_STEPS,
                    min=0,
                    max=10000,
                    tooltip=(
                        "Sampling runs with fewer steps are not cached (distilled and few-step models have no "
                        "step to spare); the log says so. 0 = cache runs of any length."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Float.Input(
                    "target_speedup",
                    default=0.0,
                    min=0.0,
                    max=20.0,
                    step=0.1,
                    tooltip=(
                        "0 = use residual_diff_threshold. Otherwise the steps to skip are planned for this "
                        "speedup (counted in model calls): the first run of each sampler and step count computes "
                        "every step and records what the plan needs; later runs compute the planned steps. The "
                        "log and this node show the plan."
                    ),
                    optional=True,
                ),
                io.Float.Input(
                    "target_psnr",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    tooltip=(
                        "0 = off. Otherwise the steps are planned (as for target_speedup) so that the PSNR of the "
                        "result against an uncached run (latent space, peak = its value range) stays at or above "
                        "this many dB; check_quality measures the plan. With target_speedup too: that speed "
                        "unless it costs more quality than this."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Boolean.Input(
                    "decide_ahead",
                    default=True,
                    tooltip=(
                        "With a target: the planned run decides its skips without waiting for the GPU at every "
                        "step (faster). The check that computes a planned skip when a run strays far from the "
                        "calibration run then acts two model calls late. Off: every step waits for that check."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Boolean.Input(
                    "skip_whole_step",
                    default=False,
                    tooltip=(
                        "With a target and decide_ahead: a planned skip runs no block at all and forecasts the "
                        "model's whole prediction (hit_residual rule) instead of running the first blocks. Faster, "
                        "but nothing checks that a run stays close to the calibration run."
                    ),
                    optional=True,
                    advanced=True,
                ),
                io.Boolean.Input(
                    "check_quality",
                    default=True,
                    tooltip=(
                        "With target_psnr: the first run samples its own inputs again with the chosen plan (at "
                        "most 3 such runs) and keeps the fastest plan whose measured PSNR against that run holds "
                        "the target. Off: the estimate alone decides (a shorter first run)."
                    ),
                    optional=True,
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
        n_first: int = 1,
        n_last: int = 0,
        min_steps: int = DEFAULT_MIN_STEPS,
        target_speedup: float = 0.0,
        target_psnr: float = 0.0,
        decide_ahead: bool = True,
        skip_whole_step: bool = False,
        check_quality: bool = True,
    ) -> io.NodeOutput:
        validate_settings(
            residual_diff_threshold,
            start_percent,
            end_percent,
            max_consecutive_hits,
            cache_mode,
            hit_residual,
            n_first,
            n_last,
            min_steps,
            target_speedup,
            target_psnr,
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
            n_first=n_first,
            n_last=n_last,
            min_steps=min_steps,
            target_speedup=target_speedup,
            target_psnr=target_psnr,
            decide_ahead=decide_ahead,
            skip_whole_step=skip_whole_step,
            check_quality=check_quality,
        )
        holder.report_node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        return io.NodeOutput(apply_first_block_cache(model, holder))


NODES: list[type[io.ComfyNode]] = [FirstBlockCache]
