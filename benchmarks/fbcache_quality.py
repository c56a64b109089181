"""Quality vs speed of First Block Cache against ComfyUI's native EasyCache, on a model that learned something.

1. Trains a small UNet with ComfyUI's real SDXL block structure (``UNetModel``, SDXL topology:
   conv-in, ResBlocks, transformer levels, ADM ``y``; SDXL discrete eps schedule) for a few minutes
   on procedurally generated 4-channel 32x32 "latents" (coloured shapes on gradient backgrounds,
   conditioned on shape, colour, position and size through cross-attention tokens and ``y``;
   10 % condition dropout so CFG works).
2. Samples a fixed set of (condition, seed) pairs through ComfyUI's KSampler code
   (``comfy.sample.sample``) with euler, dpmpp_2m and heun, CFG 5: uncached, with our cache at
   several thresholds, and with native EasyCache at several thresholds.
3. Reports PSNR/SSIM against the uncached output and the speedup, both as counted full model
   evaluations and cost-weighted with the measured hit cost, plus wall time.

Run: ``PYTHONPATH=$COMFYUI_ROOT:. python benchmarks/fbcache_quality.py --out quality.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("fbcache_quality")

LATENT = 32
CTX = 256
POOLED = 64
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


def unet_config() -> dict:
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "model_channels": 64,
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 1, 1, 2, 2],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "transformer_depth_middle": 2,
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


class Scenes:
    """Procedural conditioned images and their fixed (random, untrained) condition embeddings."""

    def __init__(self, device: torch.device, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.device = device
        self.shape_emb = torch.randn(SHAPES, CTX, generator=g).to(device)
        self.color_emb = torch.randn(len(PALETTE), CTX, generator=g).to(device)
        self.pos_proj = (torch.randn(8, CTX, generator=g) / 2).to(device)
        self.size_proj = (torch.randn(4, CTX, generator=g) / 1.4).to(device)
        self.pool_proj = (torch.randn(4 * CTX, POOLED, generator=g) / math.sqrt(4 * CTX)).to(device)
        self.palette = PALETTE.to(device)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, LATENT), torch.linspace(0, 1, LATENT), indexing="ij")
        self.yy, self.xx = yy.to(device), xx.to(device)

    def attributes(self, n: int, g: torch.Generator) -> dict:
        return {
            "shape": torch.randint(0, SHAPES, (n,), generator=g),
            "color": torch.randint(0, len(PALETTE), (n,), generator=g),
            "cx": torch.rand(n, generator=g) * 0.5 + 0.25,
            "cy": torch.rand(n, generator=g) * 0.5 + 0.25,
            "r": torch.rand(n, generator=g) * 0.15 + 0.12,
        }

    def render(self, a: dict, g: torch.Generator) -> torch.Tensor:
        n = a["shape"].shape[0]
        d = self.device
        c1 = (torch.rand(n, 4, generator=g) * 1.2 - 0.6).to(d)
        c2 = (torch.rand(n, 4, generator=g) * 1.2 - 0.6).to(d)
        ang = (torch.rand(n, generator=g) * 2 * math.pi).to(d)
        t = (self.xx[None] - 0.5) * torch.cos(ang)[:, None, None] + (self.yy[None] - 0.5) * torch.sin(ang)[
            :, None, None
        ]
        t = (t + 0.71) / 1.42
        bg = c1[:, :, None, None] * (1 - t[:, None]) + c2[:, :, None, None] * t[:, None]
        freq = (torch.rand(n, generator=g) * 10 + 4).to(d)
        bg = bg + 0.08 * torch.sin(freq[:, None, None, None] * math.pi * self.xx[None, None])
        cx, cy, r = a["cx"].to(d)[:, None, None], a["cy"].to(d)[:, None, None], a["r"].to(d)[:, None, None]
        dist_c = torch.sqrt((self.xx[None] - cx) ** 2 + (self.yy[None] - cy) ** 2)
        dist_s = torch.maximum((self.xx[None] - cx).abs(), (self.yy[None] - cy).abs())
        shape = a["shape"].to(d)[:, None, None]
        circle = torch.sigmoid((r - dist_c) * 60)
        square = torch.sigmoid((r - dist_s) * 60)
        ring = torch.sigmoid((r - dist_c) * 60) * torch.sigmoid((dist_c - 0.55 * r) * 60)
        mask = torch.where(shape == 0, circle, torch.where(shape == 1, square, ring))
        fg = self.palette[a["color"].to(d)][:, :, None, None]
        return (bg * (1 - mask[:, None]) + fg * mask[:, None]).clamp(-1, 1)

    def condition(self, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.device
        pos = torch.stack([a["cx"], a["cy"]], 1).to(d)
        feats = torch.cat(
            [torch.sin(pos * k * math.pi) for k in (1, 2)] + [torch.cos(pos * k * math.pi) for k in (1, 2)], 1
        )
        size = a["r"].to(d)[:, None] * torch.tensor([1.0, 4.0, 8.0, 16.0], device=d)
        tokens = torch.stack(
            [
                self.shape_emb[a["shape"].to(d)],
                self.color_emb[a["color"].to(d)],
                feats @ self.pos_proj,
                torch.sin(size) @ self.size_proj,
            ],
            1,
        )
        pooled = tokens.flatten(1) @ self.pool_proj
        return tokens, pooled


def train(model, scenes: Scenes, seconds: float, batch: int, device) -> dict:
    dm = model.diffusion_model
    dm.train()
    ms = model.model_sampling
    sigmas_table = ms.sigmas.to(device)
    opt = torch.optim.AdamW(dm.parameters(), lr=4e-4, weight_decay=0.01, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    adm_cache = model.encode_adm(pooled_output=torch.zeros(1, POOLED), width=256, height=256)[:, POOLED:].to(device)
    t0 = time.perf_counter()
    step, losses = 0, []
    while time.perf_counter() - t0 < seconds:
        a = scenes.attributes(batch, g)
        x0 = scenes.render(a, g)
        tokens, pooled = scenes.condition(a)
        drop = (torch.rand(batch, generator=g) < 0.1).to(device)
        tokens = torch.where(drop[:, None, None], torch.zeros_like(tokens), tokens)
        pooled = torch.where(drop[:, None], torch.zeros_like(pooled), pooled)
        y = torch.cat([pooled, adm_cache.expand(batch, -1)], 1)
        idx = torch.randint(0, len(sigmas_table), (batch,), generator=g).to(device)
        sigma = sigmas_table[idx]
        eps = torch.randn_like(x0)
        xt = x0 + eps * sigma[:, None, None, None]
        xc = xt / torch.sqrt(sigma**2 + 1)[:, None, None, None]
        lr_scale = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = 4e-4 * lr_scale
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = dm(xc, ms.timestep(sigma).float(), context=tokens, y=y)
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            losses.append(round(loss.item(), 4))
            logger.info("train step %d loss %.4f (%.0f s)", step, loss.item(), time.perf_counter() - t0)
    dm.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "loss_every_100": losses}


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over channels (Gaussian window 11, sigma 1.5), inputs in [0, 1]."""
    k = torch.exp(-((torch.arange(11, dtype=torch.float32) - 5) ** 2) / (2 * 1.5**2))
    k = (k / k.sum()).to(a.device)
    w = (k[:, None] * k[None, :])[None, None].repeat(a.shape[1], 1, 1, 1)

    def blur(t):
        return F.conv2d(t, w, padding=5, groups=a.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    va = blur(a * a) - mu_a**2
    vb = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.mean().item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a, b).item()
    return 99.0 if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-seconds", type=float, default=150)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--samplers", default="euler,dpmpp_2m,heun")
    ap.add_argument("--methods", default="", help="comma list of method names to run (default: all)")
    ap.add_argument("--hit-cost", type=float, default=None, help="hit step cost / full step (else from --cost-json)")
    ap.add_argument("--cost-json", type=Path, default=None)
    ap.add_argument("--save-model", type=Path, default=None)
    ap.add_argument("--budget-seconds", type=float, default=1e9, help="stop sweeping (keeping results) after this")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fbcache_models as fm

    fm.prepare_comfy()
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models as sm

    fbc, adapter = fm.import_pack()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    hit_cost = args.hit_cost
    if hit_cost is None and args.cost_json and args.cost_json.is_file():
        hit_cost = json.loads(args.cost_json.read_text())["sdxl"]["summary"]["hit_step_fraction_of_full"]
    hit_cost = 0.03 if hit_cost is None else hit_cost

    mc = sm.SDXL(unet_config())
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "", device=device)
    fm.init_weights(model.diffusion_model, std=0.02)
    model.diffusion_model.to(device)
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    scenes = Scenes(device)
    with torch.inference_mode(False), torch.enable_grad():
        train_info = train(model, scenes, args.train_seconds, args.batch, device)
    train_info["params_M"] = round(n_params / 1e6, 2)
    if args.save_model:
        torch.save(model.diffusion_model.state_dict(), args.save_model)
    for p in model.diffusion_model.parameters():
        p.requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))

    # Count full evaluations: the middle block runs only when the model is really computed.
    counter = {"full": 0}

    def count(*_):
        counter["full"] += 1

    model.diffusion_model.middle_block[0].register_forward_pre_hook(count)

    g = torch.Generator().manual_seed(7)
    attrs = scenes.attributes(args.images, g)
    tokens, pooled = scenes.condition(attrs)
    cases = []
    for i in range(args.images):
        pos = [[tokens[i : i + 1].cpu(), {"pooled_output": pooled[i : i + 1].cpu(), "width": 256, "height": 256}]]
        neg = [[torch.zeros(1, 4, CTX), {"pooled_output": torch.zeros(1, POOLED), "width": 256, "height": 256}]]
        noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1000 + i))
        cases.append((pos, neg, noise))
    latent = torch.zeros(1, 4, LATENT, LATENT)

    def sample_all(mp, sampler):
        outs = []
        counter["full"] = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for pos, neg, noise in cases:
            outs.append(
                comfy.sample.sample(
                    mp, noise, args.steps, args.cfg, sampler, "normal", pos, neg, latent, seed=0, disable_pbar=True
                )
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return torch.cat(outs), time.perf_counter() - t0, counter["full"]

    def ours(th, start=0.0, end=1.0, max_hits=-1, mode="tail", hit_residual="reuse"):
        return adapter.apply_first_block_cache(
            patcher, fbc.FBCacheHolder(th, start, end, max_hits, mode, hit_residual=hit_residual)
        )

    def easycache(th):
        return fm.easycache_patcher(patcher, 4, th)

    methods = [("ours", th, lambda th=th: ours(th)) for th in (0.003, 0.006, 0.01, 0.015, 0.02, 0.03, 0.05)]
    methods += [("ours_maxhits2", th, lambda th=th: ours(th, max_hits=2)) for th in (0.01, 0.03, 0.08, 0.2)]
    methods += [("ours_maxhits1", th, lambda th=th: ours(th, max_hits=1)) for th in (0.02, 0.1, 0.5)]
    for hits in (1, 2, -1):
        methods += [
            (
                f"ours_extrap_maxhits{hits}" if hits > 0 else "ours_extrap",
                th,
                lambda th=th, hits=hits: ours(th, max_hits=hits, hit_residual="extrapolate"),
            )
            for th in ((0.01, 0.02, 0.05, 0.1, 0.2, 0.5) if hits == 1 else (0.01, 0.02, 0.05, 0.5))
        ]
    methods += [("easycache", th, lambda th=th: easycache(th)) for th in (0.025, 0.05, 0.1, 0.2, 0.3)]
    started = time.perf_counter()
    saved: dict[str, torch.Tensor] = {}
    results = {
        "train": train_info,
        "hit_cost_used": hit_cost,
        "steps": args.steps,
        "cfg": args.cfg,
        "images": args.images,
        "rows": [],
    }
    for sampler in args.samplers.split(","):
        sample_all(patcher, sampler)  # warm-up
        base, base_t, base_full = sample_all(patcher, sampler)
        base01 = ((base + 1) / 2).clamp(0, 1)
        # Does the model produce its training distribution? Mean |x| of a clean scene is ~0.5.
        results.setdefault("baseline", {})[sampler] = {
            "seconds": round(base_t, 3),
            "full_evals": base_full,
            "finite": bool(torch.isfinite(base).all()),
        }
        saved[f"{sampler}/baseline"] = base.cpu()
        for name, th, make in methods:
            if args.methods and name not in args.methods.split(","):
                continue
            if time.perf_counter() - started > args.budget_seconds:
                logger.warning("time budget spent: skipping %s %s %s", sampler, name, th)
                continue
            out, t, full = sample_all(make(), sampler)
            saved[f"{sampler}/{name}/{th}"] = out.cpu()
            out01 = ((out + 1) / 2).clamp(0, 1)
            skipped = base_full - full
            row = {
                "sampler": sampler,
                "method": name,
                "threshold": th,
                "full_evals": full,
                "base_evals": base_full,
                "speedup_evals": round(base_full / max(full, 1), 3),
                "speedup_cost": round(base_full / (full + (hit_cost * skipped if name.startswith("ours") else 0.0)), 3),
                "speedup_wall": round(base_t / t, 3),
                "psnr": round(psnr(out01, base01), 2),
                "ssim": round(ssim(out01, base01), 4),
            }
            results["rows"].append(row)
            logger.info("%s", row)
        args.out.write_text(json.dumps(results, indent=1))
    args.out.write_text(json.dumps(results, indent=1))
    torch.save(saved, args.out.with_suffix(".latents.pt"))
    logger.info("done")


if __name__ == "__main__":
    main()
