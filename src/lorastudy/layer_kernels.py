"""Levers that change the kernels of a decoder layer: ``compile`` (regional torch.compile with Inductor) and
``fused_kernels`` (Liger-Kernel's fused rotary embedding and SwiGLU).

``compile``: each decoder layer is compiled in place (``nn.Module.compile``), not the whole model: the layers share
one code object, so Inductor compiles one graph per padded width (forward and backward) for all of them, and the
embedding, mask and head stay eager. The compiled layers run inside the step's CUDA graph (Inductor's own CUDA
graphs are never used: mode ``default`` or ``max-autotune-no-cudagraphs``). Inductor fuses the layer's elementwise
chains (casts, rotary, SwiGLU, residual adds) into a few Triton kernels; the probe of issue 20 measured
3,807 -> 1,947 kernels per SmolLM2 step. Compilation happens on the first step of each width (during the graph's
warm-up, never during capture) and is cached on disk: Inductor's cache directory is set once per process from
``train.compile_cache_dir`` (Inductor reads it from ``TORCHINDUCTOR_CACHE_DIR``; the first run of a process wins),
so the runs of a study, and a later study, reuse the compiled artifacts and autotuning results.

``fused_kernels``: Liger-Kernel (liger-kernel on PyPI; Triton, CUDA only) ``liger_swiglu`` in each MLP and
``liger_rope`` for the rotary embedding. Written as patches because the transformers hook for kernels
(``use_kernel_forward_from_hub``) needs the hub. The rotary function is a module global of the model's code that
the attention looks up per call: it is swapped only around this model's forward (``scoped``), so other models keep
HF's; a model running HF's Llama code in another thread at that moment would use Liger's too (the same rotation up
to rounding). Cross-entropy is not fused: the classifier's logits are [rows, labels], a handful of tiny kernels.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn

from lorastudy import modeling as M


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a (PEFT-wrapped) HF classifier. Raises ValueError when the model has none."""
    try:
        layers = M.backbone(model).layers
    except AttributeError:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (model.model.layers)") from None
    return list(layers)


def set_compile_cache(cache_dir: Path | None) -> Path | None:
    """Point Inductor's on-disk caches (compiled graphs, Triton kernels, autotuning) at ``cache_dir`` unless this
    process already chose one; returns the directory in use (None: Inductor's default)."""
    if cache_dir is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).resolve())
    d = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(d) if d else None


def compile_layers(model: nn.Module, mode: str = "default", dynamic: bool = False,
                   cache_dir: Path | None = None, backend: str = "inductor") -> Callable[[], None]:
    """Compile every decoder layer of ``model`` in place; returns the undo. ``dynamic``: one graph for all widths
    (symbolic sequence length) instead of one per width; ``backend``: torch.compile's (a mode is Inductor's)."""
    import torch
    import torch._dynamo

    set_compile_cache(cache_dir)
    layers = decoder_layers(model)
    # one graph per (width, train/eval, grad mode) for all layers: the default limit of 8 would silently fall
    # back to eager after a few bucket widths
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
    options = {"backend": backend, "dynamic": dynamic}
    if backend == "inductor":
        options["mode"] = mode
    for layer in layers:
        layer.compile(**options)

    def undo() -> None:
        for layer in layers:
            layer._compiled_call_impl = None

    return undo


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise without a GPU
        return False
    return True


def use_liger_kernels(model: nn.Module) -> tuple[Callable[[], None], Callable[[], contextlib.AbstractContextManager]]:
    """Liger's SwiGLU in every SiLU-gated MLP (patched), and its rotary embedding while ``scoped()`` is entered.
    Returns (undo, scoped). Raises ValueError when liger-kernel is missing or the model has no Llama-style MLP."""
    if not liger_available():
        raise ValueError("step lever 'fused_kernels' needs liger-kernel (pip install liger-kernel) and a CUDA GPU")
    from liger_kernel.transformers.functional import liger_rope, liger_swiglu

    patches = M.ForwardPatches()
    attn_modules = set()
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        act = getattr(getattr(mlp, "config", None), "hidden_act", None)
        if mlp is None or act not in ("silu", "swish") or not all(hasattr(mlp, n) for n in
                                                                   ("gate_proj", "up_proj", "down_proj")):
            raise ValueError("fused_kernels: the model's MLP is not a SiLU-gated (Llama-style) MLP")
        if "forward" not in vars(mlp):
            def forward(x, mlp=mlp):
                return mlp.down_proj(liger_swiglu(mlp.gate_proj(x), mlp.up_proj(x)))

            patches.set(mlp, forward)
        attn = getattr(layer, "self_attn", None)
        if attn is not None:
            attn_modules.add(sys.modules[type(attn).__module__])
    attn_modules = [m for m in attn_modules if hasattr(m, "apply_rotary_pos_emb")]

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return liger_rope(q, k, cos, sin, position_ids, unsqueeze_dim)

    @contextlib.contextmanager
    def scoped() -> Iterator[None]:
        saved = [(m, m.apply_rotary_pos_emb) for m in attn_modules]
        for m in attn_modules:
            m.apply_rotary_pos_emb = rope
        try:
            yield
        finally:
            for m, fn in saved:
                m.apply_rotary_pos_emb = fn

    return patches.undo, scoped
