"""LoRA layers that wrap a frozen base ``Linear``/``Conv2d`` and a set that injects/removes them.

The contract follows peft's: the wrapped layer computes ``base(x) + up(down(x)) * alpha / rank``;
``down`` starts random (Kaiming-uniform) and ``up`` at zero, so the model is unchanged at step 0;
the base weights are never written. Injection replaces the module in its parent and
``LoRASet.detach()`` puts the original object back, so nothing outlives the training call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
"""Module names (relative to an attention block) trained by the ``attention`` preset."""

TRANSFORMER_CONTAINERS = ("SpatialTransformer", "Transformer2DModel")
"""Class names of the UNet's transformer containers (LDM / diffusers spelling)."""

TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""CLIP text-encoder modules trained when text-encoder LoRA is on (kohya's choice)."""

TARGET_PRESETS = ("attention", "attention+mlp")


class LoRALayer(nn.Module):
    """``base(x) + lora_up(lora_down(x)) * scale`` around a frozen ``nn.Linear`` or ``nn.Conv2d``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, name: str) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            fan_in, fan_out = base.in_features, base.out_features
            kind = f"Linear {fan_in}->{fan_out}"
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(
                    f"LoRA target {name} is a grouped Conv2d (groups={base.groups}); only groups=1 is supported"
                )
            fan_in, fan_out = base.in_channels, base.out_channels
            kind = f"Conv2d {fan_in}->{fan_out} kernel {tuple(base.kernel_size)}"
        else:
            raise TypeError(f"LoRA target {name} is a {type(base).__name__}; only Linear and Conv2d can be wrapped")
        max_rank = min(fan_in, fan_out)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank > max_rank:
            raise ValueError(
                f"rank={rank} does not fit layer {name} ({kind}): rank must be between 1 and {max_rank} "
                f"(the layer's smaller side); lower the rank input"
            )
        down: nn.Module
        up: nn.Module
        if isinstance(base, nn.Linear):
            down = nn.Linear(fan_in, rank, bias=False)
            up = nn.Linear(rank, fan_out, bias=False)
        else:
            down = nn.Conv2d(fan_in, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
            up = nn.Conv2d(rank, fan_out, 1, bias=False)
        self.base = base
        self.lora_down = down
        self.lora_up = up
        self.rank = rank
        self.alpha = float(alpha)
        self.name = name
        self.multiplier = 1.0
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """alpha / rank, the factor the LoRA branch is multiplied with (times ``multiplier``)."""
        return self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Down random (Kaiming-uniform, a=sqrt(5) like nn.Linear), up zero: identity at step 0."""
        weight = self.lora_down.weight
        init = torch.empty(weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            weight.copy_(init)
            self.lora_up.weight.zero_()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return out
        if torch.is_autocast_enabled(x.device.type):
            delta = self.lora_up(self.lora_down(x))
        else:
            # compute in the activations' dtype; the fp32 master weights get their grads through .to()
            down, up = self.lora_down.weight.to(x.dtype), self.lora_up.weight.to(x.dtype)
            if isinstance(self.lora_down, nn.Conv2d):
                c = self.lora_down
                delta = F.conv2d(F.conv2d(x, down, None, c.stride, c.padding, c.dilation), up)
            else:
                delta = _LowRankLinear.apply(x, down, up)
        return torch.add(out, delta.to(out.dtype), alpha=self.scale * self.multiplier)


class _LowRankLinear(torch.autograd.Function):
    """``x @ down.T @ up.T`` as one autograd node with a hand-written backward.

    Same math as two ``F.linear`` calls, but about half the dispatched ops and one graph node
    instead of several: on a fast GPU the LoRA step is bound by per-op CPU overhead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        hidden = torch.mm(flat, down.t())
        ctx.save_for_backward(flat, hidden, down, up)
        ctx.x_shape = x.shape
        return torch.mm(hidden, up.t()).view(*x.shape[:-1], up.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, hidden, down, up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_hidden = torch.mm(g, up)
        grad_x = torch.mm(g_hidden, down).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_down = torch.mm(g_hidden.t(), flat) if ctx.needs_input_grad[1] else None
        grad_up = torch.mm(g.t(), hidden) if ctx.needs_input_grad[2] else None
        return grad_x, grad_down, grad_up


@dataclass
class _Slot:
    parent: nn.Module
    attr: str
    original: nn.Module
    layer: LoRALayer
    group: str


class LoRASet:
    """The LoRA layers of one training run, keyed by their kohya name (e.g. ``lora_unet_..._to_q``).

    ``add()`` wraps modules in place; ``detach()`` restores every original module object.
    """

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    @property
    def layers(self) -> dict[str, LoRALayer]:
        return {name: slot.layer for name, slot in self._slots.items()}

    def add(
        self,
        root: nn.Module,
        paths: Iterable[str],
        *,
        rank: int,
        alpha: float,
        prefix: str,
        rename: Callable[[str], str] = lambda p: p,
        group: str = "unet",
        device: torch.device | str | None = None,
    ) -> list[str]:
        """Wrap ``root``'s modules at ``paths``; returns the kohya names added.

        ``rename`` maps a module path of ``root`` to the path written in the file (SD1.5: LDM ->
        diffusers); the kohya name is ``<prefix>_<renamed path with . -> _>``.
        """
        names = []
        for path in paths:
            parent_path, _, attr = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            base = getattr(parent, attr)
            name = kohya_name(prefix, rename(path))
            if name in self._slots:
                raise ValueError(f"two LoRA targets map to the same key {name}")
            layer = LoRALayer(base, rank, alpha, name)
            weight = getattr(base, "weight", None)
            target_device = device if device is not None else (weight.device if weight is not None else "cpu")
            layer.lora_down.to(target_device)
            layer.lora_up.to(target_device)
            layer.lora_down.requires_grad_(True)
            layer.lora_up.requires_grad_(True)
            setattr(parent, attr, layer)
            self._slots[name] = _Slot(parent, attr, base, layer, group)
            names.append(name)
        return names

    def detach(self) -> None:
        """Put every original module back (the LoRA tensors stay readable on the layers)."""
        for slot in self._slots.values():
            if getattr(slot.parent, slot.attr) is slot.layer:
                setattr(slot.parent, slot.attr, slot.original)

    def parameters(self, group: str | None = None) -> list[nn.Parameter]:
        """LoRA parameters (down then up per layer, in insertion order), optionally of one group."""
        params: list[nn.Parameter] = []
        for slot in self._slots.values():
            if group is None or slot.group == group:
                params += [slot.layer.lora_down.weight, slot.layer.lora_up.weight]
        return params

    def groups(self) -> list[str]:
        return sorted({slot.group for slot in self._slots.values()})

    def reset(self, seed: int) -> None:
        """Re-initialise every layer from ``seed`` (CPU generator: same init on every device)."""
        generator = torch.Generator().manual_seed(seed)
        for slot in self._slots.values():
            slot.layer.reset_parameters(generator)

    def set_multiplier(self, value: float) -> None:
        for slot in self._slots.values():
            slot.layer.multiplier = value

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """kohya-format tensors: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``."""
        out: dict[str, torch.Tensor] = {}
        for name, slot in self._slots.items():
            layer = slot.layer
            out[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy kohya-format tensors into the layers; every layer must be present, no extra key."""
        expected = set()
        for name, slot in self._slots.items():
            layer = slot.layer
            for part, param in (("lora_down", layer.lora_down.weight), ("lora_up", layer.lora_up.weight)):
                key = f"{name}.{part}.weight"
                expected.add(key)
                if key not in tensors:
                    raise ValueError(f"LoRA state is missing {key}: it was trained with other targets or rank")
                value = tensors[key]
                if value.shape != param.shape:
                    raise ValueError(f"LoRA state {key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(value.to(param.dtype))
            expected.add(f"{name}.alpha")
        extra = sorted(k for k in tensors if k not in expected)
        if extra:
            raise ValueError(f"LoRA state has {len(extra)} keys this run does not train, e.g. {extra[0]}")


def kohya_name(prefix: str, path: str) -> str:
    """kohya's module key: ``lora_unet`` + ``down_blocks.0.attentions.0`` -> ``lora_unet_down_blocks_0_attentions_0``."""
    return f"{prefix}_{path.replace('.', '_')}"


def _inside_transformer(root: nn.Module, path: str) -> bool:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if type(root.get_submodule(".".join(parts[:i]))).__name__ in TRANSFORMER_CONTAINERS:
            return True
    return False


def find_unet_targets(root: nn.Module, preset: str) -> list[str]:
    """Module paths of ``root`` (a UNet) that a target preset trains.

    ``attention``: to_q/to_k/to_v/to_out.0 of every attention block (diffusers' SDXL LoRA script).
    ``attention+mlp``: kohya's default, every Linear and 1x1 Conv2d inside the transformer
    containers (attention, feed-forward, proj_in/proj_out).
    """
    if preset not in TARGET_PRESETS:
        raise ValueError(f"target={preset!r} is not a preset; choose one of {', '.join(TARGET_PRESETS)}")
    paths = []
    for path, module in root.named_modules():
        if not path or isinstance(module, LoRALayer) or path.endswith(".base"):
            continue
        is_linear = isinstance(module, nn.Linear)
        is_pointwise = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
        if not (is_linear or is_pointwise):
            continue
        if preset == "attention":
            if is_linear and any(path.endswith("." + leaf) for leaf in ATTENTION_LEAVES) and ".attn" in path:
                paths.append(path)
        elif _inside_transformer(root, path):
            paths.append(path)
    return paths


def find_te_targets(root: nn.Module) -> list[str]:
    """Module paths of a CLIP text model's attention and MLP Linear layers (kohya's TE targets)."""
    return [
        path
        for path, module in root.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in path and path.rsplit(".", 1)[-1] in TE_LEAVES
    ]
