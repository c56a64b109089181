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
        # (down, up) in the compute dtype, refreshed by the LoRASet once per step (see
        # LoRASet.use_working_copies); None: cast the fp32 masters on every call
        self.working: tuple[torch.Tensor, torch.Tensor] | None = None
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
        scale = self.scale * self.multiplier
        working = self.working
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            if working is None or working[0].dtype != dtype or working[0].device != x.device:
                return torch.add(out, self.lora_up(self.lora_down(x)).to(out.dtype), alpha=scale)
            x = x.to(dtype)  # what autocast does to a Linear's input; the working copies need no cast
        if working is not None and working[0].dtype == x.dtype and working[0].device == x.device:
            down, up = working
        else:
            # compute in the activations' dtype; the fp32 master weights get their grads through .to()
            down, up = self.lora_down.weight.to(x.dtype), self.lora_up.weight.to(x.dtype)
        if isinstance(self.lora_down, nn.Conv2d):
            c = self.lora_down
            delta = F.conv2d(F.conv2d(x, down, None, c.stride, c.padding, c.dilation), up)
            return torch.add(out, delta.to(out.dtype), alpha=scale)
        if out.dtype == x.dtype:
            return _LoRALinear.apply(out, x, down, up, scale)
        return torch.add(out, _LoRALinear.apply(None, x, down, up, 1.0).to(out.dtype), alpha=scale)


