"""Per-adapter classification heads applied per row, and the logits representation shared by every engine.

Representation of a batch's logits when its adapters' tasks have different label counts: one ``[B, C_max]`` tensor,
``C_max`` the largest label count among the engine's adapters; row i's first ``C_task(i)`` columns are its task's
logits and the rest are ``-inf`` ("no such class"). Softmax gives those columns probability 0 and argmax never picks
them, so a 2-class row can never predict a third class (a zero-padded column would, whenever both real logits are
negative). ``own_logits`` returns each row's logits without the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NO_CLASS = float("-inf")


def pad_logits(logits: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, C]`` -> ``[B, width]`` with ``-inf`` in the columns past C (unchanged when C == width)."""
    if logits.shape[-1] == width:
        return logits
    return F.pad(logits, (0, width - logits.shape[-1]), value=NO_CLASS)


def own_logits(logits: torch.Tensor, adapter_idx, label_counts: list[int]) -> list[torch.Tensor]:
    """Each row's own task's logits (``[C_task]`` per row), the ``-inf`` padding dropped."""
    return [logits[i, : label_counts[int(a)]] for i, a in enumerate(adapter_idx)]


def logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the classes both define; ``inf`` when one defines a class the other does not (a phantom
    logit), 0.0 for empty inputs."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        return float("inf")
    pa, pb = torch.isneginf(a), torch.isneginf(b)
    if not torch.equal(pa, pb):
        return float("inf")
    keep = ~pa
    return float((a[keep] - b[keep]).abs().max()) if keep.any() else 0.0


class StackedHeads(nn.Module):
    """N score heads stacked as ``[N, C_max, H]`` (smaller heads zero-padded, their extra columns set to ``-inf`` by
    an additive mask); ``forward(hidden [B, H], adapter_idx [B]) -> [B, C_max]`` float32 logits with one gather and
    one batched matmul. The mask is added only when label counts differ (no extra kernels otherwise)."""

    def __init__(self, heads: list[torch.Tensor], device=None, dtype=None):
        super().__init__()
        if not heads:
            raise ValueError("StackedHeads needs at least one head")
        hidden = {h.shape[1] for h in heads}
        if len(hidden) != 1:
            raise ValueError(f"heads read different hidden sizes {sorted(hidden)}")
        self.label_counts = [int(h.shape[0]) for h in heads]
        c = max(self.label_counts)
        w = torch.zeros(len(heads), c, hidden.pop(), device=device, dtype=dtype or heads[0].dtype)
        for i, h in enumerate(heads):
            w[i, : h.shape[0]] = h.to(w.device, w.dtype)
        self.register_buffer("weight", w)
        if len(set(self.label_counts)) > 1:
            mask = torch.zeros(len(heads), c, device=w.device, dtype=torch.float32)
            for i, n in enumerate(self.label_counts):
                mask[i, n:] = NO_CLASS
            self.register_buffer("mask", mask)
        else:
            self.mask = None

    @property
    def num_labels(self) -> int:
        return self.weight.shape[1]

    def forward(self, hidden: torch.Tensor, adapter_idx: torch.Tensor) -> torch.Tensor:
        w = self.weight.index_select(0, adapter_idx)  # [B, C, H]
        out = torch.bmm(w, hidden.to(w.dtype).unsqueeze(-1)).squeeze(-1).float()
        if self.mask is not None:
            out = out + self.mask.index_select(0, adapter_idx)
        return out
