"""Small diffusion models trained on procedural scenes, for First Block Cache quality benchmarks (CPU).

Two toys built from ComfyUI's own classes (so the cache hooks the same code paths as on real
checkpoints) and trained for a fixed number of steps on the fly:

- ``unet``: ComfyUI's ``UNetModel`` with SDXL's topology (conv-in, ResBlocks, transformer levels,
  ADM ``y``) and SDXL's discrete eps schedule, 4-channel 16x16 "latents";
- ``dit``: ComfyUI's ``WanModel`` (Wan 2.1 text-to-video: one stack of self-attention,
  cross-attention and MLP blocks with adaLN modulation, 3-D RoPE) with a flow-matching
  schedule of shift 3 (Wan's 8 is for hundreds of thousands of tokens; SD3 uses 3 for 1024x1024
  images), 16-channel 1x16x16 latents (the 4 rendered channels, each repeated with
  fixed sign flips: values stay in [-1, 1]). Wan rather than Flux because ComfyUI's Flux blocks
  add into their input tensors in place, which autograd cannot train through.

The data are coloured shapes (circle, square, ring) on gradient backgrounds, conditioned on
shape, colour, position and size through 4 cross-attention tokens and a pooled vector, with
10 % condition dropout so classifier-free guidance works. Training is deterministic (fixed
seeds and step count), so a saved model can be reproduced.

Needs ComfyUI importable (``PYTHONPATH=$COMFYUI_ROOT``); only the benchmark scripts import this.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger("fbcache_toys")

SIZE = 16
CTX = 64
POOLED = 32
TOKENS = 4
PALETTE = torch.tensor(
    [
        [1.0, -1.0, -1.0, 0.5],
        [-1.0, 1.0, -1.0, -0.5],
        [-1.0, -1.0, 1.0, 0.0],
        [1.0, 1.0, -1.0, 1.0],
        [1.0, -1.0, 1.0, -1.0],
        [-1.0, 1.0, 1.0, 0.3],
        [0.9, 0.9, 0.9, -0.8],
        [-0.9, -0.9, -0.9, 0.8],
    ]
)
SHAPES = 3
DIT_SHIFT = 3.0
DIT_SIGNS = torch.tensor([1.0, -1.0, 1.0, -1.0])
"""The DiT's 16 channels: the 4 scene channels times each of these signs (block-wise)."""


def unet_config() -> dict:
    """SDXL topology, small: 3 levels (16, 8, 4 px), transformers at levels 1-2 and the middle."""
    return {
        "use_checkpoint": False,
        "image_size": SIZE,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 0, 1, 1, 1, 1],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": CTX,
        "num_head_channels": 32,
        "num_heads": -1,
        "adm_in_channels": POOLED + 1536,
        "num_classes": "sequential",
        "use_linear_in_transformer": True,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
        "dtype": torch.float32,
    }


def dit_config() -> dict:
    """Wan 2.1 topology, small: 10 blocks, hidden 96, 3 heads."""
    return {
        "image_model": "wan2.1",
        "model_type": "t2v",
        "patch_size": (1, 2, 2),
        "in_dim": 16,
        "dim": 96,
        "ffn_dim": 384,
        "freq_dim": 64,
        "text_dim": CTX,
        "out_dim": 16,
        "num_heads": 3,
        "num_layers": 10,
        "dtype": torch.float32,
    }


class Scenes:
    """Procedural conditioned images and their fixed (random, untrained) condition embeddings."""

    def __init__(self, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.shape_emb = torch.randn(SHAPES, CTX, generator=g)
        self.color_emb = torch.randn(len(PALETTE), CTX, generator=g)
        self.pos_proj = torch.randn(8, CTX, generator=g) / 2
        self.size_proj = torch.randn(4, CTX, generator=g) / 1.4
        self.pool_proj = torch.randn(TOKENS * CTX, POOLED, generator=g) / math.sqrt(TOKENS * CTX)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
        self.yy, self.xx = yy, xx

    def attributes(self, n: int, g: torch.Generator) -> dict:
        return {
            "shape": torch.randint(0, SHAPES, (n,), generator=g),
            "color": torch.randint(0, len(PALETTE), (n,), generator=g),
            "cx": torch.rand(n, generator=g) * 0.5 + 0.25,
            "cy": torch.rand(n, generator=g) * 0.5 + 0.25,
            "r": torch.rand(n, generator=g) * 0.12 + 0.16,
        }

    def render(self, a: dict, g: torch.Generator) -> torch.Tensor:
        """[n, 4, SIZE, SIZE] in [-1, 1]."""
        n = a["shape"].shape[0]
        c1 = torch.rand(n, 4, generator=g) * 1.2 - 0.6
        c2 = torch.rand(n, 4, generator=g) * 1.2 - 0.6
        ang = torch.rand(n, generator=g) * 2 * math.pi
        t = (self.xx[None] - 0.5) * torch.cos(ang)[:, None, None] + (self.yy[None] - 0.5) * torch.sin(ang)[
            :, None, None
        ]
        t = (t + 0.71) / 1.42
        bg = c1[:, :, None, None] * (1 - t[:, None]) + c2[:, :, None, None] * t[:, None]
        cx, cy, r = a["cx"][:, None, None], a["cy"][:, None, None], a["r"][:, None, None]
        dist_c = torch.sqrt((self.xx[None] - cx) ** 2 + (self.yy[None] - cy) ** 2)
        dist_s = torch.maximum((self.xx[None] - cx).abs(), (self.yy[None] - cy).abs())
        shape = a["shape"][:, None, None]
        sharp = 4.0 * SIZE
        circle = torch.sigmoid((r - dist_c) * sharp)
        square = torch.sigmoid((r - dist_s) * sharp)
        ring = circle * torch.sigmoid((dist_c - 0.5 * r) * sharp)
        mask = torch.where(shape == 0, circle, torch.where(shape == 1, square, ring))
        fg = PALETTE[a["color"]][:, :, None, None]
        return (bg * (1 - mask[:, None]) + fg * mask[:, None]).clamp(-1, 1)

    def condition(self, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [n, TOKENS, CTX], pooled [n, POOLED])."""
        pos = torch.stack([a["cx"], a["cy"]], 1)
        feats = torch.cat(
            [torch.sin(pos * k * math.pi) for k in (1, 2)] + [torch.cos(pos * k * math.pi) for k in (1, 2)], 1
        )
        size = a["r"][:, None] * torch.tensor([1.0, 4.0, 8.0, 16.0])
        tokens = torch.stack(
            [
                self.shape_emb[a["shape"]],
                self.color_emb[a["color"]],
                feats @ self.pos_proj,
                torch.sin(size) @ self.size_proj,
            ],
            1,
        )
        return tokens, tokens.flatten(1) @ self.pool_proj


def to_model_channels(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Scene images in the toy's latent channels (the DiT's 16 = 4 sign-flipped copies)."""
    if kind == "unet":
        return x
    return torch.cat([x * s for s in DIT_SIGNS.tolist()], 1)[:, :, None]  # [n, 16, 1 frame, H, W]


def build(kind: str, seed: int = 0):
    """A ComfyUI BaseModel of ``kind`` ("unet" or "dit") with initialised weights (not trained)."""
    import comfy.supported_models as sm
    import fbcache_models as fm

    mc = sm.SDXL(unet_config()) if kind == "unet" else sm.WAN21_T2V(dit_config())
    if kind == "dit":
        mc.sampling_settings = {**mc.sampling_settings, "shift": DIT_SHIFT}
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "", device=torch.device("cpu"))
    fm.init_weights(model.diffusion_model, std=0.02, seed=seed)
    return model


