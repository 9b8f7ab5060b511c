"""Serving engines behind one interface: ``engine(batch, adapter_idx) -> [B, C] class logits``; each row of a
batch names its adapter (task/seed) by index.

- ``MergedEngine``: one merged model per adapter (N tasks = N model copies); rows are served by their own model.
- ``PeftEngine``: base + N PEFT adapters, mixed-adapter batches through ``adapter_names=`` (the correctness
  reference).
- ``BatchedLoraEngine``: the project's own path: base weights once, adapters stacked, a per-row adapter index,
  LoRA applied with gathered batched matmuls, per-adapter ``score`` heads applied the same way.
- Serving optimisations given to ``merged`` and ``batched`` alike: fused sibling projections and RMSNorm
  (``fuse``, switchable back to HF's plain modules) and CUDA-graph replay for static shapes (``GraphRunner``;
  ``SplitRunner`` for merged models serving a batch that mixes adapters).
- Adapters whose tasks have different label counts: every engine returns ``[B, C_max]`` with ``-inf`` in the columns
  a row's task does not have (``heads`` explains why).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorastudy import modeling as M
from lorastudy.serving.fuse import LoraSlot, ProjectionGroup, Switch, fuse_for_serving
from lorastudy.serving.heads import StackedHeads, pad_logits


@dataclass
class Adapter:
    """One trained (or synthetic) LoRA adapter with its classification head."""

    name: str
    task: str
    num_labels: int
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])
    scaling: float
    score: torch.Tensor  # [C, H]
    path: Path | None = None  # the PEFT adapter directory it was loaded from (None: in memory only)


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


class MergedEngine(nn.Module):
    """N merged models; each row is served by its adapter's model (sub-batches per adapter present).

    Call on models already on their device and dtype (the fusions share weights by views)."""

    name = "merged"

    def __init__(self, models: list[nn.Module], fuse: bool = True):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.label_counts = [int(m.config.num_labels) for m in models]
        self.num_labels = max(self.label_counts)
        self.switch = Switch(fused=fuse)
        for m in models:
            fuse_for_serving(m, self.switch)

    def set_fused(self, fused: bool) -> None:
        """True: fused projections and norms (the serving path); False: HF's plain modules."""
        self.switch.fused = fused

    @torch.no_grad()
    def forward(self, batch: dict, adapter_idx: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
        """``present``: the adapters in this batch, when the caller knows them (saves a host sync)."""
        ids = batch["input_ids"]
        if present is None:
            present = sorted(set(adapter_idx.tolist()))
        if len(present) == 1:
            return pad_logits(M.classifier_logits(self.models[present[0]], batch).float(), self.num_labels)
        out = torch.empty((ids.shape[0], self.num_labels), device=ids.device)
        for a in present:
            rows = (adapter_idx == a).nonzero().squeeze(-1)
            sub = {k: v.index_select(0, rows) for k, v in batch.items()}
            out.index_copy_(0, rows, pad_logits(M.classifier_logits(self.models[a], sub).float(), self.num_labels))
        return out


class PeftEngine(nn.Module):
    """Base + N adapters in one PEFT model; mixed batches via ``adapter_names``."""

    name = "peft"

    def __init__(self, peft_model, adapter_names: list[str], label_counts: list[int] | None = None):
        """``label_counts``: each adapter's number of classes (the heads of ``build.peft_model`` return ``-inf``
        past them when they differ)."""
        super().__init__()
        self.model = peft_model
        self.adapter_names = adapter_names
        self.label_counts = label_counts or [int(peft_model.config.num_labels)] * len(adapter_names)
        self.num_labels = max(self.label_counts)

    def set_fused(self, fused: bool) -> None:
        """PEFT always runs HF's plain modules (the reference); only ``False`` is meaningful."""
        if fused:
            raise ValueError("the peft engine has no fused path")

    @torch.no_grad()
    def forward(self, batch: dict, adapter_idx: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
        names = [self.adapter_names[i] for i in adapter_idx.tolist()]
        return M.classifier_logits(self.model, batch, adapter_names=names).float()


class _Router:
    """The LoRA factors gathered for the current batch's rows (kind -> (A, B)), read by every LoRA group."""

    gathered: dict


class BatchedLoraEngine(nn.Module):
    """Base weights once; per kind of LoRA-carrying projection group (e.g. q/k/v with q and v targeted), the
    factors of all adapters and layers stacked as ``A[N, L, R, in]``, ``B[N, L, out, R]`` (scaling folded into B,
    lower ranks zero-padded: the same function). Per forward, one gather per kind selects each row's factors; each
    group then adds ``(x A_i^T) B_i^T`` with one bmm and one in-place baddbmm (``fuse.ProjectionGroup``).

    Hand-written: no library does per-row LoRA for sequence classification with stacked heads outside a full
    serving stack."""

    name = "batched"

    def __init__(self, base_model: nn.Module, adapters: list[Adapter], fuse: bool = True):
        """``base_model``: a plain sequence classifier on its device and dtype (its own score head is not used)."""
        super().__init__()
        self.router = _Router()
        self.switch = Switch(fused=fuse)
        self.model = base_model
        keys = sorted(adapters[0].lora)
        for a in adapters[1:]:
            if sorted(a.lora) != keys:
                raise ValueError(f"adapter {a.name} targets other modules than {adapters[0].name}")
        targeted = set(keys)
        r = max(a.lora[k][0].shape[0] for a in adapters for k in keys)
        members = fuse_for_serving(base_model, self.switch, lone=tuple(keys))
        kinds: dict[str, list[ProjectionGroup]] = {}
        for g in {id(g): g for g in (members[k] for k in keys)}.values():  # each group once, in path order
            kinds.setdefault(_kind(g, targeted), []).append(g)
        self.kinds = {}
        w0 = base_model.score.weight
        for j, (kind, groups) in enumerate(kinds.items()):
            cols = [_targeted_cols(g.paths, targeted, r) for g in groups]
            A, B = _stack_factors(groups, cols, adapters, r, w0)
            for layer, g in enumerate(groups):  # the layer index within the kind (path order, any order works)
                g.lora = LoraSlot(self.router, kind, layer, cols[layer])
            self.register_buffer(f"A_{j}", A)
            self.register_buffer(f"B_{j}", B)
            self.kinds[kind] = (f"A_{j}", f"B_{j}")
        self.heads = StackedHeads([ad.score for ad in adapters], device=w0.device, dtype=w0.dtype)
        self.label_counts, self.num_labels = self.heads.label_counts, self.heads.num_labels

    def set_fused(self, fused: bool) -> None:
        """True: fused projections (one shrink and one expand per group) and norms; False: HF's plain modules with
        one LoRA shrink and expand per targeted projection."""
        self.switch.fused = fused

    @torch.no_grad()
    def forward(self, batch: dict, adapter_idx: torch.Tensor, present: list[int] | None = None) -> torch.Tensor:
        self.router.gathered = {k: (getattr(self, a).index_select(0, adapter_idx),
                                    getattr(self, b).index_select(0, adapter_idx)) for k, (a, b) in self.kinds.items()}
        h = M.backbone(self.model)(input_ids=batch["input_ids"],
                                   attention_mask=batch.get("mask4d", batch["attention_mask"]),
                                   position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, M.read_index(batch["attention_mask"])]  # [B, H]
        return self.heads(last, adapter_idx)


def _targeted_cols(names: list[str], targeted: set[str], r: int) -> list[slice | None]:
    """Per member of a group, its r columns of the stacked rank dimension (None: not targeted)."""
    cols, c = [], 0
    for path in names:
        cols.append(slice(c, c + r) if path in targeted else None)
        c += r if path in targeted else 0
    return cols


def _stack_factors(groups: list[ProjectionGroup], cols: list[list[slice | None]], adapters: list[Adapter], r: int,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A[N, L, R, in]`` and ``B[N, L, out, R]`` for the L groups of one kind: member k's factors in its columns
    ``cols[layer][k]`` and, for B, its output rows; scaling folded into B; lower ranks zero-padded (exactly the same
    function)."""
    g0 = groups[0]
    R = r * sum(c is not None for c in cols[0])
    A = torch.zeros(len(adapters), len(groups), R, g0.weight.shape[1], device=like.device, dtype=like.dtype)
    B = torch.zeros(len(adapters), len(groups), g0.weight.shape[0], R, device=like.device, dtype=like.dtype)
    for layer, g in enumerate(groups):
        for k, (path, col) in enumerate(zip(g.paths, cols[layer], strict=True)):
            if col is None:
                continue
            off, n = g.offsets[k], g.splits[k]
            for i, ad in enumerate(adapters):
                a_, b_ = ad.lora[path]
                A[i, layer, col.start: col.start + a_.shape[0]] = a_.to(A)
                B[i, layer, off: off + n, col.start: col.start + b_.shape[1]] = (ad.scaling * b_.double()).to(B)
    return A, B


def _kind(group: ProjectionGroup, targeted: set[str]) -> str:
    """Groups of one kind stack into one tensor: same member names, shapes and targeted members."""
    short = [n.rsplit(".", 1)[-1] + ("*" if n in targeted else "") for n in group.paths]
    return "+".join(short) + f":{group.weight.shape[1]}x{group.weight.shape[0]}"


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

    def __call__(self, batch: dict, idx: torch.Tensor | None, present=None) -> torch.Tensor:
        """Copy the inputs in (``idx`` None: the captured index stays) and replay."""
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        if idx is not None:
            self.static_idx.copy_(idx, non_blocking=True)
        self.graph.replay()
        return self.out


class SplitRunner:
    """Merged models serving one batch that mixes adapters, on the serving path: each adapter's rows are gathered
    into a sub-batch padded up to the smallest captured size that holds them (copies of its first row) and run by
    that adapter's runner (a CUDA graph on GPU, ``make_runner``); the logits are scattered back. This is what a
    graph server with one model per task does; without it a mixed batch leaves the graph path and the merged
    baseline becomes a straw man (data-dependent sub-batch shapes cannot be captured).

    ``sizes``: the captured batch sizes; ``make_runner(engine, sub_batch, sub_idx, present)`` returns a callable
    ``(sub_batch, None, present) -> [s, C]`` (``GraphRunner`` on GPU; the engine itself in CPU tests). Index
    tensors are made once here, so a call has no host sync."""

    def __init__(self, engine: MergedEngine, example_batch: dict, adapter_idx: torch.Tensor, sizes,
                 make_runner=None):
        self.engine = engine
        self.num_labels = engine.num_labels
        self.rows_total = int(adapter_idx.shape[0])
        make_runner = make_runner or _eager_runner
        device = adapter_idx.device
        self.parts = []
        idx = adapter_idx.tolist()
        for a in sorted(set(idx)):
            rows = [i for i, x in enumerate(idx) if x == a]
            size = min((s for s in sizes if s >= len(rows)), default=len(rows))
            gather = torch.tensor(rows + [rows[0]] * (size - len(rows)), device=device)
            sub = {k: v.index_select(0, gather) for k, v in example_batch.items()}
            runner = make_runner(engine, sub, torch.full((size,), a, device=device), [a])
            self.parts.append((a, torch.tensor(rows, device=device), gather, len(rows), runner))

    @property
    def padded_rows(self) -> int:
        """Rows computed per call, padding included."""
        return sum(int(g.shape[0]) for _, _, g, _, _ in self.parts)

    def __call__(self, batch: dict, idx=None, present=None) -> torch.Tensor:
        """Logits ``[B, C]`` for ``batch`` laid out like the example batch (same adapter per row)."""
        out = torch.empty((self.rows_total, self.num_labels), device=batch["input_ids"].device)
        for a, rows, gather, n, runner in self.parts:
            sub = {k: v.index_select(0, gather) for k, v in batch.items()}
            out.index_copy_(0, rows, runner(sub, None, [a])[:n])
        return out


def _eager_runner(engine, sub_batch, sub_idx, present):
    """A runner without graphs: the engine on the given sub-batch (the CPU path of ``SplitRunner``)."""
    def run(batch, idx, present_=None):
        return engine(batch, sub_idx if idx is None else idx, present)
    return run
