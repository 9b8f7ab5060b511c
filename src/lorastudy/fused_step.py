"""The fused step: the stacked modules, the weights of a fused group and its static training step (fused.py).

``FusedModel`` turns one Hugging Face classifier into a model of N runs: its parameter-holding modules are replaced
by stacked ones (``plan_modules``): for LoRA the target Linears by ``FusedLoraLinear`` (the base frozen and shared,
its matmul weights stored once in the compute dtype, i.e. the values autocast casts to; per run ``A[N, r, in]``,
``B[N, out, r]``, scaling alpha/r and dropout) and the score head by a ``FusedLinear``; for full FT every Linear,
the embedding and every RMSNorm. Inputs are run-major, ``N x R`` rows: a stacked module views them as
``[N, R x S, in]`` and applies batched matmuls, so run n's rows meet only run n's weights; attention, rotary
embeddings and pooling work row by row as in the plain model.

The trainable weights (``_Bank``) are fp32 masters in two flat ``[N, P]`` buffers (weight decay / none) of which
the module weights are views; compute copies (bf16 on GPU) are refreshed once per optimizer step, where the plain
path casts inside each matmul: the same values. ``FusedStepper`` is the static step over these: each run's loss is
the mean over its real rows, gradients are clipped per run on the run's own norm (``clip_grad_norm_``'s formula),
weight decay is applied with each run's own lr x decay, and AdamW runs with a parameter group per run (its learning
rate, step count). On CUDA the forward+backward (per padded width), the optimizer step and the evaluation forward
(per width and number of slots evaluated) are captured as CUDA graphs with fast_step's ``_Replayable``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorastudy import fused_adamw
from lorastudy import modeling as M
from lorastudy.fast_step import _Replayable, fuse_rms_norms, h2d
from lorastudy.step_levers import StepLevers, prepare_model

# Step levers (step_levers.py) the fused step applies. ``bf16_weights`` and ``flat_optimizer`` are how the fused
# step always works (compute copies refreshed once per optimizer step; flat [N, P] buffers, one clipping and AdamW
# pass); ``lora_fused``, ``fused_projections`` and ``compile`` act on plain PEFT / HF modules that a fused group
# replaces by stacked ones, so they do not apply here.
FUSED_LEVERS = frozenset({"fused_kernels"})
INHERENT_LEVERS = frozenset({"bf16_weights", "flat_optimizer"})

# The stacked weights are views into flat [N, P] buffers (so per-run operations are one kernel per buffer); their
# gradients are views with the same strides, which autograd's layout check flags as possibly slower. It is not.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class FusionError(ValueError):
    """A model or a run that a fused group cannot take (unsupported module type, too many rows, other labels)."""


# -- stacked modules ---------------------------------------------------------------------------------------------
class _Slots:
    """State shared by the stacked modules of one group: how many runs the current forward carries and which slots
    (``index``: an evaluation forward on a subset gathers their weights), and the step's dropout masks."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.index: torch.Tensor | None = None  # [K] slot ids of an evaluation forward
        self.masks: dict[int, torch.Tensor] | None = None  # in_features -> [N, modules, R, S, in] (training)
        self.uses: dict[int, int] = {}  # id(stacked weight) -> uses in this training forward (see _StackedMatmul)

    def use(self, weight: torch.Tensor) -> None:
        """Count a training use of a stacked weight whose gradient is written, not added (``_StackedMatmul``): a
        second use in one forward would overwrite the first's gradient. Counted while Python runs the step (the
        static path, graph warm-up and capture), so a model that reuses a weight fails before a graph replays."""
        k = id(weight)
        self.uses[k] = self.uses.get(k, 0) + 1
        if self.uses[k] > 1:
            raise FusionError("a stacked weight is used twice in one forward (tied weights?): fused.py writes each "
                              "weight's gradient once per step; this model cannot be fused (train.fuse=off)")

    @property
    def count(self) -> int:
        return self.n if self.index is None else int(self.index.numel())


