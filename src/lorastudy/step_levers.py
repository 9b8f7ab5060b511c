"""Switchable speed levers of the static training / evaluation step (``train.step_levers``).

Why: a lone run's steps are sequential, so its step latency bounds the study's wall time (issue 20: SST-2's LoRA
phase-2 run is ~130 k steps). On the H200 a SmolLM2-135M step is a chain of ~4,000 small kernels at 2.5-3 us each;
each lever removes kernels without changing what is computed (up to bf16 rounding where stated), and each can be
switched on alone so that benchmarks/train_step.py (part ``levers``) measures it alone and together:

* ``bf16_weights``: compute-dtype copies of every Linear weight, refreshed once per optimizer step (one flat copy)
  instead of autocast's cast in every matmul; gradients reach the fp32 masters (compute_weights.py)
* ``flat_optimizer``: trainable parameters and gradients as views into one flat fp32 buffer each: clipping is one
  norm and one scale, AdamW one fused kernel over one tensor per group (flat_optim.py)
* ``compile``: regional ``torch.compile`` (Inductor) of each decoder layer, inside the captured graph, with
  Inductor's caches in a directory of the results dir so a study compiles once (layer_kernels.py)
* ``fused_kernels``: Liger-Kernel's fused rotary embedding and SwiGLU (CUDA; layer_kernels.py)
* ``lora_fused``: LoRA's dropout, scaling and residual add folded into one ``addmm`` (lora_fused.py)
* ``fused_projections``: q/k/v and gate/up projections as one matmul each (fused_projections.py)

The levers act on the static path only (``train.fast_step`` = static or cuda_graph); the eager reference path
never changes. New levers register here (``register_lever``); ``train.step_levers`` accepts registered names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Lever:
    """A registered lever: its name (the config value), one line on what it does, and whether it needs CUDA."""

    name: str
    summary: str
    cuda_only: bool = False


LEVERS: dict[str, Lever] = {}


def register_lever(lever: Lever) -> Lever:
    """Add a lever to the registry (``train.step_levers`` validates against it); returns it."""
    if lever.name in LEVERS:
        raise ValueError(f"lever {lever.name!r} is already registered")
    LEVERS[lever.name] = lever
    return lever


register_lever(Lever("bf16_weights", "compute-dtype weight copies refreshed once per optimizer step"))
register_lever(Lever("flat_optimizer", "parameters and gradients in flat buffers: fused clipping and AdamW"))
register_lever(Lever("compile", "regional torch.compile of each decoder layer (Inductor, cached)"))
register_lever(Lever("fused_kernels", "Liger-Kernel fused rotary embedding and SwiGLU", cuda_only=True))
register_lever(Lever("lora_fused", "LoRA dropout, scaling and add folded into one addmm"))
register_lever(Lever("fused_projections", "q/k/v and gate/up projections as one matmul each"))

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class StepLevers:
    """Which levers a static step uses, and the compile lever's options.

    ``names``: registered lever names; ``compile_mode``: Inductor mode (``default`` or
    ``max-autotune-no-cudagraphs``: CUDA graphs are ours, never Inductor's); ``compile_dynamic``: one graph for
    all padded widths instead of one per width; ``cache_dir``: Inductor's cache directory (None: Inductor's
    default); ``compile_backend``: torch.compile's backend (``inductor``; tests use ``aot_eager``, which traces
    the same graphs without code generation). Raises ValueError for an unknown name or mode."""

    names: frozenset[str] = frozenset()
    compile_mode: str = "default"
    compile_dynamic: bool = False
    cache_dir: Path | None = None
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.names) - set(LEVERS))
        if unknown:
            raise ValueError(f"unknown step lever(s) {unknown}; known: {sorted(LEVERS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile_mode!r} is not one of {COMPILE_MODES}")
        object.__setattr__(self, "names", frozenset(self.names))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @classmethod
    def of(cls, *names: str, **options) -> StepLevers:
        return cls(frozenset(names), **options)

    @classmethod
    def from_config(cls, train_cfg, output_dir: str | Path | None = None) -> StepLevers:
        """From ``cfg.train`` (step_levers, compile_mode, compile_dynamic, compile_cache_dir). A relative cache
        directory is taken under ``output_dir`` (the study's results dir)."""
        cache = train_cfg.compile_cache_dir
        if cache is not None and output_dir is not None and not Path(cache).is_absolute():
            cache = Path(output_dir) / cache
        return cls(frozenset(train_cfg.step_levers), train_cfg.compile_mode, train_cfg.compile_dynamic,
                   Path(cache) if cache is not None else None)

    def label(self) -> str:
        return "+".join(n for n in LEVERS if n in self.names) or "none"


@dataclass
class ModelLevers:
    """The model-level levers applied to one model (compile, fused kernels, fused LoRA): patches that stay for the
    model's lifetime (like ``fast_step.fuse_rms_norms``), plus scoped patches entered around each forward."""

    applied: frozenset[str] = frozenset()
    undos: list[Callable[[], None]] = field(default_factory=list)
    scoped: list[Callable[[], contextlib.AbstractContextManager]] = field(default_factory=list)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for enter in self.scoped:
                stack.enter_context(enter())
            yield

    def undo(self) -> None:
        for fn in reversed(self.undos):
            fn()
        self.undos.clear()
        self.scoped.clear()
        self.applied = frozenset()


_MODEL_ATTR = "_lorastudy_model_levers"


def prepare_model(model: torch.nn.Module, levers: StepLevers, device: torch.device) -> ModelLevers:
    """Apply the model-level levers of ``levers`` to ``model`` once (idempotent; a second step object on the same
    model shares them) and return the handle (``context()`` around each forward, ``undo()`` to remove them).

    Raises ValueError when a lever cannot run here (``fused_kernels`` without CUDA or without liger-kernel) or the
    model already carries other model-level levers."""
    wanted = frozenset(n for n in ("compile", "fused_kernels", "lora_fused", "fused_projections") if n in levers)
    handle: ModelLevers | None = getattr(model, _MODEL_ATTR, None)
    if handle is not None and handle.applied:
        if handle.applied != wanted:
            raise ValueError(f"model already prepared with levers {sorted(handle.applied)}, not {sorted(wanted)}")
        return handle
    handle = ModelLevers()
    for name in wanted:
        if LEVERS[name].cuda_only and device.type != "cuda":
            raise ValueError(f"step lever {name!r} needs a CUDA device, not {device}")
    # order matters: patch forwards first, compile last (Inductor traces the patched code)
    if "lora_fused" in wanted:
        from lorastudy.lora_fused import fuse_lora_layers

        handle.undos.append(fuse_lora_layers(model))
    if "fused_projections" in wanted:  # after lora_fused: its members fall back to whatever forward they had
        from lorastudy.fused_projections import fuse_sibling_projections

        handle.undos.append(fuse_sibling_projections(model))
    if "fused_kernels" in wanted:
        from lorastudy.layer_kernels import use_liger_kernels

        undo, scoped = use_liger_kernels(model)
        handle.undos.append(undo)
        handle.scoped.append(scoped)
    if "compile" in wanted:
        from lorastudy.layer_kernels import compile_layers

        handle.undos.append(compile_layers(model, levers.compile_mode, levers.compile_dynamic, levers.cache_dir,
                                           levers.compile_backend))
    handle.applied = wanted

    def forget() -> None:
        if getattr(model, _MODEL_ATTR, None) is handle:
            delattr(model, _MODEL_ATTR)

    handle.undos.insert(0, forget)
    setattr(model, _MODEL_ATTR, handle)
    return handle
