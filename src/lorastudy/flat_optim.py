"""Lever ``flat_optimizer``: trainable parameters and their gradients as views into one flat fp32 buffer each, so
that clipping is one norm and one scale and AdamW is one fused multi-tensor kernel over one tensor per group.

Why: the per-tensor path launches foreach kernels in chunks over ~270 tensors (norms, scale, AdamW, zeroing), and
the bf16 copies of lever ``bf16_weights`` refresh in one copy only when their masters are contiguous. The
arithmetic is the same: AdamW is elementwise (the same fused kernel over a longer tensor), and the clipping norm is
the same 2-norm summed in another order (float32 rounding only).

The optimizer built by ``training.make_optimizer`` stays the caller's (its learning-rate scheduler keeps writing
its groups' ``lr``); ``FlatParams.optimizer`` builds an AdamW with the same hyperparameters over the flat group
tensors, sharing the caller's learning-rate tensors (CUDA graphs) or copying its float learning rates before each
step (``sync_lr``). ``unflatten`` gives every parameter its own storage again (for saving: safetensors refuses
tensors that share memory).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from torch import nn


class FlatParams:
    """The trainable parameters of ``opt``'s groups laid out group by group in one flat buffer.

    ``first``: parameters placed at the start of their group, in this order (the compute-copied weights of
    ``bf16_weights``, so that their masters form one contiguous block). Raises ValueError for an optimizer other
    than AdamW, parameters of several dtypes or devices, or ``params`` that are not the optimizer's."""

    def __init__(self, opt: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                 first: Iterable[torch.Tensor] = ()) -> None:
        if type(opt) is not torch.optim.AdamW:
            raise ValueError(f"flat_optimizer needs torch.optim.AdamW, got {type(opt).__name__}")
        in_opt = [p for g in opt.param_groups for p in g["params"]]
        if {id(p) for p in in_opt} != {id(p) for p in params} or len(in_opt) != len(params):
            raise ValueError("flat_optimizer: the step's parameters must be exactly the optimizer's")
        if len({(p.dtype, p.device) for p in in_opt}) != 1:
            raise ValueError("flat_optimizer: parameters of several dtypes or devices")
        rank = {id(p): i for i, p in enumerate(first)}
        self.opt_src = opt
        self.order: list[nn.Parameter] = []
        self.group_bounds: list[tuple[int, int]] = []
        self.first_end: list[int] = []  # per group: where its leading (compute-copied) parameters end
        for g in opt.param_groups:
            lead = sorted((p for p in g["params"] if id(p) in rank), key=lambda p: rank[id(p)])
            rest = [p for p in g["params"] if id(p) not in rank]
            start = sum(p.numel() for p in self.order)
            self.order += lead + rest
            self.first_end.append(start + sum(p.numel() for p in lead))
            self.group_bounds.append((start, sum(p.numel() for p in self.order)))
        p0 = in_opt[0]
        total = sum(p.numel() for p in self.order)
        self.data = torch.empty(total, dtype=p0.dtype, device=p0.device)
        self.grad = torch.zeros(total, dtype=p0.dtype, device=p0.device)
        offset = 0
        with torch.no_grad():
            for p in self.order:
                n = p.numel()
                self.data[offset:offset + n].copy_(p.detach().reshape(-1))
                p.data = self.data[offset:offset + n].view_as(p)
                p.grad = self.grad[offset:offset + n].view_as(p)
                offset += n
        # one leaf tensor per group (a view of a buffer that needs no grad is a leaf), its .grad the grad view
        self.groups: list[torch.Tensor] = []
        for s, e in self.group_bounds:
            t = self.data[s:e]
            t.grad = self.grad[s:e]
            self.groups.append(t)
        self.opt: torch.optim.Optimizer | None = None

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the flat group tensors with the source optimizer's hyperparameters (fused/foreach and
        capturable as it was); tensor learning rates are shared, so its scheduler drives this one too."""
        src = self.opt_src
        groups = []
        for t, g in zip(self.groups, src.param_groups, strict=True):
            groups.append({"params": [t], **{k: v for k, v in g.items() if k != "params"}})
        accepted = inspect.signature(torch.optim.AdamW).parameters
        kw = {k: v for k, v in src.defaults.items() if k in accepted and k != "params"}
        self.opt = torch.optim.AdamW(groups, **kw)
        src._opt_called = True  # its scheduler checks that it stepped: its flat twin steps in its place
        for dst, g in zip(self.opt.param_groups, src.param_groups, strict=True):
            if isinstance(g["lr"], torch.Tensor) and dst["lr"] is not g["lr"]:
                raise RuntimeError("flat_optimizer: the learning-rate tensor was not shared with the scheduler's")
        return self.opt

    def sync_lr(self) -> None:
        """Copy the source optimizer's (float) learning rates into the flat one (its scheduler wrote them)."""
        for dst, src in zip(self.opt.param_groups, self.opt_src.param_groups, strict=True):
            if dst["lr"] is not src["lr"]:
                dst["lr"] = src["lr"]

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to total 2-norm ``max_norm`` (torch's clip_grad_norm_ over the group tensors: one
        norm each, their norm, one scale each); returns the total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.groups, max_norm, foreach=True)

    def zero_grad_(self, skip_leading: bool) -> None:
        """Zero the gradients; ``skip_leading``: not those of each group's leading parameters (overwritten by
        ``ComputeWeights.collect_grads`` every step)."""
        if not skip_leading:
            self.grad.zero_()
            return
        for (_, e), f in zip(self.group_bounds, self.first_end, strict=True):
            if e > f:
                self.grad[f:e].zero_()

    @torch.no_grad()
    def unflatten(self) -> None:
        """Give every parameter its own storage again (values kept; gradients dropped)."""
        for p in self.order:
            p.data = p.data.clone()
            p.grad = None
