"""Optimizer-step time: the fast path (static shapes + CUDA graphs) vs lorastudy's eager step vs a plain Hugging
Face/PEFT eager loop, all measured in the same run; loss trajectories fast vs eager on real SST-2 batches; the
aggregate throughput of N training processes sharing one GPU; and fused groups (N runs trained as one model).
Prints tables and writes JSON.

Parts (``--parts``):
  steps       ms/step, tokens/s, speedup vs HF eager and MFU, for SmolLM2-135M (real weights) and TinyLlama-1.1B's
              architecture (random weights), full FT and LoRA, at several batch sizes; CUDA kernels per step by name.
  trajectory  200 steps on real SST-2 batches (batch 4, dropout 0): fast vs eager losses, and eager on the same
              bucket-padded batches as the bf16-noise reference (same math, other shapes).
  workers     N = 1, 2, 4, 8, 16 concurrent SmolLM2 runs on one GPU (fast path, batch 4), as N processes and as N
              streams of one process: aggregate steps/s, against one eager run.
  fused       fused groups (fused.py): run-steps/s against N for LoRA and full FT at the given batch sizes and
              lengths (the fused step alone, random tokens), beside one lone fast-path run of the same shape and
              (--fused-streams K) K lone runs on K streams; the trainer's own loop on real SST-2 batches
              (--fused-group-n); peak memory; and a fused run vs the same run alone over real SST-2 steps
              (--fused-trajectory-steps). ``--smoke``: the tiny random model, a few steps, on any device.
  phase2      the trainer's own loop for SST-2's phase-2 groups of configs/smollm2.yaml (3 seeds; LoRA batch 1,
              dropout 0.12; full FT batch 2) on real SST-2 batches, per variant: host batches through pageable or
              pinned memory, with or without step levers (--phase2-variants), side by side.
  levers      the step levers of issue 20 (train.step_levers), each alone and cumulatively, at the protocol's
              SST-2 shapes (full FT batch 2, LoRA batch 1, 24 tokens): ms per step, CUDA kernels per step, us per
              kernel, first-step seconds (capture + compile); then 200 real SST-2 steps with all levers against
              the eager step, beside eager on padded batches (the bf16 noise band). --smoke runs every code path
              on CPU with the tiny model in a minute or two.

    python benchmarks/train_step.py --out benchmarks/results/train_step_h200.json
    python benchmarks/train_step.py --parts steps --models smollm2 --batch-sizes 1 4 --steps 5   # quick CPU check
    python benchmarks/train_step.py --parts fused --smoke --out /tmp/fused_smoke.json            # CPU check
    python benchmarks/train_step.py --parts levers --out /tmp/levers.json      # on the H200 (benchmarks/gpu/levers.sh)
    python benchmarks/train_step.py --parts levers --smoke --out /tmp/levers_smoke.json                  # CPU smoke
    python benchmarks/train_step.py --table /tmp/levers.json                  # print the levers table of a JSON
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from trajectory_band import band  # (beside this script: python puts benchmarks/ on the path)
from transformers import get_linear_schedule_with_warmup

from lorastudy import data as D
from lorastudy import fused
from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.fast_step import StaticTrainStep, default_buckets, fuse_rms_norms
from lorastudy.fused import FusedGroup, FusedModel, FusedStepper, ListSource, RunJob, trainable_state
from lorastudy.serving.benchmark import random_batch
from lorastudy.serving.build import synthetic_base
from lorastudy.store import code_version
from lorastudy.training import HParams, Setup, make_optimizer, seeded_model, train_run, train_step

LENGTHS = {"sst2": 24, "rte": 64}  # SST-2-like and RTE-like batch lengths (tokens), cf. data-stats p50
MODEL_LENGTHS = {"smollm2": ["sst2"], "tinyllama": ["rte"]}  # the issue's shapes: SST-2 batches; TinyLlama 16 x 64
PEAK_BF16 = 790e12  # dense bf16 FLOP/s measured on the H200 (the issue's reference)


_TEMPLATES: dict = {}


def cached_model(name: str, method: str, device, dropout: float = 0.0):
    """A fresh copy of ``make_model(name, method, device, dropout, seed=0)``: the first call loads, later ones copy
    (the levers part builds a model per point; loading SmolLM2 each time would spend the GPU call's minutes)."""
    import copy

    key = (name, method, str(device), dropout)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = make_model(name, method, device, dropout=dropout, seed=0)
    return copy.deepcopy(_TEMPLATES[key]).train()


def make_model(name: str, method: str, device, dropout: float = 0.0, seed: int = 0):
    if name in ("smollm2", "tiny"):  # tiny: the random tiny Llama of the tests (CPU smoke runs)
        cfg = load_config(None, [f"model.source={'smollm2-135m' if name == 'smollm2' else M.TINY}"])
        model, _ = M.load_base(cfg.model, 2, seed=seed)
    else:
        model = synthetic_base("tinyllama", device=device, seed=seed)
    if method == "lora":
        torch.manual_seed(seed)
        model = M.wrap_lora(model, 8, 16, dropout, ["q_proj", "v_proj"])
    return model.to(device).train()


def matmul_params(model) -> int:
    """Weights that take part in matmuls (every Linear, LoRA factors included; not the embedding lookup)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def step_flops(model, method: str, tokens: int, seq: int) -> float:
    """Model FLOPs of one step: 6N per token for full FT (forward + input and weight gradients), 4N for LoRA
    (frozen weights get no weight gradient), plus causal attention (PaLM's 12*L*d*S per token, halved)."""
    cfg = model.config
    n = matmul_params(model)
    attn = 6 * cfg.num_hidden_layers * cfg.hidden_size * seq
    return (6 if method == "full" else 4) * n * tokens + attn * tokens


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step_fn, n_warm: int, n: int, device) -> float:
    for _ in range(n_warm):
        step_fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    sync(device)
    return (time.perf_counter() - t0) / n * 1e3


def hf_eager_step(model, params, opt, b, y, amp, device):
    """A plain Hugging Face loop step: loss from the model, backward, clip, AdamW (default), .item() for logging."""
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=y)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    opt.step()
    opt.zero_grad()
    return out.loss.item()


def bench_optimizer(model, bs: int, device, lr: float = 1e-5, graphs: bool = False):
    """lorastudy's AdamW (no warmup or decay in the hyperparameters: timing only)."""
    return make_optimizer(model, HParams(lr, bs, 1, 0.0, 0.0, 16, 0.0), device, graphs=graphs)


def fast_stepper(model, params, bs, amp, device, lr=1e-5):
    """The fast path as train_run sets it up (fused RMSNorms included: undo with fuse_rms_norms' return value)."""
    graphs = device.type == "cuda"
    opt = bench_optimizer(model, bs, device, lr, graphs=graphs)
    sched = get_linear_schedule_with_warmup(opt, 0, 10**7)
    return StaticTrainStep(model, params, opt, bs, 0.3, amp, device, cuda_graph=graphs), opt, sched


