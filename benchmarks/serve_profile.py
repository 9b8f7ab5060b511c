"""Where a serving forward's time goes: GPU kernels per forward, CUDA-graph replay time, and the two floors
(weights read once at the measured copy bandwidth; matmul FLOPs at the measured bf16 matmul rate), for the merged
and batched engines on HF's plain modules and on the fused serving path (serving/fuse.py), all in one run.
Random-weight architectures, bf16, every row of a batch on a different adapter (batched) or one task (merged).

    python benchmarks/serve_profile.py --out benchmarks/results/serve_profile_h200.json     # GPU
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from lorastudy.serving.benchmark import _time, random_batch
from lorastudy.serving.build import build_engines, synthetic_adapters, synthetic_base
from lorastudy.serving.engines import GraphRunner
from lorastudy.store import code_version


def ceilings(device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul rate, median of 20."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_ms = float(np.median(_time(functools.partial(y.copy_, x), 5, 20, device)))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = float(np.median(_time(functools.partial(torch.matmul, a, b), 5, 20, device)))
    return {"copy_bytes_per_s": 2 * (1 << 30) / (copy_ms / 1e3), "bf16_matmul_flop_per_s": 2 * 8192**3 / (mm_ms / 1e3)}


def decoder_linear_params(model) -> int:
    """Weights every forward reads in full: the decoder's projections (not the embedding table, of which only the
    batch's rows are read)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)


def kernels(fn, device) -> tuple[int, collections.Counter, float]:
    """GPU kernels (and memcpy/memset) one call launches, by name, and their summed device time in ms."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names: collections.Counter = collections.Counter()
    us = 0.0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            names[e.name] += 1
            us += e.time_range.elapsed_us()
    return sum(names.values()), names, us / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["tinyllama", "smollm2"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("serve_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    ceil = ceilings(dev)
    rows = []
    for arch in args.archs:
        base = synthetic_base(arch, device=dev)
        adapters = synthetic_adapters(base, args.adapters, targets=args.targets, tasks=["sst2", "mrpc", "rte"])
        eng = build_engines(base, adapters, args.targets, ["merged", "batched"], dev, torch.bfloat16)
        wbytes = 2 * decoder_linear_params(eng["merged"].models[0])
        gen = torch.Generator().manual_seed(0)
        for b in args.batch_sizes:
            batch = random_batch(base.config.vocab_size, b, args.seq_len, dev, gen, torch.bfloat16)
            tokens = b * args.seq_len
            floor_bytes_ms = wbytes / ceil["copy_bytes_per_s"] * 1e3
            floor_flops_ms = 2 * tokens * wbytes / 2 / ceil["bf16_matmul_flop_per_s"] * 1e3
            for name in ("merged", "batched"):
                idx = (torch.arange(b) % (args.adapters if name == "batched" else 1)).to(dev)
                present = [0] if name == "merged" else None
                for fused in (False, True):
                    eng[name].set_fused(fused)
                    n, by_name, dev_ms = kernels(functools.partial(eng[name], batch, idx, present), dev)
                    runner = GraphRunner(eng[name], batch, idx, present)
                    ms = _time(functools.partial(runner, batch, idx, present), 30, args.requests, dev)
                    p50 = float(np.median(ms))
                    rows.append({
                        "arch": arch, "engine": name, "fused": fused, "batch_size": b, "seq_len": args.seq_len,
                        "kernels": n, "kernel_time_ms": dev_ms, "graph_p50_ms": p50,
                        "graph_p95_ms": float(np.percentile(ms, 95)), "us_per_kernel": p50 * 1e3 / n,
                        "floor_bytes_ms": floor_bytes_ms, "floor_flops_ms": floor_flops_ms,
                        "top_kernels": by_name.most_common(12),
                    })
                    r = rows[-1]
                    print(f"{arch:9s} {name:7s} fused={fused!s:5s} b={b:2d}  kernels {n:5d}  graph p50 "
                          f"{p50:6.3f} ms  ({r['us_per_kernel']:.2f} us/kernel)  floors {floor_bytes_ms:.3f} / "
                          f"{floor_flops_ms:.3f} ms", flush=True)
        eng = base = runner = None  # free this architecture's models before the next
        torch.cuda.empty_cache()
    print("\n| arch | engine | fused | batch | kernels | graph p50 ms | us/kernel | bytes floor ms | FLOP floor ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['engine']} | {'yes' if r['fused'] else 'no'} | {r['batch_size']} | {r['kernels']} "
              f"| {r['graph_p50_ms']:.3f} | {r['us_per_kernel']:.2f} | {r['floor_bytes_ms']:.3f} "
              f"| {r['floor_flops_ms']:.3f} |")
    out = {"command": "python " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name(dev),
           "torch": torch.__version__, "python": platform.python_version(), "code_version": code_version(),
           "ceilings": ceil, "adapters": args.adapters, "targets": args.targets, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
