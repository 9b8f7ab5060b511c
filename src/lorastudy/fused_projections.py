"""Lever ``fused_projections``: sibling projections that read the same input (``q/k/v_proj``; ``gate/up_proj``)
run as one matmul over their concatenated weights, in training as in serving (serving/fuse.py).

Why: per Llama layer and step that is 5 -> 2 GEMMs forward, 10 -> 4 backward (full FT; 5 -> 2 for LoRA's frozen
base), and one bf16 cast of the input instead of five: ~9-12 of a layer's kernels, ~300 of SmolLM2's step.

How, without touching Hugging Face's attention and MLP code: HF calls q, k, v (gate, up) in that order on the same
tensor, so the first member computes ``x @ cat(W_q, W_k, W_v)^T`` (one concatenation kernel, whose backward is
free: the weight gradients are slices of one GEMM's output) and keeps the split result; the next members return
their slices. A member called out of that order, or on another tensor, computes alone (same result, no fusion).
PEFT LoRA members add their update to their slice as lever ``lora_fused`` does (lora_fused.lora_forward: the same
masks, the scale on the GEMM's alpha), so this lever implies the fused LoRA forward for them.

Same math as separate matmuls; float32 agrees to rounding (the GEMM blocks differ), bf16 within its rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorastudy.lora_fused import is_lora_linear, lora_forward, lora_fusable, prepare_lora_layer
from lorastudy.modeling import ForwardPatches

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections that read the same input


def _base(m: nn.Module) -> nn.Module:
    return m.base_layer if is_lora_linear(m) else m


class _Group:
    """The members of one sibling set and the split output of the last fused call (consumed in order)."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.splits = [_base(m).out_features for m in members]
        self.pending: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def forward(self, k: int, fallback: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            return fallback(x, *args, **kwargs)
        if k == 0:
            w = torch.cat([_base(m).weight for m in self.members])
            self.pending = (x, F.linear(x, w).split(self.splits, -1))
        elif self.pending is None or self.pending[0] is not x:
            self.pending = None
            return fallback(x)  # not HF's call order: the plain path
        part = self.pending[1][k]
        if k == len(self.members) - 1:
            self.pending = None
        m = self.members[k]
        if not is_lora_linear(m) or m.merged or m.disable_adapters:
            return part
        if lora_fusable(m):
            return lora_forward(m, x, base=part)
        return fallback(x)  # a LoRA variant this path does not compute: PEFT's own forward


def _eligible(members: list) -> bool:
    bases = [_base(m) if m is not None else None for m in members]
    return (all(type(b) is nn.Linear and b.bias is None for b in bases)
            and len({(b.in_features, b.weight.dtype) for b in bases}) == 1)


def fuse_sibling_projections(model: nn.Module) -> Callable[[], None]:
    """Fuse every complete sibling set (``SIBLINGS``) of ``model``; returns the undo. Sets with biases or unequal
    inputs are left alone."""
    patches = ForwardPatches()
    slots: dict[str, int] = {}
    for path, mod in model.named_modules():
        for names in SIBLINGS:
            members = [getattr(mod, n, None) for n in names]
            if any(m is None for m in members) or not _eligible(members):
                continue
            group = _Group(members)
            for k, (n, m) in enumerate(zip(names, members, strict=True)):
                if is_lora_linear(m):
                    prepare_lora_layer(m, f"{path}.{n}", slots)
                fallback = m.forward  # an earlier override (e.g. lora_fused's) or the class's

                def forward(x, *args, group=group, k=k, fallback=fallback, **kwargs):
                    return group.forward(k, fallback, x, *args, **kwargs)

                patches.set(m, forward)
    return patches.undo
