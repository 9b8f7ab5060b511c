"""Serving engines behind one interface: ``engine(batch, adapter_idx) -> [B, C] class logits``; each row of a
batch names its adapter (task/seed) by index.

- ``MergedEngine``: one merged model per adapter (N tasks = N model copies); rows are served by their own model.
- ``PeftEngine``: base + N PEFT adapters, mixed-adapter batches through ``adapter_names=`` (the correctness
  reference).
- ``BatchedLoraEngine``: the project's own path: base weights once, adapters stacked ``A[N, r, in]``,
  ``B[N, out, r]``, a per-row adapter index, LoRA applied with gathered batched matmuls, per-adapter ``score`` heads
  applied the same way. No library does per-row LoRA for sequence classification with stacked heads outside a full
  serving stack, hence hand-written.
- Optional CUDA-graph replay for static shapes (``GraphRunner``), given to ``merged`` and ``batched`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorastudy import modeling as M


@dataclass
class Adapter:
    """One trained (or synthetic) LoRA adapter with its classification head."""

    name: str
    task: str
    num_labels: int
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])
    scaling: float
    score: torch.Tensor  # [C, H]


def adapter_from_peft(peft_model, name: str, task: str, adapter_name: str = "default") -> Adapter:
    """Pull LoRA factors, scaling and the trained score head out of a PEFT classifier."""
    lora, scaling = {}, None
    for path, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and adapter_name in mod.lora_A:
            key = path.split("base_model.model.", 1)[-1]
            lora[key] = (mod.lora_A[adapter_name].weight.detach().clone(),
                         mod.lora_B[adapter_name].weight.detach().clone())
            scaling = mod.scaling[adapter_name]
    score = None
    for path, mod in peft_model.named_modules():
        if path.endswith("score") and hasattr(mod, "modules_to_save"):
            score = mod.modules_to_save[adapter_name].weight.detach().clone()
    if score is None:
        raise ValueError(f"adapter {name}: no trained score head (modules_to_save) found")
    return Adapter(name, task, score.shape[0], lora, float(scaling), score)


def pooled_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row (left or right padding)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (pos * attention_mask).argmax(-1)


class MergedEngine(nn.Module):
    """N merged models; each row is served by its adapter's model (sub-batches per adapter present)."""

    name = "merged"

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.num_labels = max(m.config.num_labels for m in models)

    @torch.no_grad()
    def forward(self, batch: dict, adapter_idx: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
        """``present``: the adapters in this batch, when the caller knows them (saves a host sync)."""
        ids = batch["input_ids"]
        if present is None:
            present = sorted(set(adapter_idx.tolist()))
        if len(present) == 1:
            return M.classifier_logits(self.models[present[0]], batch).float()
        out = torch.empty((ids.shape[0], self.num_labels), device=ids.device)
        for a in present:
            rows = (adapter_idx == a).nonzero().squeeze(-1)
            sub = {k: v.index_select(0, rows) for k, v in batch.items()}
            out[rows] = M.classifier_logits(self.models[a], sub).float()
        return out


class PeftEngine(nn.Module):
    """Base + N adapters in one PEFT model; mixed batches via ``adapter_names``."""

    name = "peft"

    def __init__(self, peft_model, adapter_names: list[str]):
        super().__init__()
        self.model = peft_model
        self.adapter_names = adapter_names

    @torch.no_grad()
    def forward(self, batch: dict, adapter_idx: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
        names = [self.adapter_names[i] for i in adapter_idx.tolist()]
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("mask4d", batch["attention_mask"]),
                          position_ids=batch["position_ids"], use_cache=False, adapter_names=names).logits.float()


class BatchedLoraLinear(nn.Module):
    """``y = x W^T + scale[i] * (x A[i]^T) B[i]^T`` with ``i`` the row's adapter; A, B stacked over adapters."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, router: _Router):
        super().__init__()
        self.base = base
        self.register_buffer("a", a)  # [N, r, in]
        self.register_buffer("b", b)  # [N, out, r]
        self.register_buffer("scale", scale)  # [N]
        self.router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        idx = self.router.idx
        a = self.a.index_select(0, idx)  # [B, r, in]
        b = self.b.index_select(0, idx) * self.scale.index_select(0, idx)[:, None, None]  # [B, out, r]
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class _Router:
    """Holds the per-row adapter index for the current forward (set once per batch, read by every LoRA layer)."""

    idx: torch.Tensor


class BatchedLoraEngine(nn.Module):
    name = "batched"

    def __init__(self, base_model: nn.Module, adapters: list[Adapter]):
        """``base_model``: a plain sequence classifier (its own score head is not used)."""
        super().__init__()
        self.router = _Router()
        self.model = base_model
        self.num_labels = max(a.num_labels for a in adapters)
        keys = sorted(adapters[0].lora)
        for a in adapters[1:]:
            if sorted(a.lora) != keys:
                raise ValueError(f"adapter {a.name} targets other modules than {adapters[0].name}")
        ranks = {a.lora[k][0].shape[0] for a in adapters for k in keys}
        r = max(ranks)
        for key in keys:
            parent_path, attr = key.rsplit(".", 1)
            parent = base_model.get_submodule(parent_path)
            lin = getattr(parent, attr)
            dev, dt = lin.weight.device, lin.weight.dtype
            # pad lower ranks with zeros so all adapters stack (exactly the same function)
            A = torch.zeros(len(adapters), r, lin.in_features, device=dev, dtype=dt)
            B = torch.zeros(len(adapters), lin.out_features, r, device=dev, dtype=dt)
            for i, ad in enumerate(adapters):
                a_, b_ = ad.lora[key]
                A[i, : a_.shape[0]] = a_.to(dev, dt)
                B[i, :, : b_.shape[1]] = b_.to(dev, dt)
            scale = torch.tensor([ad.scaling for ad in adapters], device=dev, dtype=dt)
            setattr(parent, attr, BatchedLoraLinear(lin, A, B, scale, self.router))
        w = base_model.score.weight
        heads = torch.zeros(len(adapters), self.num_labels, w.shape[1], device=w.device, dtype=w.dtype)
        for i, ad in enumerate(adapters):
            heads[i, : ad.num_labels] = ad.score.to(w.device, w.dtype)
        self.register_buffer("heads", heads)  # [N, C, H]

    @torch.no_grad()
    def forward(self, batch: dict, adapter_idx: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
        self.router.idx = adapter_idx
        h = M.backbone(self.model)(input_ids=batch["input_ids"],
                                   attention_mask=batch.get("mask4d", batch["attention_mask"]),
                                   position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, pooled_index(batch["attention_mask"])]  # [B, H]
        heads = self.heads.index_select(0, adapter_idx)  # [B, C, H]
        return torch.bmm(heads, last.unsqueeze(-1)).squeeze(-1).float()


class GraphRunner:
    """CUDA-graph replay of ``engine(batch, idx)`` for one static shape (batch size x seq len). Inputs are copied
    into static buffers; the graph replays every kernel with no launch overhead."""

    def __init__(self, engine, example_batch: dict, example_idx: torch.Tensor, present=None, warmup: int = 3):
        self.engine, self.present = engine, present
        self.static = {k: v.clone() for k, v in example_batch.items()}
        self.static_idx = example_idx.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                engine(self.static, self.static_idx, present)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = engine(self.static, self.static_idx, present)

    def __call__(self, batch: dict, idx: torch.Tensor, present=None) -> torch.Tensor:
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        self.static_idx.copy_(idx, non_blocking=True)
        self.graph.replay()
        return self.out