def release(params, device) -> None:
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_profile(model, params, bs, seq, amp, device, gen, top: int = 15) -> dict:
    """The CUDA kernels one static step launches (what a graph replays), counted and grouped by name by the
    profiler: the floor of a launch-bound step, and what to fuse first."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    undo = fuse_rms_norms(model)
    opt = bench_optimizer(model, bs, device)
    st = StaticTrainStep(model, params, opt, bs, 0.3, amp, device, cuda_graph=False)  # the captured code, eagerly
    b = {k: v.cpu() for k, v in random_batch(model.config.vocab_size, bs, seq, "cpu", gen).items()}
    y = torch.randint(0, 2, (bs,), generator=gen)
    st.step(b, y)  # first call: lazy initialisation
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        st.step(b, y)
        sync(device)
    names = [e.name[:70] for e in prof.events() if e.device_type.name == "CUDA"]
    undo()
    release(params, device)
    return {"count": len(names), "top": Counter(names).most_common(top)}


def bench_model(name, method, batch_sizes, lengths, device, steps, warm, gen) -> list[dict]:
    """All three loops on one model instance per (model, method); a fresh optimizer per measurement."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    model = make_model(name, method, device)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for ln in lengths:
        seq = LENGTHS[ln]
        for bs in batch_sizes:
            b = random_batch(model.config.vocab_size, bs, seq, device, gen)
            y = torch.randint(0, 2, (bs,), generator=gen).to(device)
            res = {"model": name, "method": method, "batch_size": bs, "seq_len": seq, "length_profile": ln,
                   "device": str(device), "precision": "bf16-autocast" if amp else "fp32"}
            opt = torch.optim.AdamW(params, lr=1e-5)
            res["hf_eager_ms"] = time_steps(functools.partial(hf_eager_step, model, params, opt, b, y, amp, device),
                                            warm, steps, device)
            del opt
            release(params, device)
            s = Setup(model, None, device, amp, 0, 0, params)
            opt = bench_optimizer(model, bs, device)
            sched = get_linear_schedule_with_warmup(opt, 0, 10**7)
            res["lorastudy_eager_ms"] = time_steps(functools.partial(train_step, s, opt, sched, b, y, 0.3),
                                                   warm, steps, device)
            del opt, sched
            release(params, device)
            undo = fuse_rms_norms(model)
            st, opt, sched = fast_stepper(model, params, bs, amp, device)
            cpu_b, cpu_y = {k: v.cpu() for k, v in b.items()}, y.cpu()
            res["fast_ms"] = time_steps(lambda st=st, sched=sched, b=cpu_b, y=cpu_y: (st.step(b, y), sched.step()),
                                        warm, steps * 5, device)
            st.close()
            undo()  # the eager loops of the next shape run HF's own modules
            del st, opt, sched
            release(params, device)
            tokens = bs * seq
            for loop in ("hf_eager", "lorastudy_eager", "fast"):
                res[f"{loop}_tokens_per_s"] = tokens / res[f"{loop}_ms"] * 1e3
            res["speedup_fast_vs_hf"] = res["hf_eager_ms"] / res["fast_ms"]
            res["speedup_fast_vs_lorastudy_eager"] = res["lorastudy_eager_ms"] / res["fast_ms"]
            res["model_tflop_per_step"] = step_flops(model, method, tokens, seq) / 1e12
            res["mfu_fast"] = res["model_tflop_per_step"] * 1e12 / (res["fast_ms"] / 1e3) / PEAK_BF16
            rows.append(res)
            print(f"{name:9s} {method:4s} {ln:4s} b={bs:<3d} s={seq:<3d} HF {res['hf_eager_ms']:8.2f}  "
                  f"eager {res['lorastudy_eager_ms']:8.2f}  fast {res['fast_ms']:7.2f} ms  "
                  f"x{res['speedup_fast_vs_hf']:6.1f} vs HF  MFU {res['mfu_fast']:6.1%}  "
                  f"{res['fast_tokens_per_s']:9.0f} tok/s", flush=True)
    if device.type == "cuda":
        prof = step_profile(model, params, 4, LENGTHS["sst2"], amp, device, gen)
        for r in rows:
            r["kernels_per_step_b4_sst2"] = prof["count"]
            r["kernel_histogram_b4_sst2"] = prof["top"]
        print(f"{name} {method}: {prof['count']} CUDA kernels per step (batch 4 x {LENGTHS['sst2']}); most "
              f"frequent: {prof['top'][:5]}", flush=True)
    del model
    release([], device)
    return rows


# -- loss trajectories -------------------------------------------------------------------------------------------
def _losses(order, enc, tok, pad_to, step, t0: float) -> tuple[list[float], float]:
    """One loss per batch of ``order`` (row indices into ``enc``), right-padded to ``pad_to(idx)`` (None: dynamic
    padding) and trained by ``step(batch, labels) -> loss``: the loop every trajectory variant shares. Also returns
    the seconds from ``t0`` (a ``time.perf_counter()``) to the first loss: set-up, compilation and capture."""
    losses, first_s = [], None
    for idx in order:
        batch = D.collate([enc.input_ids[i] for i in idx], tok.pad_token_id, "right", pad_to(idx))
        losses.append(step(batch, torch.tensor(enc.labels[idx])))
        if first_s is None:
            first_s = time.perf_counter() - t0
    return losses, first_s


def _static_loss(st, sched):
    """``step`` for :func:`_losses` on a static/fast stepper: its step, the schedule's, the step's loss."""
    def step(batch, y) -> float:
        st.step(batch, y)
        sched.step()
        return float(st.take_loss()[0])
    return step


def _eager_loss(s, opt, sched, device):
    """``step`` for :func:`_losses` on the eager reference (``training.train_step``, clipping at 0.3)."""
    return lambda batch, y: float(train_step(s, opt, sched, {k: v.to(device) for k, v in batch.items()},
                                             y.to(device), 0.3))


def trajectory(method: str, n_steps: int, device, glue: str | None) -> dict:
    """Same init, same batches: eager (dynamic padding), eager on bucket-padded batches, and the fast path."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    cfg = load_config(None, ["model.source=smollm2-135m"] + ([f"data.source={glue}"] if glue else []))
    splits = D.splits_for(cfg, "sst2")
    tok = M.load_tokenizer(cfg.model)
    enc = D.encode(tok, splits.train, cfg.task("sst2"), cfg.data)
    order = D.length_grouped_order(enc.lengths(), 4, np.random.default_rng(42))[:n_steps]
    buckets = default_buckets(cfg.data.max_length)
    lr = 2e-5 if method == "full" else 5e-4
    hp = HParams(lr, 4, 1, 0.1, 0.0, 16, 0.0)
    out = {}
    for variant in ("fast", "eager", "eager_padded"):  # fast first: a broken graph path fails at once
        model = make_model("smollm2", method, device, dropout=0.0, seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        if variant == "fast":
            fuse_rms_norms(model)
            st, opt, sched = fast_stepper(model, params, 4, amp, device, lr=lr)
            sched = get_linear_schedule_with_warmup(opt, int(0.1 * n_steps), n_steps)
        else:
            opt = make_optimizer(model, hp, device)
            sched = get_linear_schedule_with_warmup(opt, int(0.1 * n_steps), n_steps)
            s = Setup(model, None, device, amp, 0, 0, params)
        pad_to = (lambda idx: None) if variant == "eager" else \
            (lambda idx: D.bucket_width(int(enc.lengths()[idx].max()), buckets))
        out[variant], _ = _losses(order, enc, tok, pad_to, _static_loss(st, sched) if variant == "fast"
                                  else _eager_loss(s, opt, sched, device), time.perf_counter())
        del model, opt, sched
        release([], device)
    e = np.array(out["eager"])
    rel = lambda v: np.abs(np.array(v) - e) / np.maximum(np.abs(e), 1e-8)  # noqa: E731
    res = {"method": method, "steps": n_steps, "lr": lr, "losses": out,
           "max_rel_diff_fast_vs_eager": float(rel(out["fast"]).max()),
           "median_rel_diff_fast_vs_eager": float(np.median(rel(out["fast"]))),
           "max_rel_diff_padded_vs_eager": float(rel(out["eager_padded"]).max()),
           "median_rel_diff_padded_vs_eager": float(np.median(rel(out["eager_padded"]))),
           "mean_loss_first_20": {k: float(np.mean(v[:20])) for k, v in out.items()},
           "mean_loss_last_20": {k: float(np.mean(v[-20:])) for k, v in out.items()}}
    print(f"trajectory {method}: fast vs eager max rel diff {res['max_rel_diff_fast_vs_eager']:.4f} "
          f"(median {res['median_rel_diff_fast_vs_eager']:.4f}); padded eager vs eager "
          f"{res['max_rel_diff_padded_vs_eager']:.4f} (median {res['median_rel_diff_padded_vs_eager']:.4f}); "
          f"last-20 mean loss {res['mean_loss_last_20']}", flush=True)
    return res


# -- worker scaling ----------------------------------------------------------------------------------------------
def _steps_loop(mode: str, method: str, seconds: float, rank: int, ready) -> tuple[float, int]:
    """Build a SmolLM2 run, warm up (captures), wait for everyone (``ready()``), then count steps for ``seconds``."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(rank)
    model = make_model("smollm2", method, device)
    params = [p for p in model.parameters() if p.requires_grad]
    b = {k: v.cpu() for k, v in random_batch(model.config.vocab_size, 4, LENGTHS["sst2"], "cpu", gen).items()}
    y = torch.randint(0, 2, (4,), generator=gen)
    if mode == "fast":
        fuse_rms_norms(model)
        st, _, sched = fast_stepper(model, params, 4, torch.bfloat16, device)
        fn = lambda: (st.step(b, y), sched.step())  # noqa: E731
    else:
        s = Setup(model, None, device, torch.bfloat16, 0, 0, params)
        opt = bench_optimizer(model, 4, device)
        gb, gy = {k: v.to(device) for k, v in b.items()}, y.to(device)
        fn = lambda: train_step(s, opt, None, gb, gy, 0.3)  # noqa: E731
    for _ in range(5):
        fn()
    torch.cuda.current_stream().synchronize()
    ready()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            fn()
        n += 10
        torch.cuda.current_stream().synchronize()  # count completed steps only
    return n / (time.perf_counter() - t0), torch.cuda.max_memory_allocated()