class _StackedMatmul(torch.autograd.Function):
    """``y[n] = x[n] @ w[n]^T`` for every run n (a batched matmul), computed with ``compute`` (the compute-dtype copy
    of ``master``, refreshed once per optimizer step: the values autocast would cast inside the matmul). The
    gradient of ``master`` is written straight into ``grad_buf`` (its view of the group's gradient buffer, see
    ``_Bank``): computed in the compute dtype as autocast's matmul computes it, stored in the buffer's dtype (a bf16
    buffer holds it exactly). Why not return it: autograd would cast it to fp32 and add it into the buffer, three
    more passes over every weight; each stacked weight is used once per forward, so writing replaces adding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, master: torch.Tensor, compute: torch.Tensor, grad_buf: torch.Tensor
                ) -> torch.Tensor:
        xc = x.to(compute.dtype)
        ctx.save_for_backward(xc, compute)
        ctx.x_dtype, ctx.grad_buf = x.dtype, grad_buf
        return torch.bmm(xc, compute.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xc, w = ctx.saved_tensors
        g = g.to(w.dtype)
        gx = torch.bmm(g, w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        buf = ctx.grad_buf
        if buf.dtype == w.dtype:
            torch.bmm(g.transpose(1, 2), xc, out=buf)
        else:
            buf.copy_(torch.bmm(g.transpose(1, 2), xc))
        return gx, None, None, None


class _StackedLookup(torch.autograd.Function):
    """``weight[run[n], ids[n]]``: each run's rows look up its own table; the backward adds the rows' gradients
    into ``grad_buf`` (the table's view of the zeroed gradient buffer) instead of building a dense
    ``[N, vocab, hidden]`` gradient and adding that (what the backward of advanced indexing does: 3 passes over
    every run's table)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, run: torch.Tensor, ids: torch.Tensor, grad_buf: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(run, ids)
        ctx.grad_buf = grad_buf
        return weight[run, ids]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        run, ids = ctx.saved_tensors
        ctx.grad_buf.index_put_((run.expand_as(ids), ids), g.to(ctx.grad_buf.dtype), accumulate=True)
        return None, None, None, None


class FusedLinear(nn.Module):
    """A Linear with one weight (and bias) per run: ``[N, out, in]``, applied as a batched matmul."""

    def __init__(self, slots: _Slots, linear: nn.Linear) -> None:
        super().__init__()
        self.slots, self.in_features, self.out_features = slots, linear.in_features, linear.out_features
        self.has_bias = linear.bias is not None
        self.weight_c: torch.Tensor | None = None  # compute copy and gradient views (set by FusedModel)
        self.weight_g: torch.Tensor | None = None

    def specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        out = [("weight", (self.out_features, self.in_features), "mm")]
        return out + ([("bias", (self.out_features,), "none")] if self.has_bias else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, idx = self.slots.count, self.slots.index
        x3 = x.reshape(n, -1, self.in_features)
        if idx is None and torch.is_grad_enabled():
            self.slots.use(self.weight)
            y = _StackedMatmul.apply(x3, self.weight, self.weight_c, self.weight_g)
        else:  # evaluation (no grad), possibly on a subset of the slots
            w = self.weight_c if idx is None else self.weight_c.index_select(0, idx)
            y = torch.bmm(x3.to(w.dtype), w.transpose(1, 2))
        if self.has_bias:
            b = self.bias if idx is None else self.bias.index_select(0, idx)
            y = y + b.to(y.dtype)[:, None, :]
        return y.reshape(*x.shape[:-1], self.out_features)


class FusedEmbedding(nn.Module):
    """An embedding per run, ``[N, vocab, hidden]``: each run's rows look up their own table."""

    def __init__(self, slots: _Slots, emb: nn.Embedding) -> None:
        super().__init__()
        if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
            raise FusionError("fused training supports plain embeddings only (no max_norm, scale_grad_by_freq, "
                              "sparse)")
        self.slots, self.num, self.dim, self.padding_idx = slots, emb.num_embeddings, emb.embedding_dim, \
            emb.padding_idx

    def specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        return [("weight", (self.num, self.dim), "decay")]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, idx = self.slots.count, self.slots.index
        run = (torch.arange(n, device=ids.device) if idx is None else idx)[:, None]
        ids2 = ids.reshape(n, -1)
        if idx is None and torch.is_grad_enabled():
            out = _StackedLookup.apply(self.weight, run, ids2, self.weight_g)
        else:
            out = self.weight[run, ids2]
        return out.reshape(*ids.shape, self.dim)

    def zero_padding_grad(self) -> None:
        """nn.Embedding gives the padding row no gradient; the stacked lookup's backward does, so it is zeroed."""
        if self.padding_idx is not None:
            self.weight_g[:, self.padding_idx].zero_()


class FusedRMSNorm(nn.Module):
    """A Llama-style RMSNorm with one weight per run, ``[N, hidden]``: ``w * rms_norm(x)`` in float32 (the formula
    of HF's LlamaRMSNorm and of the fast path's ``torch.rms_norm``)."""

    def __init__(self, slots: _Slots, norm: nn.Module) -> None:
        super().__init__()
        self.slots, self.dim, self.eps = slots, norm.weight.shape[0], norm.variance_epsilon

    def specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        return [("weight", (self.dim,), "none")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, idx = self.slots.count, self.slots.index
        w = self.weight if idx is None else self.weight.index_select(0, idx)
        with torch.autocast(x.device.type, enabled=False):
            y = torch.rms_norm(x.float(), (self.dim,), None, self.eps).to(x.dtype)
            return (w[:, None, :] * y.reshape(n, -1, self.dim)).reshape(x.shape)


class FusedLoraLinear(nn.Module):
    """A frozen shared Linear plus per-run LoRA: ``base(x) + scale[n] * B[n] @ A[n] @ dropout_n(x)`` (PEFT's LoRA
    Linear, the dropout mask of run n from its own generator)."""

    def __init__(self, slots: _Slots, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.slots, self.base, self.rank = slots, base, rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.mask_k: int | None = None  # position among the group's dropout modules of this width
        self.A_c = self.B_c = self.A_g = self.B_g = None

    def specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        return [("lora_A", (self.rank, self.in_features), "mm"), ("lora_B", (self.out_features, self.rank), "mm")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        n, idx = self.slots.count, self.slots.index
        masks = self.slots.masks
        if self.training and masks is not None and self.mask_k is not None:
            m = masks[self.in_features][:, self.mask_k]  # [N, R, S, in]
            x3 = (x.reshape(m.shape) * m).reshape(n, -1, self.in_features)
        else:
            x3 = x.reshape(n, -1, self.in_features)
        if idx is None and torch.is_grad_enabled():
            self.slots.use(self.lora_A)
            self.slots.use(self.lora_B)
            h = _StackedMatmul.apply(x3, self.lora_A, self.A_c, self.A_g)
            t = _StackedMatmul.apply(h, self.lora_B, self.B_c, self.B_g)
            scale = self.scale_c
        else:
            a = self.A_c if idx is None else self.A_c.index_select(0, idx)
            b = self.B_c if idx is None else self.B_c.index_select(0, idx)
            t = torch.bmm(torch.bmm(x3.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
            scale = self.scale_c if idx is None else self.scale_c.index_select(0, idx)
        t = t * scale[:, None, None]
        return y + t.reshape(y.shape)


# -- the group's trainable weights -------------------------------------------------------------------------------
class _Bank:
    """Every trainable tensor of a group: fp32 masters in flat ``[N, P]`` buffers, their gradients, compute-dtype
    copies and best-checkpoint copies; each stacked module weight is a view into them. Why flat: per-run operations
    (clipping norm, decay, AdamW, slot load, best copy) are one kernel per buffer.

    Three buffers (``BUFFERS``), by what the step does with them: ``mm``, matmul weights (weight decay; a compute
    copy; gradient written whole by ``_StackedMatmul``, so never zeroed, and stored in ``mm_grad_dtype``), ``decay``
    (weight decay: the embeddings; gradient accumulated, zeroed after each step) and ``none`` (no weight decay: norm
    weights and biases; accumulated, zeroed)."""

    BUFFERS = ("mm", "decay", "none")

    def __init__(self, entries: list[tuple[str, tuple[int, ...], str]], n: int, device: torch.device,
                 compute_dtype: torch.dtype, mm_grad_dtype: torch.dtype = torch.float32) -> None:
        self.n, self.device = n, device
        self.offsets: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        size = dict.fromkeys(self.BUFFERS, 0)
        for name, shape, buf in entries:
            if buf not in size:
                raise ValueError(f"unknown buffer {buf!r} for {name}")
            self.offsets[name] = (buf, size[buf], shape)
            size[buf] += math.prod(shape)
        self.kinds = [k for k in self.BUFFERS if size[k]]
        self.layout = [(k, size[k]) for k in self.kinds]  # what a checkpoint's optimizer state must match
        self.decayed = [k for k in self.kinds if k != "none"]
        self.zeroed = [k for k in self.kinds if k != "mm"]
        z = dict(device=device)
        self.master = {k: torch.zeros(n, size[k], **z) for k in self.kinds}
        self.grad = {k: torch.zeros(n, size[k], dtype=mm_grad_dtype if k == "mm" else torch.float32, **z)
                     for k in self.kinds}
        self.best = {k: torch.zeros(n, size[k], **z) for k in self.kinds}
        # compute copies: the matmul weights only (embeddings, norms and biases are used in float32, as HF does)
        self.compute = {k: (self.master[k] if compute_dtype == torch.float32 or k != "mm"
                            else torch.zeros(n, size[k], dtype=compute_dtype, **z)) for k in self.kinds}

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        _, off, shape = self.offsets[name]
        return buf[:, off: off + math.prod(shape)].view(self.n, *shape)

    def parameter(self, name: str) -> nn.Parameter:
        """The stacked weight ``name`` as a parameter viewing the master buffer; where its gradient buffer has the
        master's dtype, ``.grad`` is the persistent view autograd accumulates into (a bf16 matmul gradient is
        written by ``_StackedMatmul`` through ``grad_view`` instead: torch refuses a .grad of another dtype)."""
        buf = self.offsets[name][0]
        p = nn.Parameter(self._view(self.master[buf], name))
        if self.grad[buf].dtype == p.dtype:
            p.grad = self._view(self.grad[buf], name)
        return p

    def grad_view(self, name: str) -> torch.Tensor:
        return self._view(self.grad[self.offsets[name][0]], name)

    def compute_view(self, name: str) -> torch.Tensor:
        return self._view(self.compute[self.offsets[name][0]], name)

    def copy_of(self, k: str) -> torch.Tensor | None:
        """Buffer ``k``'s compute copy, None where the compute view is the master itself (fp32, or not "mm")."""
        return None if self.compute[k] is self.master[k] else self.compute[k]

    @torch.no_grad()
    def refresh(self, slot: int | None = None) -> None:
        """Compute copies <- masters (all slots, or one)."""
        for k in self.kinds:
            if (c := self.copy_of(k)) is not None:
                if slot is None:
                    c.copy_(self.master[k])
                else:
                    c[slot].copy_(self.master[k][slot])

    @torch.no_grad()
    def load(self, slot: int, tensors: dict[str, torch.Tensor], buf: str = "master") -> None:
        """Tensors by name into the slot's ``master`` weights (compute copies refreshed) or its ``best`` copy."""
        bufs = self.master if buf == "master" else self.best
        for name, t in tensors.items():
            key, off, shape = self.offsets[name]
            bufs[key][slot, off: off + math.prod(shape)].copy_(t.reshape(-1), non_blocking=True)
        if buf == "master":
            self.refresh(slot)

    @torch.no_grad()
    def read(self, slot: int, buf: str = "master") -> dict[str, torch.Tensor]:
        """The slot's weights (``master``) or best-checkpoint copy (``best``) as CPU tensors, by name."""
        bufs = self.master if buf == "master" else self.best
        host = {k: bufs[k][slot].float().cpu() for k in self.kinds}
        out = {}
        for name, (key, off, shape) in self.offsets.items():
            out[name] = host[key][off: off + math.prod(shape)].view(shape).clone()
        return out

    @torch.no_grad()
    def keep_best(self, slot: int) -> None:
        for k in self.kinds:
            self.best[k][slot].copy_(self.master[k][slot])

    @torch.no_grad()
    def restore_best(self, slot: int) -> None:
        for k in self.kinds:
            self.master[k][slot].copy_(self.best[k][slot])
        self.refresh(slot)


# -- the fused model ---------------------------------------------------------------------------------------------
def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight")


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def plan_modules(model: nn.Module, method: str, targets: list[str]) -> dict[str, str]:
    """Which modules a group stacks: path -> "linear" | "embedding" | "rms_norm" (full FT: every module holding
    parameters) or "lora" (LoRA: the target Linears; the score head is a stacked "linear"). Raises FusionError for
    a module holding parameters of another kind (full FT) or targets that match nothing (LoRA)."""
    plan: dict[str, str] = {}
    if method == "full":
        for path, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                plan[path] = "linear"
            elif isinstance(mod, nn.Embedding):
                plan[path] = "embedding"
            elif _is_rms_norm(mod):
                plan[path] = "rms_norm"
            elif any(True for _ in mod.parameters(recurse=False)):
                raise FusionError(f"full fine-tuning of {type(model).__name__} cannot be fused: module {path} "
                                  f"({type(mod).__name__}) holds parameters of a kind fused.py does not stack")
    elif method == "lora":
        for path, mod in model.named_modules():  # PEFT's rule for plain names: the last component matches
            if isinstance(mod, nn.Linear) and path.split(".")[-1] in targets and path != "score":
                plan[path] = "lora"
        if not plan:
            raise FusionError(f"lora.target_modules {list(targets)} match no Linear of {type(model).__name__}")
        if not isinstance(getattr(model, "score", None), nn.Linear):
            raise FusionError(f"{type(model).__name__} has no Linear `score` head to stack")
        plan["score"] = "linear"
    else:
        raise FusionError(f"unknown method {method!r}")
    return plan


_REASONS: dict[tuple, str | None] = {}


def unfusable_reason(cfg, method: str) -> str | None:
    """Why runs of ``method`` on the config's model cannot be fused (None: they can); read from the module tree of
    a copy on the meta device (no weights loaded)."""
    key = (cfg.model.source, cfg.model.revision, method, tuple(cfg.lora.target_modules))
    if key not in _REASONS:
        from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaForSequenceClassification

        src = M.resolve_source(cfg.model.source)
        with torch.device("meta"):
            if src == M.TINY:
                model = LlamaForSequenceClassification(M.tiny_config(300, cfg.model.tiny_hidden_size,
                                                                      cfg.model.tiny_layers))
            else:
                model = AutoModelForSequenceClassification.from_config(
                    AutoConfig.from_pretrained(src, revision=cfg.model.revision, num_labels=2))
        try:
            plan_modules(model, method, list(cfg.lora.target_modules))
            _REASONS[key] = None
        except FusionError as e:
            _REASONS[key] = str(e)
    return _REASONS[key]


OPTIMIZERS = ("auto", "torch", "triton")


def resolve_optimizer(spec: str, device: torch.device) -> str:
    """The fused group's optimizer pass: ``torch`` (torch.optim.AdamW, a parameter group per run, after separate
    clipping, decay and refresh passes: the reference) or ``triton`` (fused_adamw's one-pass kernel); ``auto``:
    triton where it runs (CUDA with Triton), else torch. Raises ValueError for another name or an unavailable
    kernel."""
    if spec not in OPTIMIZERS:
        raise ValueError(f"unknown fused optimizer {spec!r} (one of {', '.join(OPTIMIZERS)})")
    if spec == "auto":
        return "triton" if device.type == "cuda" and fused_adamw.available(device) else "torch"
    if spec == "triton" and not fused_adamw.available(device):
        raise ValueError(f"the fused_adamw kernel cannot run on {device} (needs Triton and CUDA, or Triton's "
                         "interpreter on CPU)")
    return spec


class FusedModel:
    """An HF classifier with its parameter-holding modules stacked for ``n`` runs (see the module docstring).

    ``names[fused name] = lone name``: where each stacked tensor lives in a lone run's model (PEFT names for LoRA),
    for loading initial weights and writing a run's artifacts. Raises FusionError for modules it cannot stack."""

    def __init__(self, cfg, method: str, num_labels: int, n: int, device: torch.device,
                 amp: torch.dtype | None, optimizer: str = "auto") -> None:
        self.method, self.n, self.device, self.amp = method, n, device, amp
        self.compute_dtype = amp or torch.float32
        self.optimizer = resolve_optimizer(optimizer, device)
        self.slots = _Slots(n)
        model, self.tokenizer = M.load_base(cfg.model, num_labels, seed=0)
        model.requires_grad_(False)
        kinds = {"linear": FusedLinear, "embedding": FusedEmbedding, "rms_norm": FusedRMSNorm}
        stacked: dict[str, nn.Module] = {}
        for path, kind in plan_modules(model, method, list(cfg.lora.target_modules)).items():
            mod = model.get_submodule(path)
            stacked[path] = (FusedLoraLinear(self.slots, mod, cfg.lora.rank) if kind == "lora"
                             else kinds[kind](self.slots, mod))
        for path, new in stacked.items():
            _replace(model, path, new)
        if method == "lora":
            fuse_rms_norms(model)  # frozen shared norms: the fast path's fused kernel, same computation
        model.to(device)
        if method == "lora" and self.compute_dtype != torch.float32:
            for mod in model.modules():  # the frozen base's matmul weights, cast once (what autocast casts to)
                if isinstance(mod, nn.Linear):
                    mod.to(self.compute_dtype)
        entries = [(f"{path}.{name}", shape, buf) for path, mod in stacked.items()
                   for name, shape, buf in mod.specs()]
        # the one-pass kernel reads the matmul gradients in the compute dtype (exact: see _StackedMatmul)
        self.bank = _Bank(entries, n, device, self.compute_dtype,
                          self.compute_dtype if self.optimizer == "triton" else torch.float32)
        for path, mod in stacked.items():
            for name, _, _ in mod.specs():
                setattr(mod, name, self.bank.parameter(f"{path}.{name}"))
            if isinstance(mod, FusedLinear):
                mod.weight_c = self.bank.compute_view(f"{path}.weight")
                mod.weight_g = self.bank.grad_view(f"{path}.weight")
            elif isinstance(mod, FusedEmbedding):
                mod.weight_g = self.bank.grad_view(f"{path}.weight")
            elif isinstance(mod, FusedLoraLinear):
                mod.A_c = self.bank.compute_view(f"{path}.lora_A")
                mod.B_c = self.bank.compute_view(f"{path}.lora_B")
                mod.A_g = self.bank.grad_view(f"{path}.lora_A")
                mod.B_g = self.bank.grad_view(f"{path}.lora_B")
                mod.register_buffer("scale_c", torch.zeros(n, dtype=self.compute_dtype, device=device))
        self.model, self.stacked = model, stacked
        self.loras = [m for m in stacked.values() if isinstance(m, FusedLoraLinear)]
        # dropout masks: one buffer per input width, modules numbered in registration (= forward) order
        self.mask_widths: dict[int, int] = {}
        for m in self.loras:
            m.mask_k = self.mask_widths.get(m.in_features, 0)
            self.mask_widths[m.in_features] = m.mask_k + 1
        self.embeddings = [m for m in stacked.values() if isinstance(m, FusedEmbedding)]
        self.names = {f"{p}.{name}": self._lone_name(p, name) for p, mod in stacked.items()
                      for name, _, _ in mod.specs()}

    def _lone_name(self, path: str, name: str) -> str:
        if self.method == "full":
            return f"{path}.{name}"
        if path == "score":
            return f"base_model.model.score.modules_to_save.default.{name}"
        return f"base_model.model.{path}.{name}.default.weight"

    def set_scaling(self, slot: int, scale: float) -> None:
        for m in self.loras:
            m.scale_c[slot] = scale

    def load_slot(self, slot: int, lone_state: dict[str, torch.Tensor]) -> None:
        """Initial weights of a run (``lone_state``: name -> tensor in the lone model's names) into ``slot``."""
        missing = [lone for lone in self.names.values() if lone not in lone_state]
        if missing:
            raise FusionError(f"the lone model lacks {missing[:3]}: cannot map it onto the fused group")
        self.bank.load(slot, {f: lone_state[lone] for f, lone in self.names.items()})

    def lone_state(self, slot: int) -> dict[str, torch.Tensor]:
        """The slot's trained weights in the lone model's names (CPU float32)."""
        return {self.names[f]: t for f, t in self.bank.read(slot).items()}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A lone model's trainable tensors by name (CPU copies)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


# -- the static fused step (CUDA graphs on GPU) ------------------------------------------------------------------
class FusedStepper:
    """The fused training step and evaluation forward over static shapes; captured as CUDA graphs when
    ``cuda_graph``. It has the stepper interface of training.py with one entry per slot: ``step`` takes the whole
    group's batch, ``take_loss(slots)`` the loss windows of some slots, ``logits(batch, slots)`` evaluates some
    slots, ``close()`` frees the graphs."""

    def __init__(self, fm: FusedModel, rows: int, max_norm: float, eval_batch_size: int, cuda_graph: bool,
                 dropout: bool, levers: StepLevers | None = None) -> None:
        if cuda_graph and fm.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; train.fuse=on runs the static path on CPU")
        levers = levers or StepLevers()
        # the levers that act here (FUSED_LEVERS) are applied to the group's model; ValueError when one cannot run
        # here (fused_kernels without CUDA or liger-kernel). lever_names: what a run's metrics.json records
        self.model_levers = prepare_model(fm.model, StepLevers(levers.names & FUSED_LEVERS), fm.device)
        self.lever_names = sorted(levers.names & FUSED_LEVERS)
        self.pin_host = True  # host batches staged through pinned memory (fast_step.h2d); False: pageable copies
        self.fm, self.n, self.rows, self.max_norm = fm, fm.n, rows, max_norm
        self.eval_batch_size, self.cuda_graph, self.dropout = eval_batch_size, cuda_graph, dropout
        self.mode = "fused-cuda_graph" if cuda_graph else "fused-static"
        dev, n = fm.device, fm.n
        self.device, self.amp = dev, fm.amp
        self.mask_dtype = fm.amp or torch.float32
        self.labels = torch.zeros(n * rows, dtype=torch.long, device=dev)
        self.weights = torch.zeros(n, rows, device=dev)
        self.loss_sum = torch.zeros(n, device=dev)
        self.keep = torch.ones(n, device=dev)  # 1 - LoRA dropout, per slot
        self.generators = [torch.Generator(device=dev) for _ in range(n)] if dropout else []
        self.inputs: dict[int, torch.Tensor] = {}  # width -> [3, N*R, S] ids / mask / positions
        self.fwd_bwd: dict[int, Callable[[], None]] = {}
        self.eval_inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.eval_index: dict[int, torch.Tensor] = {}
        self.eval_out: dict[int, torch.Tensor] = {}
        self.eval_runs: dict[tuple[int, int], Callable[[], None]] = {}
        bank = fm.bank
        self.betas, self.eps = (0.9, 0.999), 1e-8  # AdamW's defaults, which training.make_optimizer uses
        # the learning rate per run: a device tensor where a graph or the kernel reads it, else the groups' floats
        self.lr = torch.zeros(n, device=dev) if cuda_graph or fm.optimizer == "triton" else [0.0] * n
        self.decay = torch.ones(n, device=dev)  # 1 - lr x weight decay, per run (AdamW's first line)
        self.ones = torch.ones(n, device=dev)  # the decay factor of the buffer without weight decay
        if fm.optimizer == "triton":
            # fused_adamw's state: the moments as flat [N, P] buffers beside the masters, a step count per run
            self.steps = torch.zeros(n, device=dev)
            self.exp_avg = {k: torch.zeros_like(bank.master[k]) for k in bank.kinds}
            self.exp_avg_sq = {k: torch.zeros_like(bank.master[k]) for k in bank.kinds}
            self.opt = None
        else:
            # torch.optim.AdamW with one parameter group per run (its learning rate and step counts); the weight
            # decay is applied before the step with each run's own lr x decay, so AdamW itself runs with none
            self.run_params = [[nn.Parameter(bank.master[k][i]) for k in bank.kinds] for i in range(n)]
            for i in range(n):
                for k, p in zip(bank.kinds, self.run_params[i], strict=True):
                    p.grad = bank.grad[k][i]
            lrs = [self.lr[i] for i in range(n)] if isinstance(self.lr, torch.Tensor) else [0.0] * n
            groups = [{"params": ps, "lr": lr, "weight_decay": 0.0}
                      for ps, lr in zip(self.run_params, lrs, strict=True)]
            kw = ({"fused": True, "capturable": cuda_graph} if dev.type == "cuda" else {"foreach": True})
            self.opt = torch.optim.AdamW(groups, lr=0.0, betas=self.betas, eps=self.eps, **kw)
        self.pool = torch.cuda.graph_pool_handle() if cuda_graph else None
        self.opt_step: Callable[[], None] = self._optimizer_step
        if self.opt is not None:
            self._optimizer_step()  # creates AdamW's state (zero gradients, lr 0: no weight moves) ...
            self._reset_optimizer(range(n))  # ... and resets its step counts
        if cuda_graph:
            # the warm-up run sees zero gradients and learning rates: only the step counts move, reset after
            graph = _Replayable(self._optimizer_step, self.pool, warmup=1,
                                before_warmup=lambda: None,
                                after_warmup=lambda _: self._reset_optimizer(range(n)))
            graph.capture()
            self.opt_step = graph

    # -- per-slot settings (outside the graphs: in-place writes the graphs read) ------------------------------
    def assign(self, slot: int, seed: int, lora_dropout: float, scale: float) -> None:
        """Prepare ``slot`` for a new run (its weights are loaded by the caller): fresh AdamW state, an empty loss
        window, its LoRA scaling and dropout, its dropout generator seeded with its seed. Learning rate and weight
        decay come with every step."""
        if lora_dropout > 0 and not self.dropout:
            raise FusionError("this fused group was built without LoRA dropout")
        self._reset_optimizer([slot])
        self.loss_sum[slot] = 0.0
        self.keep[slot] = 1.0 - lora_dropout
        if self.generators:
            self.generators[slot].manual_seed(seed)  # the run's own generator (modeling.seed_dropout seeds alike)
        if self.fm.method == "lora":
            self.fm.set_scaling(slot, scale)

    def _opt_state(self, slot: int) -> list[dict[str, torch.Tensor]]:
        """The slot's AdamW state, one dict per bank buffer (``step``, ``exp_avg``, ``exp_avg_sq``): live tensors."""
        if self.opt is not None:
            return [self.opt.state[p] for p in self.run_params[slot]]
        return [{"step": self.steps[slot], "exp_avg": self.exp_avg[k][slot], "exp_avg_sq": self.exp_avg_sq[k][slot]}
                for k in self.fm.bank.kinds]

    @torch.no_grad()
    def slot_state(self, slot: int) -> dict:
        """The slot's AdamW state (moments and step count per stacked buffer), dropout generator and loss window:
        with its weights (``_Bank.read``), what a checkpoint of the run in the slot needs from the stepper."""
        opt = [{k: v.clone() for k, v in st.items()} for st in self._opt_state(slot)]
        return {"opt": opt, "generator": self.generators[slot].get_state() if self.generators else None,
                "loss_sum": self.loss_sum[slot].clone()}

    @torch.no_grad()
    def load_slot_state(self, slot: int, st: dict) -> None:
        """Continue a run in ``slot`` from ``slot_state`` (after ``assign``); written in place (graphs read it).
        Raises FusionError for a state of another buffer layout (a checkpoint of an older lorastudy)."""
        cur_states = self._opt_state(slot)
        if len(st["opt"]) != len(cur_states) or any(
                set(a) != set(b) or any(a[k].shape != b[k].shape for k in b)
                for a, b in zip(st["opt"], cur_states, strict=False)):
            raise FusionError("the checkpoint's optimizer state has another layout than this fused group's "
                              "(written by another lorastudy version): delete it to restart the run")
        for cur, saved in zip(cur_states, st["opt"], strict=True):
            for k, v in saved.items():
                cur[k].copy_(v)
        if self.generators and st["generator"] is not None:
            self.generators[slot].set_state(st["generator"])
        self.loss_sum[slot] = st["loss_sum"].to(self.device)

    @torch.no_grad()
    def _reset_optimizer(self, slots) -> None:
        for i in slots:
            for st in self._opt_state(i):
                for v in st.values():
                    v.zero_()

    # -- the computation (identical with and without capture) -------------------------------------------------
    def _draw_masks(self, width: int) -> dict[int, torch.Tensor] | None:
        """One draw per run and step from the run's own generator, for all of its dropout modules: masks of
        0 or 1/keep (inverted dropout, as nn.Dropout), [N, modules, R, S, in] per input width."""
        if not self.dropout or not self.fm.mask_widths:
            return None
        n, r = self.n, self.rows
        keep = self.keep.view(n, 1, 1, 1, 1)
        out = {}
        for feat, k in self.fm.mask_widths.items():
            u = torch.empty(n, k, r, width, feat, device=self.device)
            for i, g in enumerate(self.generators):
                u[i].uniform_(0.0, 1.0, generator=g)
            out[feat] = torch.where(u < keep, 1.0 / keep, 0.0)
        return out

    def _forward_backward(self, width: int) -> None:
        st = self.inputs[width]
        ids, mask, pos = st[0], st[1], st[2]
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                 "mask4d": M.additive_mask_4d(mask, self.mask_dtype)}
        self.fm.slots.masks = self._draw_masks(width)
        self.fm.slots.uses.clear()
        try:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None,
                                cache_enabled=not self.cuda_graph), self.model_levers.context():
                logits = M.classifier_logits(self.fm.model, batch)
            ce = F.cross_entropy(logits.float(), self.labels, reduction="none").view(self.n, self.rows)
            loss = (ce * self.weights).sum(1) / self.weights.sum(1)  # each run's mean over its real rows
            loss.sum().backward()  # runs share no weights: each gets the gradient of its own loss
        finally:
            self.fm.slots.masks = None
        self.loss_sum.add_(loss.detach())

    def _optimizer_step(self) -> None:
        bank = self.fm.bank
        for emb in self.fm.embeddings:
            emb.zero_padding_grad()
        grads = [bank.grad[k] for k in bank.kinds]
        # clip_grad_norm_ per run, on its own norm: max_norm / (norm + 1e-6), at most 1
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dim=1, dtype=torch.float32)
                                                     for g in grads]), dim=0)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        if self.opt is None:  # one pass per buffer: scale, decay, AdamW, compute copy (fused_adamw)
            self.steps.add_(1.0)
            step_size, bc2_sqrt = fused_adamw.bias_corrections(self.steps, self.lr, *self.betas)
            for k in bank.kinds:
                fused_adamw.adamw_(bank.master[k], bank.grad[k], self.exp_avg[k], self.exp_avg_sq[k], bank.copy_of(k),
                                   coef, self.decay if k in bank.decayed else self.ones, step_size, bc2_sqrt,
                                   *self.betas, self.eps)
        else:
            for g in grads:
                g.mul_(coef[:, None])
            for k in bank.decayed:  # decoupled weight decay with each run's own factor 1 - lr * wd
                bank.master[k].mul_(self.decay[:, None])
            self.opt.step()
            bank.refresh()
        for k in bank.zeroed:  # the matmul gradients are overwritten by the next backward, the others added to
            bank.grad[k].zero_()

    # -- public ------------------------------------------------------------------------------------------------
    def step(self, host: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, lrs: list[float],
             decays: list[float]) -> None:
        """One fused optimizer step. ``host``: [3, N*R, S] ids / mask / positions (CPU); ``labels`` [N*R];
        ``weights`` [N, R] (1 real row, 0 filler); ``lrs`` and ``decays`` (1 - lr * weight decay) per slot."""
        width = host.shape[-1]
        if width not in self.inputs:
            self.inputs[width] = torch.zeros(3, self.n * self.rows, width, dtype=torch.long, device=self.device)
            fn = lambda w=width: self._forward_backward(w)  # noqa: E731
            self.fwd_bwd[width] = _Replayable(fn, self.pool, before_warmup=self._save_for_warmup,
                                              after_warmup=self._restore_after_warmup,
                                              generators=self.generators) if self.cuda_graph else fn
        pin = self.pin_host
        h2d(self.inputs[width], host, pin)
        h2d(self.labels, labels, pin)
        h2d(self.weights, weights, pin)
        h2d(self.decay, torch.tensor(decays, dtype=torch.float32), pin)
        if isinstance(self.lr, list):
            for g, lr in zip(self.opt.param_groups, lrs, strict=True):
                g["lr"] = lr
        else:
            h2d(self.lr, torch.tensor(lrs, dtype=torch.float32), pin)
        self.fwd_bwd[width]()
        self.opt_step()

    def _save_for_warmup(self):
        return self.loss_sum.clone(), [g.get_state() for g in self.generators]

    def _restore_after_warmup(self, saved) -> None:
        loss, states = saved
        self.loss_sum.copy_(loss)
        for g, s in zip(self.generators, states, strict=True):
            g.set_state(s)  # warm-up draws do not count: a run's masks do not depend on when graphs are captured
        for k in self.fm.bank.kinds:
            self.fm.bank.grad[k].zero_()  # warm-up happens between steps, when the gradients are zero

    def take_loss(self, slots: list[int]) -> list[float]:
        """The loss sums of ``slots`` since their last call (one host sync for all), reset to zero."""
        idx = torch.tensor(slots, device=self.device)
        vals = self.loss_sum.index_select(0, idx).cpu().tolist()
        self.loss_sum.index_fill_(0, idx, 0.0)
        return vals

    @torch.no_grad()
    def _eval_forward(self, k: int, width: int) -> None:
        st = self.eval_inputs[(k, width)]
        batch = {"input_ids": st[0], "attention_mask": st[1], "position_ids": st[2],
                 "mask4d": M.additive_mask_4d(st[1], self.mask_dtype)}
        self.fm.slots.index = self.eval_index[k]
        try:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None,
                                cache_enabled=not self.cuda_graph), self.model_levers.context():
                self.eval_out[k].copy_(M.classifier_logits(self.fm.model, batch).float())
        finally:
            self.fm.slots.index = None

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor], slots: list[int]) -> torch.Tensor:
        """Logits [len(slots), rows, labels] of a collated CPU batch (<= eval_batch_size rows, one bucket width)
        under the weights of each of ``slots``. The slot count is padded to a power of two (a graph per count)."""
        e, (b, width) = self.eval_batch_size, batch["input_ids"].shape
        k = min(self.n, 1 << (len(slots) - 1).bit_length())
        if k < len(slots):
            raise ValueError(f"{len(slots)} slots > group size {self.n}")
        key = (k, width)
        if key not in self.eval_inputs:
            self.eval_inputs[key] = torch.zeros(3, k * e, width, dtype=torch.long, device=self.device)
            if k not in self.eval_index:
                self.eval_index[k] = torch.zeros(k, dtype=torch.long, device=self.device)
                self.eval_out[k] = torch.zeros(k * e, self.fm.model.config.num_labels, device=self.device)
            fn = lambda k=k, w=width: self._eval_forward(k, w)  # noqa: E731
            self.eval_runs[key] = _Replayable(fn, self.pool, warmup=1) if self.cuda_graph else fn
        rows = torch.stack([batch["input_ids"], batch["attention_mask"], batch["position_ids"]])
        if b < e:  # filler rows: copies of the first (their logits are dropped)
            rows = torch.cat([rows, rows[:, :1].expand(3, e - b, width)], dim=1)
        h2d(self.eval_inputs[key], rows.repeat(1, k, 1), self.pin_host)
        h2d(self.eval_index[k], torch.tensor(list(slots) + [slots[0]] * (k - len(slots))), self.pin_host)
        was = self.fm.model.training
        self.fm.model.eval()
        try:
            self.eval_runs[key]()
        finally:
            self.fm.model.train(was)
        return self.eval_out[k].view(k, e, -1)[: len(slots), :b]

    def close(self) -> None:
        """Drop the graphs and their memory now (called in ``finally``)."""
        from lorastudy.execution import CAPTURE_LOCK

        with CAPTURE_LOCK:
            self.fwd_bwd.clear()
            self.eval_runs.clear()
            self.opt_step = self._optimizer_step
            self.inputs.clear()
            self.eval_inputs.clear()
