"""The three USDU nodes through the real ComfyUI API with a tiny random SD1.5 checkpoint.

The checkpoint is built from ComfyUI's own model classes (so its keys are what ComfyUI
expects and it is detected as SD1.5): a 2-level UNet with 320 channels and 768-wide
cross-attention (what SD1.5 detection requires), the SD VAE encoder with a slim decoder,
and the CLIP-L text encoder, all random, fp16. A random 2x Compact model is the upscale
model. Tiles are 64 px so a CPU run takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from tiny_models import build_models

from comfy_server import REPO_ROOT

pytestmark = pytest.mark.integration

CKPT = "usdu_tiny_sd15.safetensors"
UPSCALER = "usdu_tiny_compact_x2.safetensors"


@pytest.fixture(scope="session")
def usdu_models(comfy_server):
    build_models(
        comfy_server.root,
        comfy_server.models_dir / "checkpoints" / CKPT,
        comfy_server.models_dir / "upscale_models" / UPSCALER,
    )
    rng = np.random.default_rng(0)
    base = rng.random((10, 8, 3))
    img = np.kron(base, np.ones((8, 8, 1)))  # blocky 64x80 picture
    img = (0.15 + 0.7 * img) * 255  # washed-out range, as Nunchaku users see it
    Image.fromarray(img.round().astype(np.uint8)).save(comfy_server.input_dir / "usdu_input.png")
    return comfy_server


SHARED = {
    "seed": 7,
    "steps": 2,
    "cfg": 4.0,
    "sampler_name": "euler",
    "scheduler": "normal",
    "denoise": 0.5,
    "mode_type": "Chess",
    "tile_width": 64,
    "tile_height": 64,
    "mask_blur": 4,
    "tile_padding": 8,
    "seam_fix_mode": "None",
    "seam_fix_denoise": 0.3,
    "seam_fix_width": 16,
    "seam_fix_mask_blur": 4,
    "seam_fix_padding": 8,
    "force_uniform_tiles": True,
    "tiled_decode": False,
    "batch_size": 2,
    "normalize": "minmax",
    "tile_seed": "per tile",
}


def graph(node: str, extra: dict, prefix: str) -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a sharp photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "usdu_input.png"}},
        "5": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALER}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3, "denoise": 0.4},
        },
    }
    image_key = "upscaled_image" if node.endswith("NoUpscale") else "image"
    inputs = {
        image_key: ["4", 0],
        "model": ["1", 0],
        "positive": ["2", 0],
        "negative": ["3", 0],
        "vae": ["1", 2],
        **SHARED,
        **extra,
    }
    g["10"] = {"class_type": node, "inputs": inputs}
    g["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": prefix}}
    return g


def saved_image(server, entry: dict) -> np.ndarray:
    images = entry["outputs"]["11"]["images"]
    assert len(images) == 1
    path = server.output_dir / images[0].get("subfolder", "") / images[0]["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def test_nodes_are_registered_with_upstream_inputs(usdu_models):
    info = usdu_models.object_info()
    main = info["SpeedKit_UltimateSDUpscale"]
    assert main["category"] == "SpeedKit/upscaling"
    req = main["input"]["required"]
    assert req["upscale_by"][1]["default"] == 2.0 and req["upscale_by"][1]["max"] == 4.0
    assert req["tile_width"][1] == {**req["tile_width"][1], "default": 512, "min": 64, "max": 8192, "step": 8}
    assert req["denoise"][1]["default"] == 0.2 and req["seam_fix_denoise"][1]["default"] == 1.0
    assert req["mode_type"][0] == ["Linear", "Chess", "None"] or req["mode_type"][1]["options"] == [
        "Linear",
        "Chess",
        "None",
    ]
    order = main["input_order"]["required"]
    assert order[:6] == ["image", "model", "positive", "negative", "vae", "upscale_by"]
    assert order[-2:] == ["normalize", "tile_seed"]
    assert "cuda_graphs" in main["input"]["optional"]  # optional: prompts saved before it stay valid
    assert req["batch_size"][1]["default"] == 0 and req["batch_size"][1]["min"] == 0  # 0 = automatic
    custom = info["SpeedKit_UltimateSDUpscaleCustomSample"]["input"]
    assert {"upscale_model", "custom_sampler", "custom_sigmas"} <= set(custom["optional"])
    no_up = info["SpeedKit_UltimateSDUpscaleNoUpscale"]["input"]["required"]
    assert "upscaled_image" in no_up and "upscale_by" not in no_up and "upscale_model" not in no_up
    for node in ("SpeedKit_UltimateSDUpscale", "SpeedKit_UltimateSDUpscaleNoUpscale"):
        for name, spec in info[node]["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_main_node_upscales_and_redraws(usdu_models):
    entry = usdu_models.run_prompt(
        graph(
            "SpeedKit_UltimateSDUpscale",
            {"upscale_model": ["5", 0], "upscale_by": 1.5, "seam_fix_mode": "Half Tile + Intersections"},
            "usdu_main",
        )
    )
    out = saved_image(usdu_models, entry)
    assert out.shape == (120, 96, 3)
    assert out.std() > 0.01  # not a blank image


def test_automatic_batch_size_is_the_eager_batch_without_graphs(usdu_models):
    """batch_size 0 (the default): no CUDA graphs on the CPU, so 4 tiles per sampler call, the
    same picture as asking for 4."""
    start = len(usdu_models.log_text())
    auto = saved_image(
        usdu_models,
        usdu_models.run_prompt(graph("SpeedKit_UltimateSDUpscaleNoUpscale", {"batch_size": 0}, "usdu_auto")),
    )
    log = usdu_models.log_text()[start:]
    assert "batch_size automatic: 4 tile(s) per sampler call (eager calls, batching exact)" in log, log[-3000:]
    four = saved_image(
        usdu_models,
        usdu_models.run_prompt(graph("SpeedKit_UltimateSDUpscaleNoUpscale", {"batch_size": 4}, "usdu_four")),
    )
    assert np.array_equal(auto, four)


def test_no_upscale_node_keeps_size(usdu_models):
    extra = {"tiled_decode": True, "normalize": "percentile", "force_uniform_tiles": False}
    entry = usdu_models.run_prompt(graph("SpeedKit_UltimateSDUpscaleNoUpscale", extra, "usdu_noup"))
    assert saved_image(usdu_models, entry).shape == (80, 64, 3)


def test_custom_sample_node_with_and_without_upscale_model(usdu_models):
    extra = {"custom_sampler": ["6", 0], "custom_sigmas": ["7", 0], "upscale_by": 1.5}
    entry = usdu_models.run_prompt(graph("SpeedKit_UltimateSDUpscaleCustomSample", extra, "usdu_custom"))
    assert saved_image(usdu_models, entry).shape == (120, 96, 3)
    extra["upscale_model"] = ["5", 0]
    extra["seam_fix_mode"] = "Band Pass"
    entry = usdu_models.run_prompt(graph("SpeedKit_UltimateSDUpscaleCustomSample", extra, "usdu_custom_model"))
    assert saved_image(usdu_models, entry).shape == (120, 96, 3)


def test_zero_denoise_returns_the_normalized_upscale(usdu_models):
    extra = {"denoise": 0.0, "seam_fix_denoise": 0.0, "upscale_by": 1.0}
    entry = usdu_models.run_prompt(graph("SpeedKit_UltimateSDUpscaleCustomSample", extra, "usdu_identity"))
    out = saved_image(usdu_models, entry)
    src = np.asarray(Image.open(usdu_models.input_dir / "usdu_input.png").convert("RGB"), dtype=np.float32) / 255
    expected = (src - src.min()) / (src.max() - src.min())
    assert np.abs(out - expected).max() <= 1.0 / 255 + 1e-6


def execution_error(server, prompt: dict, timeout: float = 300) -> dict:
    """Queue ``prompt`` and return its ``execution_error`` message (fails if it succeeds)."""
    prompt_id = server.post("/prompt", {"prompt": prompt, "client_id": "usdu-tests"})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            assert status.get("status_str") == "error", "the prompt succeeded"
            return next(m[1] for m in status["messages"] if m[0] == "execution_error")
        time.sleep(0.25)
    raise TimeoutError(prompt_id)


def test_tile_larger_than_image_is_a_clear_error(usdu_models):
    err = execution_error(
        usdu_models, graph("SpeedKit_UltimateSDUpscaleNoUpscale", {"tile_width": 512, "tile_height": 512}, "usdu_bad")
    )
    assert err["exception_type"].endswith("ValueError")
    assert "tile_width x tile_height" in err["exception_message"] and "<= 64" in err["exception_message"]


def sigmas_graph(sigma_nodes: dict, sigmas: list, prefix: str, **extra) -> dict:
    """A CustomSample graph whose custom_sigmas come from ``sigma_nodes`` (ids 20+)."""
    g = graph(
        "SpeedKit_UltimateSDUpscaleCustomSample",
        {"custom_sampler": ["6", 0], "custom_sigmas": sigmas, "upscale_by": 1.0, **extra},
        prefix,
    )
    g.update(sigma_nodes)
    return g


BAD_INPUTS = {
    # FlipSigmas turns the schedule upside down: increasing sigmas (used to give a black image)
    "increasing sigmas": (
        sigmas_graph({"20": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["7", 0]}}}, ["20", 0], "usdu_flip"),
        "custom_sigmas: sigma 1 (",
        "sigmas must decrease",
    ),
    # BasicScheduler with denoise 0 returns an empty schedule
    "empty sigmas": (
        sigmas_graph(
            {
                "20": {
                    "class_type": "BasicScheduler",
                    "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3, "denoise": 0.0},
                }
            },
            ["20", 0],
            "usdu_empty_sigmas",
        ),
        "custom_sigmas: the schedule is empty",
        "BasicScheduler",
    ),
    # NaN goes through the API's JSON and ComfyUI's min/max validation (NaN compares false)
    "NaN upscale_by": (
        graph("SpeedKit_UltimateSDUpscale", {"upscale_model": ["5", 0], "upscale_by": float("nan")}, "usdu_nan_up"),
        "upscale_by: nan is not a finite number",
        "between 0.05 and 4",
    ),
    "NaN cfg": (
        graph("SpeedKit_UltimateSDUpscaleNoUpscale", {"cfg": float("nan")}, "usdu_nan_cfg"),
        "cfg: nan is not a finite number",
        "guidance scale",
    ),
    "NaN denoise": (
        graph("SpeedKit_UltimateSDUpscaleNoUpscale", {"denoise": float("nan")}, "usdu_nan_denoise"),
        "denoise: nan is not a finite number",
        "between 0 (no change) and 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_through_the_api_are_clear_errors(usdu_models, case):
    prompt, start, fix = BAD_INPUTS[case]
    err = execution_error(usdu_models, prompt)
    assert err["exception_type"].endswith("ValueError"), err
    assert err["exception_message"].startswith(start) and fix in err["exception_message"], err["exception_message"]
    assert not list(usdu_models.output_dir.glob(prompt["11"]["inputs"]["filename_prefix"] + "*"))


def test_single_sigma_redraws_nothing(usdu_models):
    """SplitSigmas at the last step leaves one sigma (0 steps): the output is the normalized
    image, not the picture with the first sigma's noise left in (what the sampler returns)."""
    split = {"20": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["7", 0], "step": 3}}}
    entry = usdu_models.run_prompt(sigmas_graph(split, ["20", 1], "usdu_one_sigma", seam_fix_mode="Half Tile"))
    out = saved_image(usdu_models, entry)
    src = np.asarray(Image.open(usdu_models.input_dir / "usdu_input.png").convert("RGB"), dtype=np.float32) / 255
    expected = (src - src.min()) / (src.max() - src.min())
    assert np.abs(out - expected).max() <= 1.0 / 255 + 1e-6