def _y(model, kind: str, pooled: torch.Tensor) -> torch.Tensor:
    if kind == "dit":
        return pooled
    adm = model.encode_adm(pooled_output=torch.zeros(1, POOLED), width=SIZE * 8, height=SIZE * 8)[:, POOLED:]
    return torch.cat([pooled, adm.expand(pooled.shape[0], -1)], 1)


LEARNING_RATES = {"unet": 2e-3, "dit": 1e-3}


def train(model, kind: str, scenes: Scenes, steps: int, batch: int, lr: float | None = None) -> dict:
    """Train ``model`` in place: eps objective on the SDXL schedule (unet) or flow matching (dit)."""
    import comfy.model_management as mm

    training_before = mm.in_training
    mm.in_training = True  # ComfyUI's own switch: differentiable RoPE for the DiT while training
    try:
        return _train(model, kind, scenes, steps, batch, lr or LEARNING_RATES[kind])
    finally:
        mm.in_training = training_before


def _train(model, kind: str, scenes: Scenes, steps: int, batch: int, lr: float) -> dict:
    dm = model.diffusion_model
    dm.train()
    ms = model.model_sampling
    opt = torch.optim.AdamW(dm.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        a = scenes.attributes(batch, g)
        x0 = to_model_channels(kind, scenes.render(a, g))
        tokens, pooled = scenes.condition(a)
        drop = torch.rand(batch, generator=g) < 0.1
        tokens = torch.where(drop[:, None, None], torch.zeros_like(tokens), tokens)
        pooled = torch.where(drop[:, None], torch.zeros_like(pooled), pooled)
        eps = torch.randn(x0.shape, generator=g)
        warm = min(1.0, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / steps)) * 0.9 + 0.1)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        if kind == "unet":
            idx = torch.randint(0, len(ms.sigmas), (batch,), generator=g)
            sigma = ms.sigmas[idx]
            xt = (x0 + eps * sigma[:, None, None, None]) / torch.sqrt(sigma**2 + 1)[:, None, None, None]
            pred = dm(xt, ms.timestep(sigma).float(), context=tokens, y=_y(model, kind, pooled))
            loss = F.mse_loss(pred, eps)
        else:
            # half the batch at the sampler's (shifted) sigmas, half logit-normal for the low-noise end
            idx = torch.randint(0, len(ms.sigmas), (batch,), generator=g)
            sigma = torch.where(
                torch.arange(batch) % 2 == 0, ms.sigmas[idx], torch.sigmoid(torch.randn(batch, generator=g))
            )
            s = sigma[:, None, None, None, None]
            xt = (1 - s) * x0 + s * eps
            pred = dm(xt, ms.timestep(sigma).float(), context=tokens)
            loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            losses.append(round(loss.item(), 4))
            logger.info(
                "%s train step %d/%d loss %.4f (%.0f s)", kind, step + 1, steps, loss.item(), time.perf_counter() - t0
            )
    dm.eval()
    for p in dm.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 1), "loss_every_50": losses}


def cases(scenes: Scenes, images: int, kind: str, seed: int = 7) -> tuple[list, list, torch.Tensor]:
    """(positive, negative) CONDITIONING with one entry per image (batched) and the noise (the toy's latent shape)."""
    g = torch.Generator().manual_seed(seed)
    a = scenes.attributes(images, g)
    tokens, pooled = scenes.condition(a)
    extra = {"width": SIZE * 8, "height": SIZE * 8}
    pos = [[tokens, {"pooled_output": pooled, **extra}]]
    neg = [[torch.zeros_like(tokens), {"pooled_output": torch.zeros_like(pooled), **extra}]]
    shape = (images, 4, SIZE, SIZE) if kind == "unet" else (images, 16, 1, SIZE, SIZE)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))
    return pos, neg, noise
