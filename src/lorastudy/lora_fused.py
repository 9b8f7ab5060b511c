"""Lever ``lora_fused``: PEFT's LoRA forward with fewer elementwise kernels.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` with dropout as ``x * (mask / (1 - p))``: besides
the three matmuls, a mask draw, a divide, a multiply, a scale and an add over activations, and under autocast one
bf16 cast of ``x`` per matmul. Here (same math, by linearity of the LoRA branch):

    out = addmm(base(x), (x * mask) @ A^T, B^T, alpha = scaling / (1 - p))

* the dropout's ``1 / (1 - p)`` and LoRA's ``scaling`` ride on the GEMM's ``alpha`` (no kernel), and the residual
  add is the GEMM's ``beta * input`` (no kernel);
* the mask is drawn exactly as ``modeling.SeededDropout`` / PEFT draw it (same generator, shape and dtype), so a
  run gets the same masks with and without the lever; the draw is a custom operator (``lorastudy::dropout_mask``),
  which torch.compile keeps as one opaque call instead of breaking the compiled layer around a generator argument;
* without dropout, ``x`` is cast to the autocast dtype once for both the base and the A matmul.

Rounding differs from PEFT's order (the scale is applied inside the GEMM's fp32 accumulation): float32 results
agree to ~1e-6 relative, bf16 within bf16 rounding. Layers PEFT configures otherwise (several active adapters,
DoRA or other variants, LoRA biases, merged or disabled adapters, extra forward arguments) keep PEFT's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorastudy.modeling import ForwardPatches

_GENERATORS: dict[int, torch.Generator] = {}  # dropout_mask's generators by id (an op cannot take a Generator)


@torch.library.custom_op("lorastudy::dropout_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_mask(x: torch.Tensor, p: float, generator_id: int, slot: int) -> torch.Tensor:
    """A {0, 1} keep-mask shaped like ``x``: ``bernoulli_(1 - p)`` drawn from the registered generator
    ``generator_id`` (-1: the default one), the very draw of ``modeling.SeededDropout``. ``slot`` tells apart the
    sibling projections that read the same ``x`` (q_proj, v_proj): without it a compiler would merge their two
    identical-looking calls into one draw."""
    if generator_id != -1 and generator_id not in _GENERATORS:
        raise RuntimeError(f"dropout_mask: no generator registered as {generator_id}")
    return torch.empty_like(x).bernoulli_(1.0 - p, generator=_GENERATORS.get(generator_id))


@dropout_mask.register_fake
def _(x: torch.Tensor, p: float, generator_id: int, slot: int) -> torch.Tensor:
    return torch.empty_like(x)


def _generator_id(gen: torch.Generator | None) -> int:
    if gen is None:
        return -1
    _GENERATORS.setdefault(id(gen), gen)
    return id(gen)


def _fusable(layer: nn.Module) -> bool:
    a = layer.active_adapters
    return (len(a) == 1 and a[0] in layer.lora_A and a[0] not in getattr(layer, "lora_variant", {})
            and isinstance(layer.base_layer, nn.Linear) and not getattr(layer, "fan_in_fan_out", False)
            and layer.lora_B[a[0]].bias is None and layer.lora_A[a[0]].bias is None)


def fused_lora_forward(layer: nn.Module, peft_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward of one PEFT ``lora.Linear`` (x: [..., in] -> [..., out]); see the module docstring."""
    if args or kwargs or layer.disable_adapters or layer.merged or not _fusable(layer):
        return peft_forward(x, *args, **kwargs)
    return lora_forward(layer, x)


def lora_forward(layer: nn.Module, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """``base + LoRA(x)`` of a fusable ``lora.Linear`` prepared by ``prepare_lora_layer``; ``base``: the base
    layer's output when it was computed already (fused sibling projections), else computed here."""
    name = layer.active_adapters[0]
    lora_a, lora_b, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    p = float(getattr(drop, "p", 0.0)) if drop.training else 0.0
    alpha = layer.scaling[name] / (1.0 - p)
    if p > 0:
        # the very draw of SeededDropout / nn.Dropout's bernoulli path: same generator, shape, dtype
        keep = dropout_mask(x.detach(), p, layer._lorastudy_generator, layer._lorastudy_slot)
        if base is None:
            base = layer.base_layer(x)
        h = F.linear(x * keep, lora_a.weight)
    else:
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
            x = x.to(torch.get_autocast_dtype(dev))  # one cast for both matmuls (autocast would cast twice)
        if base is None:
            base = layer.base_layer(x)
        h = F.linear(x, lora_a.weight)
    out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t(), alpha=alpha)
    return out.view(base.shape)


def prepare_lora_layer(m: nn.Module, name: str, slots: dict[str, int]) -> None:
    """Give a ``lora.Linear`` (at module path ``name``) what ``lora_forward`` reads: its mask slot (the same small
    number for the same projection in every layer: compiled code is shared by the layers) and its dropout
    generator's id, resolved here and not in the forward (under torch.compile id() of a traced object is not the
    object's), so the dropout generator must be set (modeling.seed_dropout) before."""
    m._lorastudy_slot = slots.setdefault(name.rsplit(".", 1)[-1], len(slots))
    drops = list(m.lora_dropout.values())
    m._lorastudy_generator = _generator_id(getattr(drops[0], "generator", None)) if len(drops) == 1 else -1


def is_lora_linear(m: nn.Module) -> bool:
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # no PEFT installed: no LoRA layers
        return False
    return type(m) is LoraLinear


def lora_fusable(m: nn.Module) -> bool:
    """A ``lora.Linear`` whose forward ``lora_forward`` computes (one active vanilla adapter, not merged)."""
    return is_lora_linear(m) and not m.disable_adapters and not m.merged and _fusable(m)


def fuse_lora_layers(model: nn.Module) -> Callable[[], None]:
    """Route every PEFT ``lora.Linear`` of ``model`` through ``fused_lora_forward``; returns the undo.
    A model without LoRA layers is left alone."""
    patches, slots = ForwardPatches(), {}
    for name, m in model.named_modules():
        if is_lora_linear(m) and "forward" not in vars(m):
            prepare_lora_layer(m, name, slots)

            def forward(x, *args, m=m, peft_forward=m.forward, **kwargs):
                return fused_lora_forward(m, peft_forward, x, *args, **kwargs)

            patches.set(m, forward)
    return patches.undo
