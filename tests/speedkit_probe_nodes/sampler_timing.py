"""``SpeedKitProbe_SamplerTiming``: where a tiled img2img / training step spends its time
inside the real server (diagnostic for benchmarks; never shipped with the pack).

Given the MODEL and VAE a checkpoint loader produced, it times, under the server's own
settings: ComfyUI's ``load_models_gpu`` as every sampler call repeats it, one
``comfy.sample.sample`` call on a tile latent (setup vs per-step time from the callback),
the same through ComfyUI's non-dynamic delegate fully loaded, VAE encode/decode of a tile,
and a forward+backward of the diffusion model at training size. Results go to the UI
output (``timing``) and the log.
"""

from __future__ import annotations

import cProfile
import io
import json
import logging
import pstats
import time

import torch

logger = logging.getLogger(__name__)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sample_timing(model, latent, steps: int, denoise: float, profile: bool = False) -> dict:
    import comfy.sample

    stamps: list[float] = []

    def callback(*_a) -> None:
        _sync()
        stamps.append(time.perf_counter())

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    prof = cProfile.Profile() if profile else None
    _sync()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    comfy.sample.sample(
        model,
        noise,
        steps,
        7.0,
        "euler",
        "normal",
        [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]],
        [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]],
        latent,
        denoise=denoise,
        callback=callback,
        disable_pbar=True,
        seed=0,
    )
    _sync()
    t1 = time.perf_counter()
    out = {"total_s": t1 - t0, "steps_run": len(stamps)}
    if len(stamps) >= 2:
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        out["per_step_s"] = per_step
        out["setup_s"] = stamps[0] - t0 - per_step
        out["teardown_s"] = t1 - stamps[-1]
    if prof:
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile_tottime"] = buf.getvalue()[-6000:]
    return out


class SamplerTiming:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node API
        return {"required": {"model": ("MODEL",), "vae": ("VAE",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, model, vae):
        import comfy.model_management as mm

        res: dict = {"dynamic": bool(getattr(model, "is_dynamic", lambda: False)())}
        tile = torch.zeros(1, 4, 72, 72)
        try:
            for name, m in (("input", model),):
                t = []
                for _ in range(3):
                    _sync()
                    t0 = time.perf_counter()
                    mm.load_models_gpu([m])
                    _sync()
                    t.append(time.perf_counter() - t0)
                res[f"{name}_load_models_gpu_s"] = t
                res[f"{name}_sample_b1_warm"] = _sample_timing(m, tile, 20, 0.3)
                res[f"{name}_sample_b1"] = _sample_timing(m, tile, 20, 0.3, profile=True)
                res[f"{name}_sample_b4"] = _sample_timing(m, tile.repeat(4, 1, 1, 1), 20, 0.3)
            if res["dynamic"]:
                t0 = time.perf_counter()
                delegate = model.get_non_dynamic_delegate()
                res["delegate_create_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                mm.load_models_gpu([delegate], force_full_load=True)
                _sync()
                res["delegate_load_s"] = time.perf_counter() - t0
                res["delegate_lowvram"] = bool(getattr(delegate.model, "model_lowvram", False))
                res["delegate_sample_b1_warm"] = _sample_timing(delegate, tile, 20, 0.3)
                res["delegate_sample_b1"] = _sample_timing(delegate, tile, 20, 0.3, profile=True)
                res["delegate_sample_b4"] = _sample_timing(delegate, tile.repeat(4, 1, 1, 1), 20, 0.3)
                train_models = (("input", model), ("delegate", delegate))
            else:
                train_models = (("input", model),)
            px = torch.rand(1, 576, 576, 3)
            for k in range(2):
                _sync()
                t0 = time.perf_counter()
                lat = vae.encode(px)
                _sync()
                t1 = time.perf_counter()
                vae.decode(lat)
                _sync()
                res[f"vae_encode_s_{k}"], res[f"vae_decode_s_{k}"] = t1 - t0, time.perf_counter() - t1
            for name, m in train_models:
                mm.load_models_gpu([m], force_full_load=True)
                unet = m.model.diffusion_model
                dtype = m.model.get_dtype_inference()
                dev = m.load_device
                times = []
                with torch.inference_mode(False), torch.enable_grad():
                    for _ in range(4):
                        x = torch.randn(1, 4, 128, 128, device=dev, dtype=dtype, requires_grad=True)
                        _sync()
                        t0 = time.perf_counter()
                        out = unet(
                            x,
                            torch.tensor([500.0], device=dev),
                            context=torch.zeros(1, 77, 2048, device=dev, dtype=dtype),
                            y=torch.zeros(1, 2816, device=dev, dtype=dtype),
                            transformer_options={},
                        )
                        out.float().square().mean().backward()
                        _sync()
                        times.append(time.perf_counter() - t0)
                res[f"{name}_fwd_bwd_1024_s"] = times
        except Exception as exc:  # noqa: BLE001 - a diagnostic reports what failed
            logger.exception("probe failed")
            res["error"] = f"{type(exc).__name__}: {exc}"
        logger.info(
            "SamplerTiming: %s",
            json.dumps({k: v for k, v in res.items() if "profile" not in str(v)[:0]}, default=str)[:20000],
        )
        return {"ui": {"timing": [json.dumps(res, default=str)]}}
