"""Optimizer-step time: the fast path (static shapes + CUDA graphs) vs lorastudy's eager step vs a plain Hugging
Face/PEFT eager loop, all measured in the same run; loss trajectories fast vs eager on real SST-2 batches; and the
aggregate throughput of N training processes sharing one GPU. Prints tables and writes JSON.

Parts (``--parts``):
  steps       ms/step, tokens/s, speedup vs HF eager and MFU, for SmolLM2-135M (real weights) and TinyLlama-1.1B's
              architecture (random weights), full FT and LoRA, at several batch sizes; CUDA kernels per step by name.
  trajectory  200 steps on real SST-2 batches (batch 4, dropout 0): fast vs eager losses, and eager on the same
              bucket-padded batches as the bf16-noise reference (same math, other shapes).
  workers     N = 1, 2, 4, 8, 16 concurrent SmolLM2 runs on one GPU (fast path, batch 4), as N processes and as N
              streams of one process: aggregate steps/s, against one eager run.

    python benchmarks/train_step.py --out benchmarks/results/train_step_h200.json
    python benchmarks/train_step.py --parts steps --models smollm2 --batch-sizes 1 4 --steps 5   # quick CPU check
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from lorastudy import data as D
from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.fast_step import StaticTrainStep, default_buckets, fuse_rms_norms
from lorastudy.serving.benchmark import random_batch
from lorastudy.serving.build import synthetic_base
from lorastudy.store import code_version
from lorastudy.training import HParams, Setup, make_optimizer, train_step

LENGTHS = {"sst2": 24, "rte": 64}  # SST-2-like and RTE-like batch lengths (tokens), cf. data-stats p50
MODEL_LENGTHS = {"smollm2": ["sst2"], "tinyllama": ["rte"]}  # the issue's shapes: SST-2 batches; TinyLlama 16 x 64
PEAK_BF16 = 790e12  # dense bf16 FLOP/s measured on the H200 (the issue's reference)


def make_model(name: str, method: str, device, dropout: float = 0.0, seed: int = 0):
    if name == "smollm2":
        cfg = load_config(None, ["model.source=smollm2-135m"])
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
        losses = []
        for idx in order:
            pad_to = None if variant == "eager" else D.bucket_width(int(enc.lengths()[idx].max()), buckets)
            batch = D.collate([enc.input_ids[i] for i in idx], tok.pad_token_id, "right", pad_to)
            y = torch.tensor(enc.labels[idx])
            if variant == "fast":
                st.step(batch, y)
                sched.step()
                losses.append(float(st.take_loss()[0]))
            else:
                losses.append(float(train_step(s, opt, sched, {k: v.to(device) for k, v in batch.items()},
                                               y.to(device), 0.3)))
        out[variant] = losses
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
                   modes: tuple[str, ...] = ("processes", "streams")) -> dict:
    """Aggregate steps/s as concurrent runs grow, as processes (time-sliced on the GPU) and as streams of one
    process (their graphs may overlap), against one eager run."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {"method": method, "batch_size": 4, "seq_len": LENGTHS["sst2"], "seconds": seconds, "points": []}
    plan = [("eager", 1, 1)] + [("fast", n, 1) for n in counts if "processes" in modes or n == 1] \
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


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["steps", "trajectory", "workers"],
                    choices=["steps", "trajectory", "workers"])
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
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    a = ap.parse_args()
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
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
