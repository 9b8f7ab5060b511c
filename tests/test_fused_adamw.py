"""fused_adamw's one-pass kernel computes what the reference computes: per run, the clipping scale and the decoupled
weight decay applied to the tensors, then ``torch.optim.AdamW`` (fused_step's ``torch`` optimizer).

Triton reads TRITON_INTERPRET when it is imported, so on CPU the kernel runs in Triton's interpreter in a child
process; on a GPU it runs for real in this one (benchmarks/gpu/fused.sh runs this file)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")


def kernel_against_torch_adamw(device: str) -> None:
    """Three runs with their own clip scale, decay factor and learning rate, P not a multiple of the block, three
    steps; gradients in float32 and in bf16; the compute copy is the new master in bf16."""
    from lorastudy import fused_adamw as FA

    gen = torch.Generator().manual_seed(0)
    n, p, betas, eps = 3, 5 * FA.BLOCK + 7, (0.9, 0.999), 1e-8
    for grad_dtype in (torch.float32, torch.bfloat16):
        master = torch.randn(n, p, generator=gen).to(device)
        ref = [torch.nn.Parameter(master[i].clone()) for i in range(n)]
        m, v = torch.zeros_like(master), torch.zeros_like(master)
        compute = torch.empty(n, p, dtype=torch.bfloat16, device=device)
        coef = torch.tensor([1.0, 0.5, 0.03], device=device)
        decay = torch.tensor([1.0, 0.99, 0.999], device=device)
        lr = torch.tensor([1e-3, 2e-2, 5e-4], device=device)
        steps = torch.zeros(n, device=device)
        opt = torch.optim.AdamW([{"params": [ref[i]], "lr": lr[i].item(), "weight_decay": 0.0} for i in range(n)],
                                betas=betas, eps=eps, foreach=False)
        for _ in range(3):
            g = (torch.randn(n, p, generator=gen) * torch.tensor([[0.1], [3.0], [1e-4]])).to(device, grad_dtype)
            steps.add_(1.0)
            step_size, bc2_sqrt = FA.bias_corrections(steps, lr, *betas)
            FA.adamw_(master, g, m, v, compute, coef, decay, step_size, bc2_sqrt, *betas, eps)
            with torch.no_grad():
                for i in range(n):
                    ref[i].grad = g[i].float() * coef[i]
                    ref[i].mul_(decay[i])
            opt.step()
        for i in range(n):
            want = ref[i].detach()
            assert (master[i] - want).norm() <= 1e-6 * want.norm(), (grad_dtype, i)
            st = opt.state[ref[i]]
            assert (m[i] - st["exp_avg"]).norm() <= 1e-6 * st["exp_avg"].norm()
            assert (v[i] - st["exp_avg_sq"]).norm() <= 1e-6 * st["exp_avg_sq"].norm()
        if device == "cuda":
            assert torch.equal(compute, master.to(torch.bfloat16))
        else:  # Triton's interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest even): 1 ulp
            assert ((compute.float() - master).abs() <= master.abs() * 2.0**-7).all()


def _interpreted(args: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")) if p)
    # CPU only: the interpreter is for CPU tensors (on a GPU machine the test config would pick the GPU)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@needs_triton
def test_kernel_equals_torch_adamw():
    if torch.cuda.is_available():
        kernel_against_torch_adamw("cuda")
    else:
        r = _interpreted(["-c", "from tests.test_fused_adamw import kernel_against_torch_adamw as k; k('cpu')"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@needs_triton
def test_fused_group_with_the_kernel_equals_the_runs_alone_and_resumes_exactly():
    """With ``train.fuse_optimizer=triton``, in the interpreter: tests/test_fused.py's group of three runs (each
    run's losses, early stopping, predictions and weights equal the run trained alone), tests/test_checkpoint.py's
    group paused twice and resumed (the kernel's moments and step counts go into the checkpoint and come back), and
    the kernel's group against torch's under bf16 with a reused slot (compute copies, bf16 gradients, fresh state)."""
    three = "tests/test_fused.py::test_group_of_three_equals_the_runs_alone"
    paused = "tests/test_checkpoint.py::test_fused_group_paused_twice_and_resumed_is_exact"
    bf16 = "tests/test_fused.py::test_triton_optimizer_matches_torch_in_bf16_with_slot_reuse"
    cases = [f"{t}[triton-{m}]" for t in (three, paused) for m in ("full", "lora")] + [f"{bf16}[{m}]"
                                                                                      for m in ("full", "lora")]
    r = _interpreted(["-m", "pytest", "-q", "-p", "no:cacheprovider", *cases])
    assert r.returncode == 0 and f"{len(cases)} passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_resolve_optimizer():
    from lorastudy import fused_adamw
    from lorastudy.fused_step import resolve_optimizer

    cpu = torch.device("cpu")
    assert resolve_optimizer("auto", cpu) == "torch"
    assert resolve_optimizer("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown fused optimizer"):
        resolve_optimizer("adam", cpu)
    if not fused_adamw.available(cpu):
        with pytest.raises(ValueError, match="cannot run on cpu"):
            resolve_optimizer("triton", cpu)


def test_kernel_input_checks():
    from lorastudy import fused_adamw as FA

    if FA.triton is None:
        with pytest.raises(RuntimeError, match="needs Triton"):
            FA.adamw_(*[torch.zeros(1, 1)] * 5, *[torch.zeros(1)] * 4, 0.9, 0.999, 1e-8)
        return
    z, s = torch.zeros(2, 8), torch.zeros(2)
    with pytest.raises(ValueError, match="exp_avg must be float32"):
        FA.adamw_(z, z, z.double(), z, None, s, s, s, s, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        FA.adamw_(z, torch.zeros(8, 2).t(), z, z, None, s, s, s, s, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match="coef must be float32"):
        FA.adamw_(z, z, z, z, None, torch.zeros(3), s, s, s, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match="grad must be float32, bfloat16 or float16"):
        FA.adamw_(z, z.int(), z, z, None, s, s, s, s, 0.9, 0.999, 1e-8)


def test_a_stacked_weight_used_twice_in_one_forward_is_refused():
    """Fused groups write each matmul weight's gradient once per step instead of adding it: a model that used a
    stacked weight twice in one forward (tied weights) would lose a gradient, so the second use raises."""
    from lorastudy.fused_step import FusionError, _Slots

    slots, w, v = _Slots(2), torch.zeros(1), torch.zeros(1)
    slots.use(w)
    slots.use(v)
    with pytest.raises(FusionError, match="used twice"):
        slots.use(w)
    slots.uses.clear()  # the next training forward
    slots.use(w)
