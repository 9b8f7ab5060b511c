"""One-pass AdamW over a fused group's flat ``[N, P]`` buffers (fused_step.py), as a Triton kernel.

Why by hand: a fused group's optimizer step is memory-bound (full FT: N x 135 M parameters) and no library kernel
does what it needs in one pass. torch's fused AdamW takes one learning rate per call and no clipping coefficient
per run, so the step was: the clip scale (read and write the gradient), the decoupled weight decay (read and write
the masters), AdamW (28 B per parameter), zeroing the gradient and the compute-copy refresh (read fp32, write
bf16): ~58 B per parameter. This kernel reads master, gradient and both moments once and writes master, moments
and the compute copy: 28 B per parameter (matmul weights: a bf16 gradient, its exact value since autocast's weight
gradient is a bf16 matmul output cast to fp32, and a bf16 copy; the others: an fp32 gradient and no copy).

The arithmetic is torch's fused AdamW (ADAMW mode of ``aten/src/ATen/native/cuda/fused_adam_utils.cuh``;
Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019) with per run n:
``g = grad * coef[n]`` (``torch.nn.utils.clip_grad_norm_``'s scale), ``p *= decay[n]`` (AdamW's first line,
``1 - lr x weight_decay``, computed by the caller), then ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
``p -= step_size[n] * m / (sqrt(v) / bc2_sqrt[n] + eps)`` with ``step_size = lr / (1 - b1^t)`` and
``bc2_sqrt = sqrt(1 - b2^t)``. ``bias_corrections`` computes those two from per-run step counts on the device (so
a CUDA graph replays them). tests/test_fused_adamw.py runs the kernel in Triton's interpreter on CPU against
``torch.optim.AdamW``.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU installs (CI) may lack it, the interpreter test installs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

BLOCK = 2048


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: Triton importable and a CUDA device, or Triton's CPU interpreter
    on a CPU (tests set TRITON_INTERPRET=1 before Triton is imported: it is read once, when the kernel is
    defined, so what counts is how the kernel was built, not the variable now)."""
    if triton is None:
        return False
    return device.type == ("cpu" if INTERPRETED else "cuda")


if triton is not None:
    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, coef_ptr, decay_ptr, step_size_ptr, bc2_sqrt_ptr, P,
                      beta1, one_minus_beta1, beta2, one_minus_beta2, eps, HAS_COMPUTE: tl.constexpr,
                      BLOCK: tl.constexpr):
        run = tl.program_id(1)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < P
        idx = run.to(tl.int64) * P + offs  # N x P may exceed 2^31
        coef = tl.load(coef_ptr + run)
        decay = tl.load(decay_ptr + run)
        step_size = tl.load(step_size_ptr + run)
        bc2_sqrt = tl.load(bc2_sqrt_ptr + run)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * coef
        p = tl.load(p_ptr + idx, mask=mask, other=0.0) * decay
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        # (1 - beta) come in from the host: in float32 here, 1 - 0.999 would be off by 1.3e-5 of its value
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + idx, p, mask=mask)
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        if HAS_COMPUTE:
            tl.store(c_ptr + idx, p.to(c_ptr.dtype.element_ty), mask=mask)

    INTERPRETED = type(_adamw_kernel).__name__ == "InterpretedFunction"  # built under TRITON_INTERPRET=1
else:
    INTERPRETED = False


def bias_corrections(steps: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step_size, bc2_sqrt)`` per run from the step counts ``steps`` [N] (after this step's increment) and the
    learning rates ``lr`` [N] (float32, same device): ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)``, [N]
    float32. In float64, as torch's AdamW computes them on the host (``1 - 0.999^t`` in float32 loses ~1e-5 of
    its value to cancellation)."""
    t = steps.double()
    bc1 = 1.0 - torch.pow(beta1, t)
    bc2 = 1.0 - torch.pow(beta2, t)
    return (lr.double() / bc1).float(), bc2.sqrt().float()


def adamw_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           compute: torch.Tensor | None, coef: torch.Tensor, decay: torch.Tensor, step_size: torch.Tensor,
           bc2_sqrt: torch.Tensor, beta1: float, beta2: float, eps: float) -> None:
    """One AdamW step of N runs in place (see the module docstring).

    ``master``, ``exp_avg``, ``exp_avg_sq``: [N, P] float32, contiguous; ``grad``: [N, P] float32 or the compute
    dtype (read, not written); ``compute``: [N, P] copy written with the new masters (None: none); ``coef``,
    ``decay``, ``step_size``, ``bc2_sqrt``: [N] float32. Raises ValueError for other shapes, dtypes or layouts and
    RuntimeError where Triton is missing."""
    if triton is None:
        raise RuntimeError("fused_adamw needs Triton (it ships with CUDA builds of torch)")
    n, p = master.shape
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grad", grad),
                    ("compute", compute)):
        if t is None:
            continue
        if t.shape != master.shape or not t.is_contiguous():
            raise ValueError(f"fused_adamw: {name} must be contiguous [{n}, {p}], got {tuple(t.shape)}")
        if name in ("master", "exp_avg", "exp_avg_sq") and t.dtype != torch.float32:
            raise ValueError(f"fused_adamw: {name} must be float32, got {t.dtype}")
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fused_adamw: grad must be float32, bfloat16 or float16, got {grad.dtype}")
    for name, t in (("coef", coef), ("decay", decay), ("step_size", step_size), ("bc2_sqrt", bc2_sqrt)):
        if t.shape != (n,) or t.dtype != torch.float32:
            raise ValueError(f"fused_adamw: {name} must be float32 [{n}], got {t.dtype} {tuple(t.shape)}")
    tensors = [t for t in (master, grad, exp_avg, exp_avg_sq, compute, coef, decay, step_size, bc2_sqrt)
               if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"fused_adamw: tensors on several devices: {sorted({str(t.device) for t in tensors})}")
    grid = (triton.cdiv(p, BLOCK), n)
    _adamw_kernel[grid](master, grad, exp_avg, exp_avg_sq, master if compute is None else compute, coef, decay,
                        step_size, bc2_sqrt, p, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
                        HAS_COMPUTE=compute is not None, BLOCK=BLOCK)
