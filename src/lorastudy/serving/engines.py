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
    """``y = x W^T + (x A[i]^T) (s_i B[i])^T`` with ``i`` the row's adapter.

    The factors of every layer of one shape group are stacked and gathered for the batch once per forward (by the
    engine); a layer reads its slice of that gather, so per layer only two kernels run: a bmm and a baddbmm that adds
    the update to the base output. The scaling is folded into B at build time."""

    def __init__(self, base: nn.Linear, router: _Router, group: str, slot: int):
        super().__init__()
        self.base, self.router, self.group, self.slot = base, router, group, slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.router.gathered[self.group]  # [B, G, r, in], [B, G, out, r]
        xa = torch.bmm(x, a[:, self.slot].transpose(1, 2))  # [B, S, r]
        return torch.baddbmm(y, xa, b[:, self.slot].transpose(1, 2))


class _Router:
    """The per-row adapter index of the current forward and the factors gathered for it, read by every LoRA layer."""

    idx: torch.Tensor
    gathered: dict


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
        r = max(a.lora[k][0].shape[0] for a in adapters for k in keys)
        groups: dict[str, list[str]] = {}
        for key in keys:
            lin = base_model.get_submodule(key)
            groups.setdefault(f"{lin.in_features}x{lin.out_features}", []).append(key)
        self.groups = {}
        for gname, gkeys in groups.items():
            lin0 = base_model.get_submodule(gkeys[0])
            dev, dt = lin0.weight.device, lin0.weight.dtype
            # lower ranks are zero-padded so every adapter stacks (exactly the same function)
            A = torch.zeros(len(adapters), len(gkeys), r, lin0.in_features, device=dev, dtype=dt)
            B = torch.zeros(len(adapters), len(gkeys), lin0.out_features, r, device=dev, dtype=dt)
            for j, key in enumerate(gkeys):
                for i, ad in enumerate(adapters):
                    a_, b_ = ad.lora[key]
                    A[i, j, : a_.shape[0]] = a_.to(dev, dt)
                    B[i, j, :, : b_.shape[1]] = (ad.scaling * b_.double()).to(dev, dt)
                parent_path, attr = key.rsplit(".", 1)
                parent = base_model.get_submodule(parent_path)
                setattr(parent, attr, BatchedLoraLinear(getattr(parent, attr), self.router, gname, j))
            self.register_buffer(f"A_{gname}", A)
            self.register_buffer(f"B_{gname}", B)
            self.groups[gname] = (f"A_{gname}", f"B_{gname}")
        w = base_model.score.weight
        heads = torch.zeros(len(adapters), self.num_labels, w.shape[1], device=w.device, dtype=w.dtype)
        for i, ad in enumerate(adapters):
            heads[i, : ad.num_labels] = ad.score.to(w.device, w.dtype)
        self.register_buffer("heads", heads)  # [N, C, H]

    @torch.no_grad()
    def forward(self, batch: dict, adapter_idx: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
        self.router.idx = adapter_idx
        self.router.gathered = {g: (getattr(self, a).index_select(0, adapter_idx),
                                    getattr(self, b).index_select(0, adapter_idx)) for g, (a, b) in self.groups.items()}
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