def test_cancel_mid_run_returns_no_image(usdu_models):
    extra = {"steps": 500, "batch_size": 1, "tile_seed": "same", "seed": 11}
    prompt = graph("SpeedKit_UltimateSDUpscaleNoUpscale", extra, "usdu_cancelled")
    errors: list[Exception] = []

    def run():
        try:
            usdu_models.run_prompt(prompt, timeout=300)
        except Exception as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 120
    while not usdu_models.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # inside the node by now: loading the tiny checkpoint takes well under that
    # POST /interrupt answers with an empty body, so not through ComfyServer.post (which parses JSON)
    req = urllib.request.Request(
        usdu_models.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(req, timeout=30).read()
    t.join(300)
    assert errors, "the interrupted prompt reported success"
    assert not list(usdu_models.output_dir.glob("usdu_cancelled*"))


ISOLATION_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, types
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`, see the integration notes)
    import torch
    import comfy.sd
    import nodes

    assert asyncio.run(nodes.load_custom_node(sys.argv[1]))
    node = nodes.NODE_CLASS_MAPPINGS["SpeedKit_UltimateSDUpscaleNoUpscale"]
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2])[:4]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    kw = dict(upscaled_image=torch.rand(1, 64, 128, 3), model=model, positive=pos, negative=neg, vae=vae,
              seed=1, steps=1, cfg=2.0, sampler_name="euler", scheduler="normal", denoise=0.3, mode_type="Linear",
              tile_width=64, tile_height=64, mask_blur=4, tile_padding=8, seam_fix_mode="Half Tile",
              seam_fix_denoise=0.2, seam_fix_width=16, seam_fix_mask_blur=4, seam_fix_padding=8,
              force_uniform_tiles=True, tiled_decode=False, batch_size=2, normalize="minmax", tile_seed="same")
    run = lambda: node.PREPARE_CLASS_CLONE({"hidden_inputs": {}}).execute(**kw)
    run()  # warm-up: lazy imports of ComfyUI's own sampling modules happen here

    # Another extension's A1111-style package, with a singleton holding data.
    modules = types.ModuleType("modules")
    modules.__path__ = []
    shared = types.ModuleType("modules.shared")
    payload = {"k": [1, 2, 3]}
    shared.batch = payload
    shared.sd_upscalers = ["theirs"]
    modules.shared = shared
    sys.modules["modules"] = modules
    sys.modules["modules.shared"] = shared
    before = set(sys.modules)
    path_before = list(sys.path)

    out = run()
    after = set(sys.modules)
    result = {
        "shape": list(out.args[0].shape),
        "added": sorted(after - before),
        "removed": sorted(before - after),
        "same_modules": sys.modules["modules"] is modules,
        "same_shared": sys.modules["modules.shared"] is shared and modules.shared is shared,
        "data": shared.batch is payload and payload == {"k": [1, 2, 3]} and shared.sd_upscalers == ["theirs"],
        "attrs": sorted(a for a in vars(shared) if not a.startswith("__")),
        "sys_path_same": sys.path == path_before,
    }
    # A wrapper-style diffusion model (what Nunchaku installs): an nn.Module that is not a
    # UNet and ignores transformer_options patches. The node must only go through comfy.sample.
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.dtype = inner.dtype  # ComfyUI's BaseModel asks its diffusion model for this
            self.calls = 0

        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **extra):
            self.calls += 1
            return self.inner(x, timesteps, context=context, y=y, transformer_options=transformer_options)

    wrapper = Wrapper(model.model.diffusion_model)
    wrapped = model.clone()
    wrapped.add_object_patch("diffusion_model", wrapper)
    out_w = node.PREPARE_CLASS_CLONE({"hidden_inputs": {}}).execute(**dict(kw, model=wrapped)).args[0]
    result["wrapper_calls"] = wrapper.calls
    result["wrapper_shape"] = list(out_w.shape)
    result["wrapper_finite"] = bool(torch.isfinite(out_w).all())
    # Bad input through the real node: conditioning batch 3 for an image batch of 2, no VAE.
    bad = dict(kw, upscaled_image=torch.rand(2, 64, 128, 3), positive=[[pos[0][0].repeat(3, 1, 1), pos[0][1]]])
    try:
        node.PREPARE_CLASS_CLONE({"hidden_inputs": {}}).execute(**bad)
        result["batch_error"] = None
    except ValueError as exc:
        result["batch_error"] = str(exc)
    try:
        node.PREPARE_CLASS_CLONE({"hidden_inputs": {}}).execute(**dict(kw, vae=None))
        result["vae_error"] = None
    except ValueError as exc:
        result["vae_error"] = str(exc)
    print("RESULT" + json.dumps(result))
    """
)


def test_isolation_wrapper_model_and_bad_input_in_process(usdu_models, tmp_path):
    """Run the node in a ComfyUI process where another extension owns ``modules.shared``."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    pack = tmp_path / "ComfyUI-SpeedKit"
    pack.symlink_to(REPO_ROOT, target_is_directory=True)
    proc = subprocess.run(
        [python, "-c", ISOLATION_SCRIPT, str(pack), str(usdu_models.models_dir / "checkpoints" / CKPT)],
        cwd=usdu_models.root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT") :])
    assert result["shape"] == [1, 64, 128, 3]
    assert result["added"] == [] and result["removed"] == []
    assert result["same_modules"] and result["same_shared"] and result["data"]
    assert result["attrs"] == ["batch", "sd_upscalers"]
    assert result["sys_path_same"]
    assert result["wrapper_calls"] > 0 and result["wrapper_shape"] == [1, 64, 128, 3] and result["wrapper_finite"]
    assert "positive: conditioning 0 has batch 3 but the image batch is 2" in result["batch_error"]
    assert result["vae_error"].startswith("vae: no VAE connected")


SDXL_BATCH_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`, see the integration notes)
    import torch
    import comfy.model_patcher, comfy.sd, comfy.supported_models
    import nodes

    assert asyncio.run(nodes.load_custom_node(sys.argv[1]))
    node = nodes.NODE_CLASS_MAPPINGS["SpeedKit_UltimateSDUpscaleNoUpscale"]
    vae = comfy.sd.load_checkpoint_guess_config(sys.argv[2])[2]

    # A tiny SDXL-shaped UNet built by ComfyUI's own SDXL model class, so the conditioning
    # encoder is the real one (pooled prompt + six size/crop embeddings -> `y`, 2816 wide).
    unet_config = dict(
        comfy.supported_models.SDXL.unet_config, model_channels=32, transformer_depth=[0, 1],
        transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=0, channel_mult=[1, 2],
        num_res_blocks=[1, 1], context_dim=64, in_channels=4, out_channels=4, image_size=32,
        use_spatial_transformer=True, legacy=False, num_head_channels=16, num_classes="sequential",
    )
    base = comfy.supported_models.SDXL(unet_config).get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.diffusion_model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            else:  # norms pass their input, biases are 0
                p.copy_(torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape))
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    # A model-level patch of the DiffSynth / Z-Image kind (lives in transformer_options, not
    # in the conditioning; the UNet ignores it): it must reach the model untouched.
    class ModelPatch:
        pass

    model_patch = ModelPatch()
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.dtype = m.dtype

        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kw):
            patches = transformer_options.get("patches", {}).get("double_block", [])
            seen.append((y.detach().clone(), any(p is model_patch for p in patches)))
            return self.m(x, timesteps, context=context, y=y, control=control,
                          transformer_options=transformer_options, **kw)

    spied = model.clone()
    spied.add_object_patch("diffusion_model", Spy(base.diffusion_model))
    spied.set_model_double_block_patch(model_patch)
    options_before = repr(spied.model_options)

    def cond(seed):
        g = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]

    # 128x96 in 64x48 tiles, no padding and no feather: the four crops do not overlap, so
    # sampling them together must give what sampling them one by one gives.
    kw = dict(upscaled_image=torch.rand(1, 96, 128, 3, generator=gen), model=spied, positive=cond(1),
              negative=cond(2), vae=vae, seed=3, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal",
              denoise=0.5, mode_type="Linear", tile_width=64, tile_height=48, mask_blur=0, tile_padding=0,
              seam_fix_mode="None", seam_fix_denoise=0.0, seam_fix_width=16, seam_fix_mask_blur=4,
              seam_fix_padding=8, force_uniform_tiles=True, tiled_decode=False, batch_size=1,
              normalize="off", tile_seed="per tile")
    run = lambda **k: node.PREPARE_CLASS_CLONE({"hidden_inputs": {}}).execute(**dict(kw, **k)).args[0]
    one = run(batch_size=1)
    calls_one = list(seen)
    seen.clear()
    many = run(batch_size=4)
    calls_many = list(seen)
    # One by one: 4 tiles x 2 steps, each call = [positive, negative] rows (batch 1 each).
    # Batched: 2 calls of 8 rows = positive rows of tiles 0..3, then negative rows of tiles 0..3.
    alone = [calls_one[2 * k][0] for k in range(4)]
    rows = calls_many[0][0]
    result = {
        "calls": [len(calls_one), len(calls_many)],
        "rows": list(rows.shape),
        "rows_match": all(torch.equal(rows[half * 4 + k], alone[k][half]) for half in (0, 1) for k in range(4)),
        "tiles_differ": len({tuple(a[0, 1280:].tolist()) for a in alone}),
        "max_diff": float((one - many).detach().abs().max()),
        "patch_seen": all(flag for _, flag in calls_one + calls_many),
        "options_same": repr(spied.model_options) == options_before,
    }
    # An area prompt over the top half: tiles 0 and 1 (top row) get the whole-tile area,
    # tiles 2 and 3 lose it, so the batch of 4 is sampled as two calls of 2.
    area = cond(4)
    area[0][1].update(area=(6, 16, 0, 0), strength=1.0)
    seen.clear()
    area_one = run(batch_size=1, positive=cond(1) + area)
    calls_area_one = len(seen)
    seen.clear()
    area_many = run(batch_size=4, positive=cond(1) + area)
    result["area_calls"] = [calls_area_one, len(seen)]
    result["area_max_diff"] = float((area_one - area_many).detach().abs().max())
    result["area_effect"] = float((area_one - one).detach().abs().max())
    print("RESULT" + json.dumps(result))
    """
)


def test_sdxl_tile_batch_gives_each_tile_its_own_crop_conditioning(usdu_models, tmp_path):
    """batch_size 4 on a tiny SDXL model: each sample's `y` (pooled + size/crop embeddings)
    is bit-identical to the one that tile gets when sampled alone, and the picture matches;
    with an area prompt the batch is split where the area crops differently and still
    matches; a model-level patch in transformer_options reaches the model unchanged."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    pack = tmp_path / "ComfyUI-SpeedKit"
    pack.symlink_to(REPO_ROOT, target_is_directory=True)
    proc = subprocess.run(
        [python, "-c", SDXL_BATCH_SCRIPT, str(pack), str(usdu_models.models_dir / "checkpoints" / CKPT)],
        cwd=usdu_models.root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT") :])
    assert result["calls"] == [8, 2] and result["rows"] == [8, 2816]
    assert result["tiles_differ"] == 4  # four crops, four different size/crop vectors
    assert result["rows_match"]
    assert result["max_diff"] < 1e-4  # tile 0's crop for all four: 0.56 (checked by hand)
    assert result["patch_seen"] and result["options_same"]
    # area prompt: split into the runs where it crops alike, still what one by one gives
    assert result["area_calls"] == [8, 4]
    assert result["area_effect"] > 0.05  # the area prompt does change the picture
    assert result["area_max_diff"] < 1e-4


RESIDENCY_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`, see the integration notes)
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import nodes

    assert asyncio.run(nodes.load_custom_node(sys.argv[1]))
    residency = next(m for n, m in list(sys.modules.items()) if n.endswith(".nodes.residency"))
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(64, 64), load_device=cpu, offload_device=cpu)
    result = {"blocker": residency.residency_blocker(patcher, 0)}
    with residency.full_residency(patcher, "test") as used:
        result["plain_model_used_as_is"] = used is patcher
    mm.load_models_gpu([patcher], force_full_load=True)
    result["loaded"] = [patcher.loaded_size() > 0, any(p is patcher for p in mm.loaded_models())]
    # Still referenced here, so _release must find it in ComfyUI's loaded list and detach it.
    residency._release(patcher)
    result["released"] = patcher.loaded_size()
    print("RESULT" + json.dumps(result))
    """
)


def test_residency_release_finds_the_model_in_comfyui_loaded_list(usdu_models, tmp_path):
    """nodes/residency.py reads ComfyUI's ``current_loaded_models`` (``LoadedModel.model``) to
    move a still-referenced resident copy off the GPU, and refuses non-dynamic models: both
    checked against the real model management on the CPU (the full-residency path itself
    needs CUDA and is covered by tests/gpu_server/test_graph_paths_in_server.py)."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    pack = tmp_path / "ComfyUI-SpeedKit"
    pack.symlink_to(REPO_ROOT, target_is_directory=True)
    proc = subprocess.run(
        [python, "-c", RESIDENCY_SCRIPT, str(pack)],
        cwd=usdu_models.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT") :])
    assert result["blocker"] == "the model is not streamed by the dynamic VRAM manager"
    assert result["plain_model_used_as_is"]
    assert result["loaded"] == [True, True]
    assert result["released"] == 0


ADAPTER_INTERNALS_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`, see the integration notes)
    import torch
    import comfy.controlnet
    import comfy.model_patcher
    import comfy.patcher_extension as pe
    import nodes

    assert asyncio.run(nodes.load_custom_node(sys.argv[1]))
    pack = next(n[: -len(".nodes.usdu")] for n in list(sys.modules) if n.endswith(".nodes.usdu"))
    cond = sys.modules[pack + ".usdu.cond"]
    planner = sys.modules[pack + ".usdu.planner"]
    wrappers = sys.modules[pack + ".nodes.usdu_wrappers"]
    result = {}

    # ControlNet chain (ComfyUI's own class): hints cut to each tile, originals untouched.
    cpu = torch.device("cpu")
    first = comfy.controlnet.ControlNet(torch.nn.Linear(2, 2), load_device=cpu)
    first.set_cond_hint(torch.rand(1, 3, 96, 128), 0.8)
    second = comfy.controlnet.ControlNet(torch.nn.Linear(2, 2), load_device=cpu)
    second.set_cond_hint(torch.rand(1, 3, 96, 128), 0.5)
    second.set_previous_controlnet(first)
    positive = [[torch.zeros(1, 77, 8), {"control": second}]]
    geoms = [cond.TileGeometry(planner.Box(x, 0, x + 64, 48), 128, 96, 64, 48, 64, 48) for x in (0, 64)]
    (entry,) = cond.crop_conditioning(positive, geoms, 1)
    top = entry[1]["control"]
    result["types"] = [type(top).__name__, type(top.previous_controlnet).__name__]
    result["copied"] = top is not second and top.previous_controlnet is not first
    result["hints"] = [list(top.cond_hint_original.shape), list(top.previous_controlnet.cond_hint_original.shape)]
    result["strength"] = [top.strength, top.previous_controlnet.strength]
    result["originals"] = [list(second.cond_hint_original.shape), second.previous_controlnet is first]

    # What the CUDA-graph check reads from a real ModelPatcher's model_options (no CUDA call).
    cuda = torch.device("cuda")
    model = comfy.model_patcher.ModelPatcher(torch.nn.Linear(4, 4), load_device=cpu, offload_device=cpu)
    blocked = {"plain": wrappers.graph_blocker(model, cuda)}
    m = model.clone()
    m.set_model_attn1_patch(lambda *a: a)
    blocked["patch"] = wrappers.graph_blocker(m, cuda)
    m = model.clone()
    m.set_model_attn2_replace(lambda *a: a, "input", 1)
    blocked["replace"] = wrappers.graph_blocker(m, cuda)
    m = model.clone()
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "other", lambda e, *a, **k: e(*a, **k),
                            m.model_options, is_model_options=True)
    blocked["wrapper"] = wrappers.graph_blocker(m, cuda)
    m = model.clone()
    m.set_model_unet_function_wrapper(lambda f, p: f(p["input"], p["timestep"], **p["c"]))
    blocked["function_wrapper"] = wrappers.graph_blocker(m, cuda)
    result["blocked"] = blocked

    # Which layers count as ComfyUI's own (the only ones recorded under cudaMallocAsync).
    import comfy.ops
    holder = torch.nn.Module()
    holder.diffusion_model = torch.nn.Sequential(comfy.ops.disable_weight_init.Linear(4, 4), torch.nn.SiLU())
    unet = comfy.model_patcher.ModelPatcher(holder, load_device=cpu, offload_device=cpu)

    class Quantized(torch.nn.Linear):  # another extension's layer
        pass

    patched = unet.clone()
    patched.add_object_patch("diffusion_model.0", Quantized(4, 4))
    result["foreign"] = [wrappers.foreign_layer(unet), wrappers.foreign_layer(patched)]
    # ComfyUI leaves the last loaded clone's object patch applied to the shared module tree: the
    # plain clone still runs its own layers, the patched one still runs the other extension's
    patched.patch_model()
    applied = type(holder.diffusion_model[0]).__name__
    result["foreign_applied"] = [applied, wrappers.foreign_layer(unet), wrappers.foreign_layer(patched)]
    patched.unpatch_model()
    result["foreign_unpatched"] = [type(holder.diffusion_model[0]).__name__, wrappers.foreign_layer(unet)]
    whole = unet.clone()  # a wrapper put in place of the whole diffusion model
    whole.add_object_patch("diffusion_model", torch.nn.Sequential(Quantized(4, 4)))
    result["foreign_whole"] = wrappers.foreign_layer(whole)
    print("RESULT" + json.dumps(result))
    """
)


def test_comfyui_objects_the_usdu_adapter_reads(usdu_models, tmp_path):
    """The ComfyUI internals USDU reads without a public API, checked against the real classes:
    ControlNet chains (``copy``, ``cond_hint_original``, ``previous_controlnet``,
    ``set_previous_controlnet``) are cropped per tile, and the CUDA-graph check finds patches,
    block replacements, wrappers and a unet function wrapper where ComfyUI stores them."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    pack = tmp_path / "ComfyUI-SpeedKit"
    pack.symlink_to(REPO_ROOT, target_is_directory=True)
    proc = subprocess.run(
        [python, "-c", ADAPTER_INTERNALS_SCRIPT, str(pack)],
        cwd=usdu_models.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT") :])
    assert result["types"] == ["ControlNet", "ControlNet"] and result["copied"]
    assert result["hints"] == [[2, 3, 48, 64], [2, 3, 48, 64]]  # one crop per tile, stacked
    assert result["strength"] == [0.5, 0.8]
    assert result["originals"] == [[1, 3, 96, 128], True]
    blocked = result["blocked"]
    assert blocked["plain"] is None
    assert blocked["patch"].startswith("the model carries patches")
    assert blocked["replace"].startswith("the model carries patches_replace")
    assert blocked["wrapper"] == "the model carries wrappers from another node"
    assert blocked["function_wrapper"] == "the model carries a model_function_wrapper"
    assert result["foreign"] == [None, "Quantized from __main__"]
    assert result["foreign_applied"] == ["Quantized", None, "Quantized from __main__"]
    assert result["foreign_unpatched"] == ["Linear", None]
    assert result["foreign_whole"] == "Quantized from __main__"
