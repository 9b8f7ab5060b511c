"""Serving-time fusions, given alike to the merged models and to the batched engine's base, so that merged vs
batched isolates the cost of LoRA.

- Sibling projections that read the same input (``q/k/v_proj``; ``gate/up_proj``) run as one matmul over a
  concatenated weight: five GEMMs per Llama layer become two.
- RMSNorm runs as ``torch.rms_norm``, one fused kernel instead of HF's ~7 elementwise ones (``fast_step``).

Why: at small batches a Llama forward is a chain of ~40 small kernels per layer whose count, not the weights read,
sets the time (kernel counts in benchmarks/serve_profile.py), so fewer kernels is the lever. Written here because
transformers fuses neither for Llama without hub kernels, which need the hub.

Switchable: with ``switch.fused = False`` a model runs HF's plain per-projection path (the "-eager" rows of the
benchmark). The projections' weights are views into the concatenated one, so both modes share memory and weights.

LoRA (the batched engine) attaches to a group: the A factors of its targeted members are stacked (one shrink bmm)
and the B factors laid out block-wise over the group's output (one expand ``baddbmm_`` into the fused output); the
rows of B that belong to untargeted members are zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorastudy.fast_step import fuse_rms_norms
from lorastudy.fused_projections import SIBLINGS  # the same sibling sets as training's fused_projections lever


@dataclass
class Switch:
    """Which path the fused modules of one model (or one engine's models) take."""

    fused: bool = True


@dataclass
class LoraSlot:
    """Where a group finds its LoRA factors for the current batch: ``router.gathered[kind]`` = (A ``[B, L, R, in]``,
    B ``[B, L, out, R]``), gathered per row by the engine; this group is layer ``layer`` of them; ``cols[k]``: the
    R-columns of member k (None: member k carries no LoRA)."""

    router: object
    kind: str
    layer: int
    cols: list[slice | None] = field(default_factory=list)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.router.gathered[self.kind]
        return a[:, self.layer], b[:, self.layer]


class ProjectionGroup:
    """Shared state of sibling projections. A plain object, not a module: its weight is registered once, through
    the members' parameters (views into it)."""

    def __init__(self, linears: list[nn.Linear], switch: Switch):
        if len({lin.in_features for lin in linears}) != 1:
            raise ValueError("sibling projections must read the same input width")
        if any(lin.bias is not None for lin in linears) and not all(lin.bias is not None for lin in linears):
            raise ValueError("sibling projections must all have a bias or none")
        self.splits = [lin.out_features for lin in linears]
        self.offsets = [sum(self.splits[:k]) for k in range(len(linears))]
        with torch.no_grad():
            self.weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
            self.bias = (torch.cat([lin.bias for lin in linears]) if len(linears) > 1 else linears[0].bias) \
                if linears[0].bias is not None else None
        self.switch = switch
        self.paths: list[str] = []  # the members' module paths, in output order (set by fuse_projections)
        self.lora: LoraSlot | None = None
        self._pending: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def fused_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All members' outputs from one matmul (plus one LoRA shrink and one expand)."""
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            a, b = self.lora.factors()  # [B, R, in], [B, out, R]
            y.baddbmm_(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        parts = y.split(self.splits, -1)
        self._pending = (x, parts)
        return parts

    def member_lora_(self, y: torch.Tensor, x: torch.Tensor, k: int) -> None:
        """Plain path: member k's own LoRA update, added into its output in place."""
        cols = self.lora.cols[k] if self.lora is not None else None
        if cols is None:
            return
        a, b = self.lora.factors()
        off = self.offsets[k]
        y.baddbmm_(torch.bmm(x, a[:, cols].transpose(1, 2)), b[:, off: off + self.splits[k], cols].transpose(1, 2))


class Projection(nn.Module):
    """Stands in for member ``k`` of a sibling group (a lone ``nn.Linear`` is a group of one).

    Fused: member 0 runs the group's matmul and returns its slice; the others return theirs from that result (HF's
    Llama calls q, k, v, and gate, up, in order on the same input; anything else raises)."""

    def __init__(self, group: ProjectionGroup, k: int):
        super().__init__()
        self.group, self.k = group, k
        off, n = group.offsets[k], group.splits[k]
        self.in_features, self.out_features = group.weight.shape[1], n
        self.weight = nn.Parameter(group.weight[off: off + n], requires_grad=False)
        self.bias = nn.Parameter(group.bias[off: off + n], requires_grad=False) if group.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if not g.switch.fused or len(g.splits) == 1:
            y = F.linear(x, self.weight, self.bias)
            g.member_lora_(y, x, self.k)
            return y
        if self.k == 0:
            return g.fused_forward(x)[0]
        if g._pending is None or g._pending[0] is not x:
            raise RuntimeError("fused projection called out of order or on another input than its first sibling")
        out = g._pending[1][self.k]
        if self.k == len(g.splits) - 1:
            g._pending = None
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, member {self.k} of {len(self.group.splits)}"


def fuse_projections(model: nn.Module, switch: Switch, lone: tuple[str, ...] = ()) -> dict[str, ProjectionGroup]:
    """Replace every complete set of sibling ``nn.Linear``s (``SIBLINGS``) by ``Projection``s of one group, and each
    path in ``lone`` outside such a set by a group of one (to carry LoRA). Returns {member path: its group}.
    Call after the model is on its device and dtype (moving it later would split the shared weight)."""
    members: dict[str, ProjectionGroup] = {}
    for path, mod in list(model.named_modules()):
        for names in SIBLINGS:
            children = [getattr(mod, n, None) for n in names]
            if all(type(c) is nn.Linear for c in children):
                group = ProjectionGroup(children, switch)
                group.paths = [f"{path}.{n}" if path else n for n in names]
                for k, (n, member) in enumerate(zip(names, group.paths, strict=True)):
                    setattr(mod, n, Projection(group, k))
                    members[member] = group
    for path in lone:
        if path in members:
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        lin = getattr(parent, attr)
        if type(lin) is not nn.Linear:
            raise ValueError(f"{path} is not an nn.Linear")
        group = ProjectionGroup([lin], switch)
        group.paths = [path]
        setattr(parent, attr, Projection(group, 0))
        members[path] = group
    return members


def fuse_for_serving(model: nn.Module, switch: Switch, lone: tuple[str, ...] = ()) -> dict[str, ProjectionGroup]:
    """Fused projections and fused RMSNorms, both following ``switch``."""
    fuse_rms_norms(model, when=lambda x, w: switch.fused)
    return fuse_projections(model, switch, lone)

