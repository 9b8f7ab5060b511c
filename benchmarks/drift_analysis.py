"""Time the whole drift analysis (phase 4A) at the size of the full SmolLM2 study, on synthetic representations.

Base + 18 runs (2 methods x 3 seeds x 3 tasks), 32 layers (embeddings + 30 decoder layers + final norm), 750 probe
examples x 576 dims, both poolings, 10,000 resamples for the permutation tests and the H1a bootstrap. Target: at most
2 minutes on a 2-core CPU. Prints a table and writes JSON.

    python benchmarks/drift_analysis.py --out benchmarks/results/drift_analysis_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from lorastudy import drift as DR


def synthetic_task(rng, n: int, d: int, layers: int, task: str) -> DR.TaskReps:
    base = rng.standard_normal((layers, n, d), dtype=np.float32)
    runs = {}
    for m, scale in (("full", 0.6), ("lora", 0.15)):
        for s in (42, 1337, 2024):
            depth = np.linspace(0, 1, layers, dtype=np.float32)[:, None, None]
            runs[(m, s)] = base + scale * depth * rng.standard_normal((layers, n, d), dtype=np.float32)
    names = ["embeddings", *[f"layer{i}" for i in range(layers - 2)], "final_norm"]
    return DR.TaskReps(task, names, base, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=750)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/drift_analysis_cpu.json"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    tasks = {t: synthetic_task(rng, a.n, a.dim, a.layers, t) for t in ("sst2", "mrpc", "rte")}
    timings = {}
    t_all = time.perf_counter()
    summaries = {}
    for t, tr in tasks.items():
        for pooling in ("last", "mean"):  # the real phase analyzes both poolings
            t0 = time.perf_counter()
            s = DR.summarize_task(DR.analyze_task(tr), a.resamples, 0, 0.2)
            timings[f"{t}/{pooling}"] = time.perf_counter() - t0
            if pooling == "last":
                summaries[t] = s
    t0 = time.perf_counter()
    correct = {t: {(m, s): rng.random(872) < 0.88 for m in ("full", "lora") for s in (42, 1337, 2024)}
               for t in tasks}
    hyp = {"H1a": DR.h1a(correct, 3.0, a.resamples, 0, 0.05), "H1b": DR.h1b(summaries, 0.2, 0.05)}
    timings["hypotheses"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    for k, v in timings.items():
        print(f"{k:12s} {v:7.1f} s")
    print(f"{'total':12s} {total:7.1f} s   (target <= 120 s; {os.cpu_count()} cores)")
    res = {"total_s": total, "timings_s": timings, "n": a.n, "dim": a.dim, "layers": a.layers,
           "runs_per_task": 6, "resamples": a.resamples, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "h1b_overall": hyp["H1b"]["overall"]["estimate"],
           "command": f"python benchmarks/drift_analysis.py --n {a.n} --dim {a.dim} --layers {a.layers} "
                      f"--resamples {a.resamples}"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