def _worker(rank: int, mode: str, method: str, seconds: float, streams: int, barrier, queue) -> None:
    """One process running ``streams`` step loops at once, one thread and CUDA stream each."""
    import threading

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(1)
        local = threading.Barrier(streams, action=barrier.wait)  # all threads of all processes start together
        out: list = [None] * streams

        def run(i: int) -> None:
            try:
                with torch.cuda.stream(torch.cuda.Stream()):
                    out[i] = _steps_loop(mode, method, seconds, rank * 100 + i, local.wait)
            except Exception as e:  # noqa: BLE001
                out[i] = f"{type(e).__name__}: {e}"
                local.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in out:
            queue.put((rank, r[0], r[1]) if isinstance(r, tuple) else (rank, str(r), 0))
    except Exception as e:  # a worker must always answer, or the parent waits forever
        for _ in range(streams):
            queue.put((rank, f"{type(e).__name__}: {e}", 0))
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass


def worker_scaling(counts: list[int], method: str, seconds: float, save=None,
                   modes: tuple[str, ...] = ("processes", "streams"), eager: bool = True) -> dict:
    """Aggregate steps/s as concurrent runs grow, as processes (time-sliced on the GPU) and as streams of one
    process (their graphs may overlap), against one eager run."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {"method": method, "batch_size": 4, "seq_len": LENGTHS["sst2"], "seconds": seconds, "points": []}
    plan = [("eager", 1, 1)] * eager + [("fast", n, 1) for n in counts if "processes" in modes or n == 1] \
        + [("fast", 1, n) for n in counts if n > 1 and "streams" in modes]
    for mode, procs_n, streams in plan:
        barrier, q = ctx.Barrier(procs_n), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, mode, method, seconds, streams, barrier, q))
                 for r in range(procs_n)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        res = []
        try:
            for _ in range(procs_n * streams):
                res.append(q.get(timeout=180))
        except queue_mod.Empty:
            res.append((-1, "timed out waiting for a worker", 0))
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        errors = [r[1] for r in res if isinstance(r[1], str)]
        rates = [r[1] for r in res if not isinstance(r[1], str)]
        point = {"mode": mode, "processes": procs_n, "streams": streams, "runs": procs_n * streams,
                 "aggregate_steps_per_s": float(sum(rates)), "per_run_steps_per_s": [float(r) for r in rates],
                 "errors": errors, "peak_memory_bytes_per_process": max((r[2] for r in res), default=0),
                 "wall_s_incl_startup": time.perf_counter() - t0}
        out["points"].append(point)
        if save is not None:
            save(out)  # a run cut short by its time limit keeps every finished point
        print(f"{mode:5s} processes={procs_n:<3d} streams={streams:<3d} aggregate "
              f"{point['aggregate_steps_per_s']:8.1f} steps/s  per run "
              f"{np.mean(rates) if rates else float('nan'):7.1f}  errors {errors[:1]}", flush=True)
    if not eager:  # only the fast points were asked for
        return out
    eager = out["points"][0]["aggregate_steps_per_s"]
    best = max(out["points"][1:], key=lambda p: p["aggregate_steps_per_s"])
    out["eager_one_run_steps_per_s"] = eager
    out["best"] = {k: best[k] for k in ("processes", "streams", "aggregate_steps_per_s")}
    out["best_aggregate_vs_one_eager_run"] = best["aggregate_steps_per_s"] / eager if eager else None
    if eager:
        print(f"best: {best['processes']} process(es) x {best['streams']} stream(s): "
              f"{out['best_aggregate_vs_one_eager_run']:.1f}x one eager run", flush=True)
    else:  # every worker failed (the errors are in the points)
        print("workers: no eager rate measured, no ratio", flush=True)
    return out


# -- fused groups ------------------------------------------------------------------------------------------------
def bench_cfg(smoke: bool, glue: str | None, *sets: str):
    """SmolLM2-135M (or, with ``smoke``, the tiny random Llama) with the protocol's training settings."""
    src = "tiny-random-llama" if smoke else "smollm2-135m"
    return load_config(None, [f"model.source={src}", *([f"data.source={glue}"] if glue else []), *sets])


def initial_state(cfg, method: str) -> dict:
    """A lone run's initial trainable weights (loaded into every slot: the values do not change the speed)."""
    hp = HParams.from_config(cfg, method, {"lora_dropout": 0.0})
    return trainable_state(seeded_model(cfg, "sst2", method, 0, hp, torch.device("cpu")).model)


def fused_kernels(st, host, labels, weights, lrs, decays, device, top: int = 12) -> dict:
    """One fused step's CUDA kernels (the static code a graph replays), from the profiler: their count, the sum of
    their durations (the GPU's busy time, set beside the graph's step time), and the ``top`` kernels by total time
    (name truncated, calls, ms), the profile that says what limits the step."""
    from torch.profiler import ProfilerActivity, profile

    width = host.shape[-1]
    fwd, opt = st.fwd_bwd[width], st.opt_step
    st.fwd_bwd[width], st.opt_step = (lambda w=width: st._forward_backward(w)), st._optimizer_step
    try:
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            st.step(host, labels, weights, lrs, decays)
            sync(device)
        events = [e for e in prof.events() if e.device_type.name == "CUDA"]
        by_name: dict[str, list[float]] = {}
        for e in events:
            by_name.setdefault(e.name, []).append(e.device_time / 1e3)  # ms
        ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        return {"kernels_per_step": len(events),
                "kernel_busy_ms": sum(sum(v) for v in by_name.values()),
                "top_kernels": [{"name": k[:90], "calls": len(v), "ms": sum(v)} for k, v in ranked]}
    finally:
        st.fwd_bwd[width], st.opt_step = fwd, opt


def fused_stepper_point(cfg, method: str, n: int, bs: int, seq: int, device, steps: int, warm: int, init: dict,
                        dropout: float = 0.0, profile: bool = False, optimizer: str = "auto") -> dict:
    """The fused step alone (static shapes, CUDA graphs on GPU): N runs x ``bs`` rows x ``seq`` random tokens;
    ``optimizer``: the group's optimizer pass (fused_step.resolve_optimizer)."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    res = {"kind": "stepper", "method": method, "n": n, "batch_size": bs, "seq_len": seq, "lora_dropout": dropout,
           "optimizer": optimizer}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fm = st = None
    try:
        fm = FusedModel(cfg, method, 2, n, device, amp, optimizer)
        res["optimizer"] = fm.optimizer
        st = FusedStepper(fm, bs, 0.3, 32, cuda_graph=device.type == "cuda", dropout=dropout > 0)
        for slot in range(n):
            fm.load_slot(slot, init)
            st.assign(slot, slot, dropout, 16 / cfg.lora.rank)
        gen = torch.Generator().manual_seed(n)
        b = random_batch(fm.model.config.vocab_size, n * bs, seq, "cpu", gen)
        host = torch.stack([b["input_ids"], b["attention_mask"], b["position_ids"]])
        labels = torch.randint(0, 2, (n * bs,), generator=gen)
        weights = torch.ones(n, bs)
        lrs, decays = [1e-5] * n, [1.0] * n
        ms = time_steps(lambda: st.step(host, labels, weights, lrs, decays), warm, steps, device)
        # the optimizer graph alone (clipping, decay, AdamW, zeroing, compute-copy refresh: memory-bound for full FT)
        opt_ms = time_steps(st.opt_step, 1, steps, device)
        res.update(fused_step_ms=ms, run_steps_per_s=n / ms * 1e3, optimizer_ms=opt_ms, params_per_run=sum(
            math.prod(shape) for _, _, shape in fm.bank.offsets.values()))
        if device.type == "cuda" and profile:
            res.update(fused_kernels(st, host, labels, weights, lrs, decays, device))
    except torch.cuda.OutOfMemoryError as e:
        res["error"] = f"out of memory: {str(e)[:200]}"
    finally:
        if st is not None:
            st.close()  # on the error path too: captured graphs keep their memory pools until closed
        fm = st = None  # noqa: F841
        gc.collect()  # the OOM's traceback frames held the half-built bank: the next point ran out of memory
        release([], device)
    res["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    print(f"fused  {method:4s} N={n:<3d} b={bs} s={seq:<3d} dropout={dropout:.2f} opt={res['optimizer']:6s} "
          + (f"{res['fused_step_ms']:8.2f} ms/step  {res['run_steps_per_s']:8.0f} run-steps/s  optimizer "
             f"{res['optimizer_ms']:7.2f} ms" + (f"  {res['kernels_per_step']} kernels" if "kernels_per_step" in res
                                                 else "") if "error" not in res else res["error"])
          + (f"  peak {res['peak_memory_bytes'] / 2**30:6.1f} GiB" if res["peak_memory_bytes"] else ""), flush=True)
    return res


def lone_point(cfg, method: str, bs: int, seq: int, device, steps: int, warm: int) -> dict:
    """One lone run's fast-path step (what train.fuse=off gives a run) at the same shape."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    hp = HParams.from_config(cfg, method, {"lora_dropout": 0.0})
    s = seeded_model(cfg, "sst2", method, 0, hp, device)
    fuse_rms_norms(s.model)
    st, _, sched = fast_stepper(s.model, s.params, bs, amp, device)
    gen = torch.Generator().manual_seed(0)
    b = random_batch(s.model.config.vocab_size, bs, seq, "cpu", gen)
    y = torch.randint(0, 2, (bs,), generator=gen)
    ms = time_steps(lambda: (st.step(b, y), sched.step()), warm, steps, device)
    st.close()
    release(s.params, device)
    print(f"lone   {method:4s} N=1   b={bs} s={seq:<3d} {ms:8.2f} ms/step  {1e3 / ms:8.0f} run-steps/s", flush=True)
    return {"kind": "lone", "method": method, "n": 1, "batch_size": bs, "seq_len": seq, "step_ms": ms,
            "run_steps_per_s": 1e3 / ms}