class _LoRALinear(torch.autograd.Function):
    """``out + scale * x @ down.T @ up.T`` as one autograd node with a hand-written backward.

    Same math as two ``F.linear`` calls and an add, in two kernels (``mm`` and ``addmm``) and one
    graph node instead of several: without CUDA graphs a LoRA step on a fast GPU is bound by
    the host's per-op cost, and the LoRA layers dispatch most of its ops. ``out`` may be None
    (returns ``scale * x @ down.T @ up.T``).
    """

    @staticmethod
    def forward(ctx, out, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        hidden = torch.mm(flat, down.t())
        ctx.save_for_backward(flat, hidden, down, up)
        ctx.x_shape = x.shape
        ctx.scale = scale
        shape = (*x.shape[:-1], up.shape[0])
        if out is None:
            result = torch.mm(hidden, up.t())
            return result.view(shape) if scale == 1.0 else result.mul_(scale).view(shape)
        return torch.addmm(out.reshape(-1, up.shape[0]), hidden, up.t(), alpha=scale).view(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, hidden, down, up = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.scale != 1.0:
            g = g * ctx.scale
        g_hidden = torch.mm(g, up)
        grad_x = torch.mm(g_hidden, down).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        grad_down = torch.mm(g_hidden.t(), flat) if ctx.needs_input_grad[2] else None
        grad_up = torch.mm(g.t(), hidden) if ctx.needs_input_grad[3] else None
        grad_out = grad if ctx.needs_input_grad[0] else None
        return grad_out, grad_x, grad_down, grad_up, None


@dataclass
class _Working:
    """One flat buffer each for the fp32 masters, their grads, the working copies and theirs."""

    layers: list[LoRALayer]
    params: list[nn.Parameter]
    master: torch.Tensor
    master_grad: torch.Tensor
    master_grad_views: list[torch.Tensor]
    work: torch.Tensor
    work_grad: torch.Tensor
    leaves: list[torch.Tensor]
    leaf_grad_views: list[torch.Tensor]


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
        self._working: _Working | None = None

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
            slot.layer.working = None
            if getattr(slot.parent, slot.attr) is slot.layer:
                setattr(slot.parent, slot.attr, slot.original)
        self._working = None

    # ----- working copies -----------------------------------------------------------------
    def use_working_copies(self, dtype: torch.dtype, device: torch.device | str) -> int:
        """Keep a copy of the LoRA weights in ``dtype`` for the layers to compute with.

        Without it every layer casts its fp32 masters to the compute dtype in every forward (twice
        with checkpointing) and casts the grads back: six small kernels and autograd nodes per
        layer and step, thousands per SDXL step, on a step bound by the host. Here the masters of
        the layers on ``device`` move into one flat fp32 buffer (the ``Parameter`` objects stay
        the same; their ``.grad`` are views of a second one), the working copies are views of a
        flat ``dtype`` buffer: :meth:`sync` refreshes them all with one copy, :meth:`flush_grads`
        moves their grads into the masters' with one add. Returns the number of layers covered;
        layers on another device keep casting.
        """
        if self._working is not None:
            raise RuntimeError("working copies are already in use")
        device = torch.device(device)
        chosen = [
            slot.layer
            for slot in self._slots.values()
            if slot.layer.lora_down.weight.device == device and slot.layer.lora_down.weight.dtype == torch.float32
        ]
        if dtype == torch.float32 or not chosen:
            return 0
        params = [p for layer in chosen for p in (layer.lora_down.weight, layer.lora_up.weight)]
        total = sum(p.numel() for p in params)
        master = torch.empty(total, dtype=torch.float32, device=device)
        master_grad = torch.zeros(total, dtype=torch.float32, device=device)
        work = torch.empty(total, dtype=dtype, device=device)
        work_grad = torch.zeros(total, dtype=dtype, device=device)
        grad_views, leaves, leaf_grad_views = [], [], []
        offset = 0
        with torch.no_grad():
            for p in params:
                n, shape = p.numel(), p.shape
                view = master[offset : offset + n].view(shape)
                view.copy_(p)
                p.data = view
                grad_views.append(master_grad[offset : offset + n].view(shape))
                p.grad = grad_views[-1]
                leaves.append(work[offset : offset + n].view(shape).detach().requires_grad_(True))
                leaf_grad_views.append(work_grad[offset : offset + n].view(shape))
                offset += n
        for i, layer in enumerate(chosen):
            layer.working = (leaves[2 * i], leaves[2 * i + 1])
        self._working = _Working(
            chosen, params, master, master_grad, grad_views, work, work_grad, leaves, leaf_grad_views
        )
        self.sync()
        return len(chosen)

    @property
    def has_working_copies(self) -> bool:
        return self._working is not None

    def sync(self) -> None:
        """Refresh the working copies from the fp32 masters (after every change to the masters)."""
        w = self._working
        if w is not None:
            with torch.no_grad():
                w.work.copy_(w.master)

    def attach_working_grads(self) -> None:
        """Give every working copy its slot of the grad buffer as ``.grad``, for code that adds
        into existing grads (the CUDA-graph step). Without it ``backward()`` leaves each working
        copy a new grad tensor, which :meth:`flush_grads` gathers with one foreach add."""
        w = self._working
        if w is not None:
            for leaf, view in zip(w.leaves, w.leaf_grad_views, strict=True):
                leaf.grad = view

    def flush_grads(self) -> None:
        """Add the working copies' grads into the masters' ``.grad`` (one foreach add into the
        grad buffer, one add into the masters' buffer, one zero). A master whose ``.grad`` was
        set to None or replaced since gets its view back first, so no grad is ever dropped."""
        w = self._working
        if w is None:
            return
        with torch.no_grad():
            for p, view in zip(w.params, w.master_grad_views, strict=True):
                if p.grad is not view:
                    if p.grad is None:
                        view.zero_()
                    else:
                        view.copy_(p.grad)
                    p.grad = view
            fresh, slots = [], []
            for leaf, view in zip(w.leaves, w.leaf_grad_views, strict=True):
                grad = leaf.grad
                if grad is not None and grad is not view:
                    fresh.append(grad)
                    slots.append(view)
                    leaf.grad = None
            if fresh:
                torch._foreach_add_(slots, fresh)
            w.master_grad.add_(w.work_grad)
            w.work_grad.zero_()

    def zero_grads(self) -> bool:
        """Zero the masters' grads with one kernel; False when some master has no working copy
        (then the optimizer's ``zero_grad`` is needed)."""
        w = self._working
        if w is None:
            return False
        with torch.no_grad():
            w.master_grad.zero_()
        return len(w.layers) == len(self._slots)

    def working_parameters(self, group: str | None = None) -> list[torch.Tensor]:
        """The working copies the layers of ``group`` compute with (down then up per layer), for
        ``torch.autograd.grad``; empty without working copies."""
        return [
            tensor
            for slot in self._slots.values()
            if slot.layer.working is not None and (group is None or slot.group == group)
            for tensor in slot.layer.working
        ]

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
        self.sync()

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
        self.sync()
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
