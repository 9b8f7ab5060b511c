"""Optimizer-step time and tokens/s: lorastudy's training step vs a plain Hugging Face/PEFT eager loop, measured in
the same run, for full FT and LoRA, at several batch sizes and sequence lengths.

Models: SmolLM2-135M (real weights) and TinyLlama-1.1B's architecture with random weights.
Prints a table and writes JSON.

    python benchmarks/train_step.py --out benchmarks/results/train_step_h200.json
    python benchmarks/train_step.py --models smollm2 --batch-sizes 1 4 --steps 5   # quick CPU check
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import torch

from lorastudy import modeling as M
from lorastudy.config import load_config
from lorastudy.serving.benchmark import random_batch
from lorastudy.serving.build import synthetic_base
from lorastudy.training import HParams, Setup, make_optimizer, train_step

LENGTHS = {"sst2": 24, "rte": 64}  # SST-2-like and RTE-like batch lengths (tokens), cf. data-stats p50


def make_model(name: str, method: str, device):
    if name == "smollm2":
        cfg = load_config(None, ["model.source=smollm2-135m"])
        model, _ = M.load_base(cfg.model, 2, seed=0)
    else:
        model = synthetic_base("tinyllama", device=device)
    if method == "lora":
        model = M.wrap_lora(model, 8, 16, 0.0, ["q_proj", "v_proj"])
    return model.to(device).train()


def batch(vocab: int, b: int, s: int, device, gen):
    y = torch.randint(0, 2, (b,), generator=gen).to(device)
    return random_batch(vocab, b, s, device, gen), y


def time_steps(step_fn, n_warm: int, n: int, device) -> float:
    for _ in range(n_warm):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
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


def bench_model(name, method, shapes, device, steps, warm, gen) -> list[dict]:
    """Both loops on one model instance per (model, method); a fresh optimizer per measurement."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    model = make_model(name, method, device)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for ln, bs in shapes:
        seq = LENGTHS[ln]
        b, y = batch(model.config.vocab_size, bs, seq, device, gen)
        res = {"model": name, "method": method, "batch_size": bs, "seq_len": seq, "length_profile": ln,
               "device": str(device), "precision": "bf16-autocast" if amp else "fp32"}
        opt = torch.optim.AdamW(params, lr=1e-5)
        res["hf_eager_ms"] = time_steps(functools.partial(hf_eager_step, model, params, opt, b, y, amp, device),
                                        warm, steps, device)
        del opt
        s = Setup(model, None, device, amp, 0, 0, params)
        opt = make_optimizer(model, HParams(1e-5, bs, 1, 0.0, 0.0, 16, 0.0), device)
        res["lorastudy_ms"] = time_steps(functools.partial(train_step, s, opt, None, b, y, 0.3), warm, steps, device)
        del opt
        for loop in ("hf_eager", "lorastudy"):
            res[f"{loop}_tokens_per_s"] = bs * seq / res[f"{loop}_ms"] * 1e3
        res["speedup"] = res["hf_eager_ms"] / res["lorastudy_ms"]
        rows.append(res)
        print(f"{name:9s} {method:4s} {ln:4s} b={bs:<3d} s={seq:<3d} HF eager {res['hf_eager_ms']:8.2f} ms  "
              f"lorastudy {res['lorastudy_ms']:8.2f} ms  x{res['speedup']:.2f}  "
              f"{res['lorastudy_tokens_per_s']:9.0f} tok/s", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "tinyllama"])
    ap.add_argument("--methods", nargs="+", default=["full", "lora"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 16])
    ap.add_argument("--lengths", nargs="+", default=list(LENGTHS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = [(ln, bs) for ln in a.lengths for bs in a.batch_sizes]
    for name in a.models:
        for method in a.methods:
            rows += bench_model(name, method, shapes, device, a.steps, a.warmup, gen)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "steps": a.steps, "warmup": a.warmup,
            "command": "python benchmarks/train_step.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(a).items())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