def fused_group_point(cfg, method: str, n: int, bs: int, device, steps: int, warm: int, init: dict,
                      dropout: float = 0.0, pin: bool = True, barrier=None, seconds: float | None = None) -> dict:
    """The trainer's own loop (FusedGroup._step: each run's next real batch from its own order, the host batch,
    the schedules; no evaluation) for N tuning-like runs on SST-2's 3,000-row search subset. ``pin``: host batches
    through pinned memory (fast_step.h2d) or pageable copies; the config's train.step_levers apply. ``barrier`` and
    ``seconds`` (groups timed at once, one thread each): wait for the others after the warm-up, then step for that
    long instead of ``steps`` steps."""
    g = FusedGroup(cfg, method, 2, n, bs, device=device, dropout=dropout > 0)
    g.stepper.pin_host = pin
    hp = lambda i: HParams.from_config(cfg, method, {"batch_size": bs, "lora_dropout": dropout,  # noqa: E731
                                                     "epochs": 4, "lr": 1e-5 * (1 + i % 4)})
    for i in range(n):  # every seed's initial weights (the values do not change the speed): no rebuilds
        g._init[(i, "sst2")] = (init, 0, 0)
    g._fill(ListSource([RunJob(f"r{i}", "sst2", method, i, hp(i), train_subset=3000, evaluate_test=False)
                        for i in range(n)]))
    for _ in range(warm):
        g._step()
    sync(device)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    widths_warm = set(g.stepper.inputs)
    if seconds:
        steps = 0
        while time.perf_counter() - t0 < seconds:
            g._step()
            steps += 1
    else:
        for _ in range(steps):
            g._step()
    sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    widths = sorted(g.stepper.inputs)
    levers = list(g.stepper.lever_names)
    optimizer = g.fm.optimizer
    g.stepper.close()
    release([], device)
    late = sorted(set(widths) - widths_warm)  # captured while timed: their capture is inside the time
    print(f"group  {method:4s} N={n:<3d} b={bs} real SST-2 {'pinned' if pin else 'pageable':8s} "
          f"levers={'+'.join(levers) or 'none':13s} {ms:8.2f} ms/step  {n / ms * 1e3:8.0f} run-steps/s  "
          f"(widths captured {widths}; during timing {late})", flush=True)
    return {"kind": "group", "method": method, "n": n, "batch_size": bs, "data": "sst2 search subset (3000 rows)",
            "lora_dropout": dropout, "fused_step_ms": ms, "run_steps_per_s": n / ms * 1e3, "widths": widths,
            "widths_captured_while_timed": late, "warmup_steps": warm, "steps": steps, "pinned": pin,
            "levers": levers, "optimizer": optimizer}


# the SST-2 phase-2 groups of configs/smollm2.yaml (its phase-1 best: benchmarks/results/study_smollm2_h200x2/
# sst2_phase1/): LoRA batch 1 with dropout 0.12, full FT batch 2; three seeds each
PHASE2_GROUPS = (("lora", 1, 0.12), ("full", 2, 0.0))


def phase2_together(a, device, save, out: dict) -> None:
    """SST-2's two phase-2 groups timed at once, one thread and CUDA stream each (as train-all runs them in one
    process: execution.run_threads), for ``--phase2-together`` seconds after both warmed up: what sharing the GPU
    (and the interpreter's lock) costs each group's step against the same group alone (the points before)."""
    import threading

    from lorastudy.execution import run_threads

    variant = a.phase2_variants[-1]
    pin_word, *levers = variant.split("+")
    cfg = bench_cfg(a.smoke, a.glue, f"train.step_levers=[{','.join(levers)}]")
    groups = [(m, bs, d) for m, bs, d in PHASE2_GROUPS if m in a.methods]
    inits = {m: initial_state(cfg, m) for m, _, _ in groups}
    for urgent in ((0, 1) if a.phase2_urgent else (0,)):  # the first group (LoRA's, the longer chain) urgent or not
        barrier = threading.Barrier(len(groups))

        def one(arg, ctx, barrier=barrier):
            m, bs, d = arg
            return fused_group_point(cfg, m, a.phase2_n, bs, device, 0, a.phase2_warmup, inits[m], dropout=d,
                                     pin=pin_word == "pinned", barrier=barrier, seconds=a.phase2_together)

        for r in run_threads([(f"{m}-b{bs}", (m, bs, d)) for m, bs, d in groups], None, one, urgent=urgent):
            point = r.value if r.ok else {"kind": "group", "name": r.name, "error": r.error}
            point.update(variant=variant, together=[f"{m}-b{bs}" for m, bs, _ in groups],
                         urgent=[f"{m}-b{bs}" for m, bs, _ in groups[:urgent]])
            out["points"].append(point)
        save(out)


def phase2_part(a, device, save) -> dict:
    """The trainer's own loop for SST-2's phase-2 groups (3 seeds) under each variant of ``--phase2-variants``
    (``pageable`` / ``pinned``, ``+lever`` for train.step_levers), in one run: ms per fused step, so the ratios
    between variants are measured side by side; with ``--phase2-together``, then both groups at once."""
    out: dict = {"points": [], "n": a.phase2_n}
    for method, bs, dropout in PHASE2_GROUPS:
        if method not in a.methods:
            continue
        for variant in a.phase2_variants:
            pin_word, *levers = variant.split("+")
            cfg = bench_cfg(a.smoke, a.glue, f"train.step_levers=[{','.join(levers)}]")
            init = initial_state(cfg, method)
            try:
                point = fused_group_point(cfg, method, a.phase2_n, bs, device, a.phase2_steps, a.phase2_warmup,
                                          init, dropout=dropout, pin=pin_word == "pinned")
            except (ValueError, RuntimeError) as e:  # e.g. a lever that cannot run here: recorded, next variant
                point = {"kind": "group", "method": method, "n": a.phase2_n, "batch_size": bs,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"group  {method} {variant}: {point['error']}", flush=True)
            point["variant"] = variant
            out["points"].append(point)
            save(out)
    if a.phase2_together:
        phase2_together(a, device, save, out)
    return out


