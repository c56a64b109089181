"""Tiny cross-attention UNets and a tiny CLIP-like text encoder: test models for lora_train/.

Same building blocks and module paths as the real models, at a few thousand parameters:
``naming="diffusers"`` gives ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
(SD1.5 as sd-scripts sees it), ``naming="ldm"`` gives ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``
(ComfyUI's layout, SDXL as sd-scripts sees it). Random weights; nothing here is pretrained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, d = x.shape
        q, k, v = (
            t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 2), nn.Dropout(0.0), nn.Linear(dim * 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class _Transformer(nn.Module):
    """Transformer container: norm, proj_in (1x1 conv or linear), blocks, proj_out."""

    def __init__(self, dim: int, context_dim: int, heads: int, depth: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(4, dim)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Transformer2DModel(_Transformer):
    """diffusers spelling of the container."""


class SpatialTransformer(_Transformer):
    """LDM spelling of the container."""


class ResBlock(nn.Module):
    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.emb = nn.Linear(emb_dim, dim)
        self.norm2 = nn.GroupNorm(4, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class _Stage(nn.Module):
    """diffusers down/up block: ``resnets`` + ``attentions``."""

    def __init__(self, dim: int, emb_dim: int, context_dim: int, heads: int, linear: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, emb_dim)])
        self.attentions = nn.ModuleList([Transformer2DModel(dim, context_dim, heads, 1, linear)])

    def forward(self, x, emb, context):
        return self.attentions[0](self.resnets[0](x, emb), context)


class _Seq(nn.ModuleList):
    """LDM ``TimestepEmbedSequential`` stand-in: ResBlock gets emb, transformers get context."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, _Transformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class TinyUNet(nn.Module):
    """A two-level cross-attention UNet (~60k parameters at dim 32).

    ``forward(x [B,4,h,w], timesteps [B], context [B,T,context_dim], y [B,adm_dim] or None)``.
    ``adm_dim > 0`` adds SDXL-style vector conditioning (pooled text + size embeddings).
    """

    def __init__(
        self,
        naming: str = "diffusers",
        dim: int = 32,
        context_dim: int = 16,
        heads: int = 2,
        adm_dim: int = 0,
        linear: bool = False,
        in_channels: int = 4,
    ) -> None:
        super().__init__()
        if naming not in ("diffusers", "ldm"):
            raise ValueError(f"naming={naming!r}: use 'diffusers' or 'ldm'")
        self.naming = naming
        self.dim = dim
        emb_dim = dim * 2
        self.time_embed = nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Linear(adm_dim, emb_dim) if adm_dim else None
        if naming == "diffusers":
            self.conv_in = nn.Conv2d(in_channels, dim, 1)
            self.down_blocks = nn.ModuleList([_Stage(dim, emb_dim, context_dim, heads, linear)])
            self.mid_block = _Stage(dim, emb_dim, context_dim, heads, linear)
            self.up_blocks = nn.ModuleList([_Stage(dim, emb_dim, context_dim, heads, linear)])
            self.conv_out = nn.Conv2d(dim, in_channels, 1)
        else:
            self.input_blocks = nn.ModuleList(
                [
                    _Seq([nn.Conv2d(in_channels, dim, 1)]),
                    _Seq([ResBlock(dim, emb_dim), SpatialTransformer(dim, context_dim, heads, 1, linear)]),
                ]
            )
            self.middle_block = _Seq([ResBlock(dim, emb_dim), SpatialTransformer(dim, context_dim, heads, 1, linear)])
            self.output_blocks = nn.ModuleList(
                [_Seq([ResBlock(dim, emb_dim), SpatialTransformer(dim, context_dim, heads, 1, linear)])]
            )
            self.out = nn.Sequential(nn.GroupNorm(4, dim), nn.SiLU(), nn.Conv2d(dim, in_channels, 1))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        # in the weights' dtype, as ComfyUI's UNet does: a bf16 toy computes natively in bf16
        emb = self.time_embed(timestep_embedding(timesteps, self.dim).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this TinyUNet has adm_dim > 0 and needs the vector conditioning y")
            emb = emb + self.label_emb(y)
        if self.naming == "diffusers":
            h = self.conv_in(x)
            skip = self.down_blocks[0](h, emb, context)
            h = self.mid_block(skip, emb, context)
            h = self.up_blocks[0](h + skip, emb, context)
            return self.conv_out(F.silu(h))
        h = self.input_blocks[0](x, emb, context)
        skip = self.input_blocks[1](h, emb, context)
        h = self.middle_block(skip, emb, context)
        h = self.output_blocks[0](h + skip, emb, context)
        return self.out(h)


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(dim, dim)
        self.self_attn.k_proj = nn.Linear(dim, dim)
        self.self_attn.v_proj = nn.Linear(dim, dim)
        self.self_attn.out_proj = nn.Linear(dim, dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, dim * 2)
        self.mlp.fc2 = nn.Linear(dim * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm1(x)
        b, n, d = h.shape
        q, k, v = self.self_attn.q_proj(h), self.self_attn.k_proj(h), self.self_attn.v_proj(h)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        x = x + self.self_attn.out_proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x))))


class TinyTextEncoder(nn.Module):
    """CLIP-shaped text model (``text_model.encoder.layers.N.self_attn.q_proj`` ...) over bytes.

    ``forward(captions) -> (hidden [B, 8, dim], pooled [B, dim])``.
    """

    def __init__(self, dim: int = 16, layers: int = 2, length: int = 8) -> None:
        super().__init__()
        self.length = length
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Embedding(257, dim)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(_EncoderLayer(dim) for _ in range(layers))
        self.text_model.final_layer_norm = nn.LayerNorm(dim)

    def tokens(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            ids = [b + 1 for b in c.encode()[: self.length]]
            rows.append(ids + [0] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.text_model.embeddings.weight.device
        h = self.text_model.embeddings(self.tokens(captions).to(device))
        for layer in self.text_model.encoder.layers:
            h = layer(h)
        h = self.text_model.final_layer_norm(h)
        return h, h.mean(dim=1)


def toy_denoise(unet: nn.Module, dtype: torch.dtype):
    """``denoise(x, t, cond)`` over a :class:`TinyUNet`, made from the module by reference (a
    Train LoRA worker process is handed this function, as ComfyUI's run hands it
    ``lora_train.worker.ldm_unet_denoise``)."""

    def denoise(x, t, cond):
        return unet(x, t, cond["context"], cond.get("y"))

    return denoise


def crashing_denoise(unet: nn.Module, dtype: torch.dtype, after: int):
    """:func:`toy_denoise` whose process dies (exit code 134, as an abort) on call ``after + 1``:
    stands in for a native crash inside a worker process."""
    import os

    calls = [0]
    inner = toy_denoise(unet, dtype)

    def denoise(x, t, cond):
        calls[0] += 1
        if calls[0] > after:
            os._exit(134)
        return inner(x, t, cond)

    return denoise


def raising_denoise(unet: nn.Module, dtype: torch.dtype, after: int, message: str):
    """:func:`toy_denoise` raising ``ValueError(message)`` on call ``after + 1``."""
    calls = [0]
    inner = toy_denoise(unet, dtype)

    def denoise(x, t, cond):
        calls[0] += 1
        if calls[0] > after:
            raise ValueError(message)
        return inner(x, t, cond)

    return denoise
