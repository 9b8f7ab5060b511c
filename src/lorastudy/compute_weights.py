"""Lever ``bf16_weights``: compute-dtype copies of a model's Linear weights, refreshed once per optimizer step.

Why: under bf16 autocast every matmul casts its fp32 weight to bf16 (one kernel), and in full FT its weight gradient
comes back through that cast (a bf16 -> fp32 kernel) and is added to the persistent ``.grad`` (another): three
kernels per Linear per step, ~630 of SmolLM2's ~3,800 (the profile in benchmarks/results/RESULTS.md). Here each
Linear weight has a copy in the compute dtype, laid out in one flat buffer:

* frozen weights (LoRA's base) are cast once: they never change;
* trainable weights are refreshed from their fp32 masters after each optimizer step, as one copy when the masters
  are contiguous (lever ``flat_optimizer`` lays them out so) or one ``_foreach_copy_`` otherwise;
* during the forward the copies are swapped into the modules (``swapped()``), so the model's own code runs and
  autocast finds weights already in bf16 (no cast). The copies of trainable weights are autograd leaves whose
  ``.grad`` starts empty, so autograd hands them the matmul's bf16 gradient without a copy; ``collect_grads``
  then writes all of them into the fp32 masters' gradients with one ``_foreach_copy_`` and lets them go.

Same numbers as autocast: autocast's cast of an fp32 weight gives exactly this copy, and its backward turns the
same bf16 gradient into fp32 (exact) and adds it to a zero gradient (exact). PEFT's LoRA layers would cast their
input to the LoRA weights' dtype (``_cast_input_dtype``), which autocast did not: that cast is switched off while
swapped, so dropout still sees the fp32 input. Outside ``swapped()`` the model holds its fp32 masters: saving, the
best-checkpoint copy and the eager path see nothing of this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def linear_weights(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, weight) of every ``nn.Linear`` with a floating-point weight (PEFT's base layers, LoRA factors and
    score heads are ``nn.Linear`` too), in module order."""
    return [(m, m.weight) for m in model.modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, nn.Parameter) and m.weight.is_floating_point()]


def _is_lora_layer(m: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT, no LoRA layers
        return False
    return isinstance(m, LoraLayer)


def _contiguous_block(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view over ``tensors`` when they lie back to back in one storage in this order, else None."""
    if not tensors:
        return None
    first = tensors[0]
    ptr = first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != ptr or t.untyped_storage().data_ptr() != \
                first.untyped_storage().data_ptr():
            return None
        ptr += t.numel() * t.element_size()
    return first.detach().as_strided((sum(t.numel() for t in tensors),), (1,))


class ComputeWeights:
    """Compute-dtype copies of ``model``'s Linear weights (see the module docstring).

    ``dtype``: the compute dtype (bf16 under autocast; float32 gives the same structure without rounding, which is
    how CPU tests check it). ``order``: trainable masters in this order first (the flat optimizer's layout, so that
    a refresh is one copy). Use ``acquire``/``release`` to share one instance between a model's train step and its
    evaluation forward."""

    _ATTR = "_lorastudy_compute_weights"

    def __init__(self, model: nn.Module, dtype: torch.dtype, order: Sequence[torch.Tensor] = ()) -> None:
        entries = linear_weights(model)
        if not entries:
            raise ValueError("bf16_weights: the model has no Linear layers")
        rank = {id(p): i for i, p in enumerate(order)}
        trainable = sorted((e for e in entries if e[1].requires_grad), key=lambda e: rank.get(id(e[1]), len(rank)))
        frozen = [e for e in entries if not e[1].requires_grad]
        self.dtype, self.users, self.epoch = dtype, 0, 0
        self.modules = [m for m, _ in trainable + frozen]
        self.masters = [p for _, p in trainable + frozen]
        self.n_trainable = len(trainable)
        device = self.masters[0].device
        self.flat = torch.empty(sum(p.numel() for p in self.masters), dtype=dtype, device=device)
        self.copies: list[nn.Parameter] = []
        offset = 0
        with torch.no_grad():
            for p in self.masters:
                view = self.flat[offset:offset + p.numel()].view_as(p)
                view.copy_(p)  # frozen weights: the only copy they get
                self.copies.append(nn.Parameter(view, requires_grad=p.requires_grad))
                offset += p.numel()
        self.lora_layers = [m for m in model.modules() if _is_lora_layer(m)]
        self._plan()

    # -- sharing between the train step and the evaluation forward --------------------------------------------
    @classmethod
    def acquire(cls, model: nn.Module, dtype: torch.dtype, order: Sequence[torch.Tensor] = ()) -> ComputeWeights:
        """The model's instance (created on first use; ``dtype`` must match); counts a user."""
        cw = getattr(model, cls._ATTR, None)
        if cw is None:
            cw = cls(model, dtype, order)
            setattr(model, cls._ATTR, cw)
        elif cw.dtype != dtype:
            raise ValueError(f"compute weights exist in {cw.dtype}, asked for {dtype}")
        cw.users += 1
        return cw

    def release(self, model: nn.Module) -> None:
        """Drop a user; the last one frees the copies."""
        self.users -= 1
        if self.users <= 0 and getattr(model, self._ATTR, None) is self:
            delattr(model, self._ATTR)

    def _plan(self) -> None:
        tm = self.masters[:self.n_trainable]
        self._src_block = _contiguous_block([p.detach() for p in tm])
        self._dst_block = self.flat[:sum(p.numel() for p in tm)]

    def relayout(self) -> None:
        """The masters moved (the flat optimizer gave them their own storage again): re-plan the refresh copy and
        bump ``epoch`` (a captured graph that refreshes must be captured again)."""
        self._plan()
        self.epoch += 1

    # -- per step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the trainable fp32 masters into their compute copies (one kernel when contiguous)."""
        if not self.n_trainable:
            return
        if self._src_block is not None:
            self._dst_block.copy_(self._src_block)
        else:
            torch._foreach_copy_([c.detach() for c in self.copies[:self.n_trainable]],
                                 [p.detach() for p in self.masters[:self.n_trainable]])

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Write the compute copies' gradients (bf16, from this backward) into the masters' ``.grad`` (one foreach
        copy, exact) and release them, so that the next backward hands over fresh ones without a kernel.
        Raises RuntimeError if a trainable master has no ``.grad`` buffer."""
        src, dst, unused = [], [], []
        for c, p in zip(self.copies[:self.n_trainable], self.masters[:self.n_trainable], strict=True):
            if p.grad is None:
                raise RuntimeError("bf16_weights: a trainable weight has no gradient buffer")
            if c.grad is None:  # not used by this forward: its gradient is zero, as with autocast
                unused.append(p.grad)
            else:
                src.append(c.grad)
                dst.append(p.grad)
        if src:
            torch._foreach_copy_(dst, src)
        if unused:
            torch._foreach_zero_(unused)
        for c in self.copies[:self.n_trainable]:
            c.grad = None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: every Linear holds its compute copy as ``weight`` (PEFT's input cast off); restored on exit."""
        saved_cast = [(m, getattr(m, "cast_input_dtype_enabled", True)) for m in self.lora_layers]
        for m, c in zip(self.modules, self.copies, strict=True):
            m._parameters["weight"] = c
        for m, _ in saved_cast:
            m.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for m, p in zip(self.modules, self.masters, strict=True):
                m._parameters["weight"] = p
            for m, v in saved_cast:
                m.cast_input_dtype_enabled = v