def fused_trajectory(method: str, n_steps: int, others: int, device, glue: str | None, smoke: bool,
                     noise_ref: Path | None, levers: list[str] | None = None) -> dict:
    """A run trained inside a fused group (beside ``others`` runs of other seeds and learning rates) vs the same
    run alone, on the same real SST-2 batches (batch 4, dropout 0): per-step training losses. With ``levers``, the
    same group again with those step levers (train.step_levers): the levers' difference to the fused run without
    them, judged against fusion's own difference to the lone run (both bf16 rounding: within the band when the
    levers' max relative difference over the first k steps is <= max(2 x fusion's, 0.01) for every k)."""
    mode = "cuda_graph" if device.type == "cuda" else "static"
    sets = ("data.validation_max=32", "data.train_limit.sst2=8000", "train.patience=1000000",
            "train.evals_per_epoch=1000000", f"train.fast_step={mode}", "train.fuse=on")
    cfg = bench_cfg(smoke, glue, *sets)
    lr = 2e-5 if method == "full" else 5e-4
    hp = HParams(lr, 4, 1, 0.1, 0.0, 16, 0.0, max_steps=n_steps)
    alone = train_run(cfg, "sst2", method, 0, hp, evaluate_test=False)
    specs = [{"task": "sst2", "method": method, "seed": 0, "hp": hp, "evaluate_test": False}]
    specs += [{"task": "sst2", "method": method, "seed": i, "evaluate_test": False,
               "hp": HParams(lr * (0.5 + 0.25 * i), 4, 1, 0.1, 0.0, 16, 0.0, max_steps=n_steps)}
              for i in range(1, others + 1)]
    group = fused.train_runs(cfg, specs)
    if not isinstance(group[0], dict):
        raise RuntimeError(f"fused trajectory run failed: {group[0]}")
    la = np.array([c["train_loss"] for c in alone["curve"]])
    lg = np.array([c["train_loss"] for c in group[0]["curve"]])
    rel = np.abs(lg - la) / np.maximum(np.abs(la), 1e-8)
    ks = [k for k in (1, 5, 10, 20, 50, 100, 200) if k <= len(rel)]
    res = {"method": method, "steps": n_steps, "group_size": others + 1, "lr": lr, "step_mode": mode,
           "losses": {"alone": la.tolist(), "fused": lg.tolist()},
           "max_rel_diff_first_k": {str(k): float(rel[:k].max()) for k in ks},
           "median_rel_diff": float(np.median(rel)),
           "mean_loss_last_20": {"alone": float(la[-20:].mean()), "fused": float(lg[-20:].mean())}}
    if noise_ref is not None and noise_ref.is_file():  # the bf16 noise band of the trajectory table
        ref = json.loads(noise_ref.read_text())
        ref = ref.get("trajectory", [ref])[0] if isinstance(ref, dict) else ref[0]
        e = np.array(ref["losses"]["eager"])
        p = np.array(ref["losses"]["eager_padded"])
        r = np.abs(p - e) / np.maximum(np.abs(e), 1e-8)
        res["noise_reference"] = {"file": str(noise_ref), "method": ref["method"],
                                  "padded_vs_eager_max_rel_diff_first_k": {str(k): float(r[:k].max()) for k in ks
                                                                           if k <= len(r)}}
    if levers:
        with_levers = fused.train_runs(bench_cfg(smoke, glue, *sets, f"train.step_levers=[{','.join(levers)}]"),
                                       specs)
        if not isinstance(with_levers[0], dict):
            raise RuntimeError(f"fused trajectory run with levers {levers} failed: {with_levers[0]}")
        ll = np.array([c["train_loss"] for c in with_levers[0]["curve"]])
        rl = np.abs(ll - lg) / np.maximum(np.abs(lg), 1e-8)
        band = {str(k): max(2 * float(rel[:k].max()), 0.01) for k in ks}
        res["levers"] = {"levers": sorted(levers), "applied": with_levers[0].get("step_levers"),
                         "losses": ll.tolist(),
                         "max_rel_diff_vs_fused_first_k": {str(k): float(rl[:k].max()) for k in ks},
                         "within_band": all(float(rl[:k].max()) <= band[str(k)] for k in ks),
                         "mean_loss_last_20": float(ll[-20:].mean())}
        print(f"trajectory {method}: fused with {levers} vs fused without, max rel diff over the first k steps "
              f"{res['levers']['max_rel_diff_vs_fused_first_k']}; within the band (<= max(2 x fused vs alone, "
              f"0.01)): {res['levers']['within_band']}", flush=True)
    print(f"trajectory {method}: fused (in a group of {others + 1}) vs alone, max rel diff over the first k steps "
          f"{res['max_rel_diff_first_k']}; last-20 mean loss {res['mean_loss_last_20']}", flush=True)
    if "noise_reference" in res:
        print(f"  noise band (eager on padded batches vs eager, {res['noise_reference']['file']}): "
              f"{res['noise_reference']['padded_vs_eager_max_rel_diff_first_k']}", flush=True)
    return res


def fused_table(out: dict) -> None:
    """The fused part's numbers, one line per point (printed last)."""
    print("\nfused training (run-steps/s = runs x optimizer steps per second)")
    print(f"{'kind':8s} {'method':6s} {'N':>3s} {'batch':>5s} {'seq':>4s} {'drop':>5s} {'opt':>6s} {'ms/step':>9s} "
          f"{'run-steps/s':>11s} {'x lone':>7s} {'peak GiB':>8s} {'opt ms':>7s} {'opt Gparam/s':>12s} "
          f"{'kernels':>7s}")
    lone = {(r["method"], r["batch_size"], r["seq_len"]): r["run_steps_per_s"] for r in out.get("lone", [])}
    for r in out.get("lone", []) + out.get("streams", []) + out.get("points", []) + out.get("group", []):
        ms = r.get("fused_step_ms", r.get("step_ms"))
        rate = r.get("run_steps_per_s")
        base = lone.get((r["method"], r["batch_size"], r.get("seq_len")))
        peak = r.get("peak_memory_bytes")
        print(f"{r['kind']:8s} {r['method']:6s} {r['n']:3d} {r['batch_size']:5d} {str(r.get('seq_len', 'real')):>4s} "
              f"{r.get('lora_dropout', 0.0):5.2f} {r.get('optimizer', '-'):>6s} "
              + (f"{ms:9.2f} " if ms else f"{'-':>9s} ") + (f"{rate:11.0f} " if rate else f"{'-':>11s} ")
              + (f"{rate / base:7.1f} " if rate and base else f"{'-':>7s} ")
              + (f"{peak / 2**30:8.1f}" if peak else f"{'-':>8s}")
              + (f" {r['optimizer_ms']:7.2f} {r['n'] * r['params_per_run'] / r['optimizer_ms'] / 1e6:12.2f}"
                 if "optimizer_ms" in r else f" {'-':>7s} {'-':>12s}")
              + f" {r.get('kernels_per_step', '-'):>7}" + (f"  {r['error']}" if "error" in r else ""))
    print("opt Gparam/s: trainable parameters (all runs) per second through the optimizer graph alone; times the "
          "bytes it moves per parameter, its memory bandwidth")
    for r in out.get("points", []):
        if r.get("top_kernels"):
            print(f"profile {r['method']} N={r['n']} opt={r.get('optimizer')}: {r['kernels_per_step']} kernels, "
                  f"{r['kernel_busy_ms']:.2f} ms of kernel time (graph step {r.get('fused_step_ms', 0):.2f} ms)")
            for k in r["top_kernels"]:
                print(f"   {k['ms']:8.2f} ms  {k['calls']:5d} x  {k['name']}")
    for t in out.get("trajectory", []):
        print(f"trajectory {t['method']}: max rel diff fused vs alone, first k steps: {t['max_rel_diff_first_k']}"
              + (f"; bf16 noise band (padded vs eager): "
                 f"{t['noise_reference']['padded_vs_eager_max_rel_diff_first_k']}" if "noise_reference" in t else ""))


def fused_part(a, device, save) -> dict:
    out: dict = {"points": [], "lone": [], "streams": [], "group": [], "trajectory": [], "smoke": a.smoke}
    steps, warm = (3, 1) if a.smoke else (a.steps, a.warmup)
    for method in a.methods:
        cfg = bench_cfg(a.smoke, a.glue)
        init = initial_state(cfg, method)
        for ln in a.fused_lengths:
            seq = LENGTHS[ln]
            for bs in a.fused_batch_sizes:
                out["lone"].append(lone_point(cfg, method, bs, seq, device, steps, warm))
                save(out)
                for n in a.fused_n:
                    for opt in a.fused_optimizers:  # side by side in one run: their ratio is measured
                        out["points"].append(fused_stepper_point(cfg, method, n, bs, seq, device, steps, warm, init,
                                                                 profile=n == max(a.fused_n), optimizer=opt))
                        save(out)
        for bs in a.fused_extra_bs:  # rows padded to a common batch size: what a run of another size costs
            out["points"].append(fused_stepper_point(cfg, method, max(a.fused_n), bs, LENGTHS[a.fused_lengths[0]],
                                                     device, steps, warm, init))
            save(out)
        if method == "lora" and a.fused_dropout_n:
            for n in a.fused_dropout_n:  # the cost of per-run dropout masks (one draw per run and step)
                out["points"].append(fused_stepper_point(cfg, method, n, a.fused_batch_sizes[0],
                                                         LENGTHS[a.fused_lengths[0]], device, steps, warm, init,
                                                         dropout=0.1))
                save(out)
        for n in a.fused_group_n:
            try:
                point = fused_group_point(cfg, method, n, a.fused_batch_sizes[0], device, steps, warm, init)
            except torch.cuda.OutOfMemoryError as e:  # recorded; the later points still run
                point = {"kind": "group", "method": method, "n": n, "batch_size": a.fused_batch_sizes[0],
                         "error": f"out of memory: {str(e)[:200]}"}
                gc.collect()
                release([], device)
            out["group"].append(point)
            save(out)
        if a.fused_streams and device.type == "cuda":
            w = worker_scaling([a.fused_streams], method, a.worker_seconds, modes=("streams",), eager=False)
            for p in w["points"]:
                if p["mode"] == "fast" and p["streams"] > 1:
                    out["streams"].append({"kind": "streams", "method": method, "n": p["streams"], "batch_size": 4,
                                           "seq_len": LENGTHS["sst2"], "run_steps_per_s": p["aggregate_steps_per_s"],
                                           "errors": p["errors"]})
            save(out)
    for method in a.methods if a.fused_trajectory_steps else []:
        out["trajectory"].append(fused_trajectory(method, a.fused_trajectory_steps, a.fused_trajectory_others,
                                                  device, a.glue, a.smoke, a.noise_ref, a.fused_trajectory_levers))
        save(out)
    fused_table(out)
    return out
# -- step levers (issue 20) ----------------------------------------------------------------------------------------
PROTOCOL_BATCH = {"full": 2, "lora": 1}  # configs/smollm2.yaml's phase-1 best for SST-2 (the critical chains)
SINGLE_LEVERS = ["bf16_weights", "flat_optimizer", "lora_fused", "fused_projections", "fused_kernels"]
CUMULATIVE = ["bf16_weights", "flat_optimizer", "lora_fused", "fused_projections", "fused_kernels", "compile"]


def lever_plan(methods: list[str], liger: bool, smoke: bool) -> list[dict]:
    """The measured points, most important first (a run cut short by its time limit keeps the first ones):
    per method at its protocol batch: no lever, each lever alone, the levers added one by one (compile last);
    then the other batch size with none / all; then compile alone (its own compilation: fp32 weights)."""
    plan = []
    for m in methods:
        usable = [n for n in CUMULATIVE if (n != "lora_fused" or m == "lora") and (n != "fused_kernels" or liger)]
        bs = PROTOCOL_BATCH[m]
        plan.append({"method": m, "batch_size": bs, "levers": []})
        plan += [{"method": m, "batch_size": bs, "levers": [n]} for n in SINGLE_LEVERS if n in usable]
        for k in range(2, len(usable) + 1):
            plan.append({"method": m, "batch_size": bs, "levers": usable[:k]})
    tail = []
    for m in methods:
        usable = [n for n in CUMULATIVE if (n != "lora_fused" or m == "lora") and (n != "fused_kernels" or liger)]
        other = 2 if PROTOCOL_BATCH[m] == 1 else 1
        tail += [{"method": m, "batch_size": other, "levers": []}, {"method": m, "batch_size": other, "levers": usable}]
    tail += [{"method": m, "batch_size": PROTOCOL_BATCH[m], "levers": ["compile"]} for m in methods]
    if "lora" in methods:  # the SST-2 LoRA best has dropout 0.16: masks come from the run's generator
        usable = [n for n in CUMULATIVE if n != "fused_kernels" or liger]
        tail.append({"method": "lora", "batch_size": 1, "levers": usable, "dropout": 0.16})
    tail += [{"method": m, "batch_size": 32, "levers": lv, "eval": True} for m in methods
             for lv in ([], [n for n in CUMULATIVE if n != "flat_optimizer" and (n != "lora_fused" or m == "lora")
                             and (n != "fused_kernels" or liger)])]
    if smoke:  # one of each kind of tail point
        tail = [p for p in tail if p.get("dropout") or p.get("eval")][:2] + tail[:2]
    return plan + tail


class _OpCount:
    """Counts the non-view ATen operators a CPU step runs: the CPU stand-in for CUDA kernels (smoke runs)."""

    VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "slice", "select", "permute",
             "detach", "alias", "as_strided", "squeeze", "split", "split_with_sizes", "unbind", "_reshape_alias",
             "reshape", "empty", "empty_like", "new_empty", "empty_strided", "lift_fresh", "_local_scalar_dense"}

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if name not in counter.VIEWS:
                    counter.n += 1
                return func(*args, **(kwargs or {}))

        self.n, self.mode = 0, Mode()


def kernels_of_step(st, width: int, device) -> tuple[int, list]:
    """CUDA kernels of one step, counted by the profiler on the very code the graphs replay, run without capture
    (``_forward_backward`` + ``_optimizer_step`` on the step's static buffers: a real step). CPU: ATen ops."""
    from collections import Counter

    if device.type != "cuda":
        c = _OpCount()
        with c.mode:
            st._forward_backward(width)
            st._optimizer_step()
        return c.n, []
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        st._forward_backward(width)
        st._optimizer_step()
        sync(device)
    names = [e.name[:60] for e in prof.events() if e.device_type.name == "CUDA"]
    return len(names), Counter(names).most_common(8)


def lever_point(model_name: str, point: dict, seq: int, device, steps: int, warm: int, opts: dict) -> dict:
    """One measured point: a fresh model, the fast path with ``point['levers']``, a fixed random batch."""
    from lorastudy.step_levers import StepLevers

    method, bs = point["method"], point["batch_size"]
    amp = torch.bfloat16 if device.type == "cuda" or opts.get("cpu_bf16") else None
    graphs = device.type == "cuda"
    model = cached_model(model_name, method, device, dropout=point.get("dropout", 0.0))
    if point.get("dropout"):
        M.seed_dropout(model, 0, device)
    params = [p for p in model.parameters() if p.requires_grad]
    fuse_rms_norms(model)
    levers = StepLevers.of(*point["levers"], compile_mode=opts["compile_mode"], cache_dir=opts.get("cache_dir"),
                           compile_backend=opts["compile_backend"])
    opt = bench_optimizer(model, bs, device, graphs=graphs)
    sched = get_linear_schedule_with_warmup(opt, 0, 10**7)
    gen = torch.Generator().manual_seed(0)
    b = {k: v.cpu() for k, v in random_batch(model.config.vocab_size, bs, seq, "cpu", gen).items()}
    y = torch.randint(0, 2, (bs,), generator=gen)
    t0 = time.perf_counter()
    st = StaticTrainStep(model, params, opt, bs, 0.3, amp, device, cuda_graph=graphs, levers=levers)
    st.step(b, y)
    sched.step()
    sync(device)
    first_s = time.perf_counter() - t0
    ms = time_steps(lambda st=st, sched=sched: (st.step(b, y), sched.step()), warm, steps, device)
    total, n = st.take_loss()
    loss = float(total) / max(1, n)
    kernels, top = kernels_of_step(st, seq, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    st.close()
    del st, opt, sched, model, params
    release([], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {**point, "label": levers.label(), "seq_len": seq, "ms_per_step": ms, "kernels_per_step": kernels,
            "us_per_kernel": ms * 1e3 / kernels if kernels else None, "first_step_s": first_s,
            "kernel_unit": "CUDA kernels" if device.type == "cuda" else "ATen ops (CPU stand-in)",
            "top_kernels": top, "mean_loss": loss, "peak_memory_bytes": peak, "timed_steps": steps}


def eval_point(model_name: str, point: dict, seq: int, device, steps: int, warm: int, opts: dict) -> dict:
    """The evaluation forward (StaticForward, eval mode) with ``point['levers']``: ms per batch of
    ``batch_size`` rows (validation: 2,000 rows every quarter epoch; the test split once)."""
    from lorastudy.fast_step import StaticForward
    from lorastudy.step_levers import StepLevers

    amp = torch.bfloat16 if device.type == "cuda" or opts.get("cpu_bf16") else None
    model = cached_model(model_name, point["method"], device).eval()
    fuse_rms_norms(model)
    levers = StepLevers.of(*point["levers"], compile_mode=opts["compile_mode"], cache_dir=opts.get("cache_dir"),
                           compile_backend=opts["compile_backend"])
    gen = torch.Generator().manual_seed(0)
    b = {k: v.cpu() for k, v in random_batch(model.config.vocab_size, point["batch_size"], seq, "cpu", gen).items()}
    t0 = time.perf_counter()
    fwd = StaticForward(model, point["batch_size"], amp, device, cuda_graph=device.type == "cuda", levers=levers)
    fwd.logits(b)
    sync(device)
    first_s = time.perf_counter() - t0
    ms = time_steps(lambda fwd=fwd: fwd.logits(b), warm, steps, device)
    fwd.close()
    del fwd, model
    release([], device)
    return {**point, "label": levers.label(), "seq_len": seq, "ms_per_step": ms, "kernels_per_step": 0,
            "us_per_kernel": None, "first_step_s": first_s, "timed_steps": steps}


def lever_trajectory(model_name: str, method: str, names: list[str], n_steps: int, seq: int, device, glue,
                     opts: dict) -> dict:
    """200 real SST-2 steps from one init: eager (dynamic padding, the reference), eager on batches padded to
    ``seq`` (same math, other shapes: the bf16 noise band) and the fast path with ``names``. The batches are the
    first ``n_steps`` of the length-grouped order (seed 42) whose rows are at most ``seq`` tokens, so every
    batch pads to one width (one compiled graph). Within the band: for every k, the levers' max relative loss
    difference to eager over the first k steps is at most max(2 x the padded one's, 0.01)."""
    from lorastudy.step_levers import StepLevers

    amp = torch.bfloat16 if device.type == "cuda" or opts.get("cpu_bf16") else None
    graphs = device.type == "cuda"
    bs = PROTOCOL_BATCH[method]
    cfg = load_config(None, [f"model.source={'smollm2-135m' if model_name == 'smollm2' else M.TINY}"]
                      + ([f"data.source={glue}"] if glue else []))
    splits = D.splits_for(cfg, "sst2")
    tok = M.load_tokenizer(cfg.model)
    enc = D.encode(tok, splits.train, cfg.task("sst2"), cfg.data)
    lengths = enc.lengths()
    order = [idx for idx in D.length_grouped_order(lengths, bs, np.random.default_rng(42))
             if int(lengths[idx].max()) <= seq][:n_steps]
    lr = 2e-5 if method == "full" else 5e-4
    hp = HParams(lr, bs, 1, 0.1, 0.0, 16, 0.0)
    out, first_s = {}, None
    for variant in ("levers", "eager", "eager_padded"):  # the lever path first: a broken path fails at once
        model = cached_model(model_name, method, device)
        params = [p for p in model.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        if variant == "levers":
            fuse_rms_norms(model)
            levers = StepLevers.of(*names, compile_mode=opts["compile_mode"], cache_dir=opts.get("cache_dir"),
                                   compile_backend=opts["compile_backend"])
            opt = make_optimizer(model, hp, device, graphs=graphs)
            st = StaticTrainStep(model, params, opt, bs, 0.3, amp, device, cuda_graph=graphs, levers=levers)
        else:
            opt = make_optimizer(model, hp, device)
            s = Setup(model, None, device, amp, 0, 0, params)
        sched = get_linear_schedule_with_warmup(opt, int(0.1 * n_steps), n_steps)
        step = _static_loss(st, sched) if variant == "levers" else _eager_loss(s, opt, sched, device)
        out[variant], first = _losses(order, enc, tok, (lambda idx: None) if variant == "eager" else (lambda idx: seq),
                                      step, t0)
        if variant == "levers":  # the first step's time includes compilation and capture
            first_s = first
            st.close()
        del model, opt, sched, params
        release([], device)
    e = np.array(out["eager"])
    rel = lambda v: np.abs(np.array(v) - e) / np.maximum(np.abs(e), 1e-8)  # noqa: E731
    bd = band(out)  # (both readings, over the fixed prefixes and the whole run: trajectory_band.py)
    ks, lev, pad = bd["ks"], bd["relative"]["candidate"], bd["relative"]["padded"]
    res = {"method": method, "levers": names, "batch_size": bs, "seq_len": seq, "steps": len(order), "lr": lr,
           "losses": out, "max_rel_diff_first_k": {"levers_vs_eager": lev, "eager_padded_vs_eager": pad},
           "median_rel_diff": {"levers_vs_eager": float(np.median(rel(out["levers"]))),
                               "eager_padded_vs_eager": float(np.median(rel(out["eager_padded"])))},
           "mean_loss_last_20": {k: float(np.mean(v[-20:])) for k, v in out.items()},
           "within_band": bd["relative"]["within"], "first_step_s": first_s, "band": bd}
    print(f"trajectory {method} [{'+'.join(names)}] {len(order)} steps: levers vs eager max rel diff "
          f"{lev[ks[-1]]:.4f} (median {res['median_rel_diff']['levers_vs_eager']:.4f}); padded eager vs eager "
          f"{pad[ks[-1]]:.4f}; last-20 mean loss {res['mean_loss_last_20']}; within band: relative "
          f"{res['within_band']}, absolute {res['band']['absolute']['within']}",
          flush=True)
    return res


def levers_part(a, device, save, result: dict) -> None:
    """Run the plan point by point (saved after each), stopping when ``a.budget_s`` is spent."""
    from lorastudy.layer_kernels import liger_available, set_compile_cache

    t_start = time.perf_counter()
    smoke = a.smoke
    model_name = "tiny" if smoke else "smollm2"
    liger = device.type == "cuda" and liger_available()
    cache = set_compile_cache(a.compile_cache)
    opts = {"compile_mode": a.compile_mode, "compile_backend": a.compile_backend, "cache_dir": cache,
            "cpu_bf16": smoke}
    steps = 3 if smoke else a.lever_steps
    warm = 1 if smoke else a.warmup
    seq = LENGTHS["sst2"]
    res = result["levers"] = {"points": [], "trajectory": [], "skipped": [], "liger_available": liger,
                              "compile_cache_dir": str(cache) if cache else None, "compile_mode": a.compile_mode,
                              "compile_backend": a.compile_backend, "model": model_name,
                              "torch": torch.__version__}
    left = lambda: a.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    plan = lever_plan(a.methods, liger, smoke)
    trajectories = [m for m in ("lora", "full") if m in a.methods] if "trajectory" not in a.skip else []
    n_main = sum(1 for p in plan if p["batch_size"] == PROTOCOL_BATCH[p["method"]] and "dropout" not in p
                 and p["levers"] != ["compile"] and not p.get("eval"))
    done: dict[str, dict] = {}  # --resume: points (and trajectories) measured by an earlier call
    old_traj: dict[str, dict] = {}
    if a.resume and a.resume.is_file():
        old = json.loads(a.resume.read_text()).get("levers", {})
        for q in old.get("points", []):
            if "error" not in q:
                keys = ("method", "batch_size", "levers", "dropout", "eval")
                done[json.dumps({k: q[k] for k in sorted(keys) if k in q})] = q
        old_traj = {t["method"]: t for t in old.get("trajectory", []) if "error" not in t}

    def run_point(p: dict) -> None:
        if left() < a.point_reserve_s:
            res["skipped"].append(p)
            print(f"skipped (time budget): {p}", flush=True)
            return
        key = json.dumps({k: p[k] for k in sorted(p)})
        if key in done:
            res["points"].append(done[key])
            return
        try:
            r = (eval_point if p.get("eval") else lever_point)(model_name, p, seq, device, steps, warm, opts)
        except Exception as e:  # noqa: BLE001 - a failing lever must not cost the other points
            r = {**p, "error": f"{type(e).__name__}: {e}"}
            print(f"FAILED {p}: {r['error']}", flush=True)
        else:
            print(f"{'eval' if p.get('eval') else r['method']:4s} b={r['batch_size']} {r['label']:58s} "
                  f"{r['ms_per_step']:8.2f} ms "
                  f"{r['kernels_per_step']:6d} {'kernels' if device.type == 'cuda' else 'ops'} "
                  f"first step {r['first_step_s']:6.1f} s", flush=True)
        res["points"].append(r)
        save()

    # LoRA first (SST-2's LoRA run is the protocol's longest chain): its points, its trajectory, then full FT
    for m in sorted(a.methods, key=lambda m: m != "lora"):
        for p in plan[:n_main]:
            if p["method"] == m:
                run_point(p)
        if m not in trajectories:
            continue
        names = [n for n in CUMULATIVE if (n != "lora_fused" or m == "lora") and (n != "fused_kernels" or liger)]
        if m in old_traj:
            res["trajectory"].append(old_traj[m])
            continue
        if left() < a.point_reserve_s * 3:
            res["skipped"].append({"trajectory": m})
            continue
        try:
            res["trajectory"].append(lever_trajectory(model_name, m, names, 12 if smoke else a.trajectory_steps,
                                                      seq, device, a.glue, opts))
        except Exception as e:  # noqa: BLE001
            res["trajectory"].append({"method": m, "levers": names, "error": f"{type(e).__name__}: {e}"})
            print(f"FAILED trajectory {m}: {e}", flush=True)
        save()
    for p in plan[n_main:]:
        run_point(p)
    res["wall_s"] = time.perf_counter() - t_start
    save()
    print_lever_table(result)


def print_lever_table(result: dict) -> None:
    """The levers table (ms, kernels, us per kernel, vs no lever) and the trajectory verdicts, from the JSON."""
    res = result.get("levers") or {}
    pts = [p for p in res.get("points", [])]
    base = {(p["method"], p["batch_size"]): p for p in pts if not p.get("levers") and "error" not in p}
    print(f"\nstep levers ({res.get('model')}, {pts[0]['seq_len'] if pts and 'seq_len' in pts[0] else '?'} tokens; "
          f"{pts[0].get('kernel_unit', '') if pts else ''}; compile mode {res.get('compile_mode')}; liger "
          f"{'yes' if res.get('liger_available') else 'no'})")
    print("| method | batch | levers | ms/step | vs none | kernels/step | us/kernel | first step s |")
    print("|---|---|---|---|---|---|---|---|")
    for p in pts:
        label = "+".join(p["levers"]) or "none"
        if p.get("eval"):
            label = f"eval forward: {label}"
        if p.get("dropout"):
            label += f" (dropout {p['dropout']})"
        if "error" in p:
            print(f"| {p['method']} | {p['batch_size']} | {label} | failed: {p['error'][:80]} | | | | |")
            continue
        b = base.get((p["method"], p["batch_size"]))
        vs = f"{p['ms_per_step'] / b['ms_per_step']:.2f}x" if b else ""
        upk = f"{p['us_per_kernel']:.2f}" if p.get("us_per_kernel") else ""
        print(f"| {p['method']} | {p['batch_size']} | {label} | {p['ms_per_step']:.2f} | {vs} | "
              f"{p['kernels_per_step'] or ''} | {upk} | {p['first_step_s']:.1f} |")
    for t in res.get("trajectory", []):
        if "error" in t:
            print(f"trajectory {t['method']}: failed: {t['error']}")
            continue
        d = t["max_rel_diff_first_k"]
        ks = list(d["levers_vs_eager"])
        print(f"trajectory {t['method']} (batch {t['batch_size']}, {t['steps']} real SST-2 steps, "
              f"{'+'.join(t['levers'])}): max rel diff over first k steps, levers vs eager / padded eager vs "
              "eager: " + ", ".join(f"k={k} {d['levers_vs_eager'][k]:.4f}/{d['eager_padded_vs_eager'][k]:.4f}"
                                    for k in ks)
              + f"; last-20 mean loss {t['mean_loss_last_20']}; within band: relative {t['within_band']}, "
              f"absolute {band(t['losses'])['absolute']['within']}")
    if res.get("skipped"):
        print(f"skipped for time: {res['skipped']}")


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["steps", "trajectory", "workers"],
                    choices=["steps", "trajectory", "workers", "fused", "phase2", "levers"])
    ap.add_argument("--models", nargs="+", default=["smollm2", "tinyllama"])
    ap.add_argument("--methods", nargs="+", default=["full", "lora"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 16])
    ap.add_argument("--lengths", nargs="+", choices=list(LENGTHS), help=f"default per model: {MODEL_LENGTHS}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--trajectory-steps", type=int, default=200)
    ap.add_argument("--glue", default=os.environ.get("LORASTUDY_GLUE_DIR"), help="local GLUE directory")
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--worker-modes", nargs="+", choices=["processes", "streams"], default=["processes", "streams"],
                    help="grow the concurrent runs as processes, as streams of one process, or both")
    ap.add_argument("--worker-method", default="lora")
    ap.add_argument("--worker-seconds", type=float, default=8.0)
    ap.add_argument("--fused-n", nargs="*", type=int, default=[1, 4, 8, 16, 32, 64],
                    help="runs per fused group (none: only the lone run, the group, the trajectory)")
    ap.add_argument("--fused-batch-sizes", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--fused-lengths", nargs="+", choices=list(LENGTHS), default=["sst2", "rte"])
    ap.add_argument("--fused-extra-bs", nargs="*", type=int, default=[],
                    help="batch sizes also measured at the largest N only (first length)")
    ap.add_argument("--fused-dropout-n", nargs="*", type=int, default=[32],
                    help="LoRA group sizes also measured with dropout 0.1 (first batch size and length)")
    ap.add_argument("--fused-group-n", nargs="*", type=int, default=[32],
                    help="group sizes of the trainer-loop measurement on real SST-2 batches (first batch size)")
    ap.add_argument("--fused-optimizers", nargs="+", choices=["auto", "torch", "triton"], default=["auto"],
                    help="the fused groups' optimizer passes to time side by side (fused_step.resolve_optimizer)")
    ap.add_argument("--fused-streams", type=int, default=8, help="lone runs on this many streams (0: skip)")
    ap.add_argument("--fused-trajectory-steps", type=int, default=200, help="0: skip the trajectory check")
    ap.add_argument("--fused-trajectory-others", type=int, default=7, help="other runs in the trajectory's group")
    ap.add_argument("--fused-trajectory-levers", nargs="*", default=[],
                    help="also the same group with these step levers (e.g. fused_kernels), against it without")
    ap.add_argument("--noise-ref", type=Path, default=Path("benchmarks/results/train_step_trajectory_lora_h200.json"),
                    help="trajectory JSON whose padded-vs-eager difference is the bf16 noise band")
    ap.add_argument("--smoke", action="store_true",
                    help="fused and levers parts: the tiny random model, a few steps, every code path (CPU check)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    p2 = ap.add_argument_group("phase2 part")
    p2.add_argument("--phase2-n", type=int, default=3, help="runs per group (the seeds)")
    p2.add_argument("--phase2-variants", nargs="+", default=["pageable", "pinned", "pinned+fused_kernels"],
                    help="pageable|pinned, then +LEVER for each step lever")
    p2.add_argument("--phase2-steps", type=int, default=300)
    p2.add_argument("--phase2-warmup", type=int, default=100)
    p2.add_argument("--phase2-together", type=float, default=0.0,
                    help="then both groups at once (two threads and streams) for this many seconds (0: skip)")
    p2.add_argument("--phase2-urgent", action="store_true",
                    help="with --phase2-together: once more with the LoRA group's stream at high priority")
    lv = ap.add_argument_group("levers part")
    lv.add_argument("--lever-steps", type=int, default=200, help="timed steps per point (graph replays)")
    lv.add_argument("--budget-s", type=float, default=1e9, help="stop starting points after this many seconds")
    lv.add_argument("--point-reserve-s", type=float, default=20.0, help="start a point only with this much left")
    lv.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"])
    lv.add_argument("--compile-backend", default="inductor", help="aot_eager: trace without code generation")
    lv.add_argument("--compile-cache", type=Path, help="Inductor cache directory (kept between runs)")
    lv.add_argument("--skip", nargs="*", default=[], choices=["trajectory"])
    lv.add_argument("--resume", type=Path, help="a JSON of an earlier call: its points are kept, not re-measured")
    ap.add_argument("--table", type=Path, help="only print the fused and levers tables of this JSON (what a cut run "
                    "measured)")
    a = ap.parse_args()
    if a.table:
        d = json.loads(a.table.read_text())
        if "fused" in d:
            fused_table(d["fused"])
        if "levers" in d:
            print_lever_table(d)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    result: dict = {"meta": {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "steps": a.steps, "warmup": a.warmup, "code_version": code_version(),
        "command": "python " + " ".join(sys.argv)}}

    def save() -> None:  # after every part: a later failure keeps what was measured
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")

    if "steps" in a.parts:
        result["rows"] = []
        for name in a.models:
            for method in a.methods:
                lengths = a.lengths or MODEL_LENGTHS[name]
                result["rows"] += bench_model(name, method, a.batch_sizes, lengths, device, a.steps, a.warmup, gen)
                save()
    if "trajectory" in a.parts:
        result["trajectory"] = [trajectory(m, a.trajectory_steps, device, a.glue) for m in a.methods]
        save()
    if "workers" in a.parts:
        if device.type != "cuda":
            print("workers: needs a GPU, skipped")
        else:
            result["workers"] = worker_scaling(a.workers, a.worker_method, a.worker_seconds,
                                               save=lambda w: (result.__setitem__("workers", w), save()),
                                               modes=tuple(a.worker_modes))
            save()
    if "fused" in a.parts:
        result["fused"] = fused_part(a, device, save=lambda f: (result.__setitem__("fused", f), save()))
        save()
    if "phase2" in a.parts:
        result["phase2"] = phase2_part(a, device, save=lambda f: (result.__setitem__("phase2", f), save()))
        save()
    if "levers" in a.parts:
        if a.smoke:
            device = torch.device("cpu")
        levers_part(a, device, save, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
