"""How long the whole protocol of a config takes on one GPU: optimizer steps counted from the real data and the
config, divided by measured step rates. An estimate (a dry run), to be set beside a timed ``lorastudy run``.

Inputs: the config, the local GLUE files, the worker-scaling JSON of benchmarks/train_step.py (aggregate steps/s
of concurrent fast runs and of one eager run, SmolLM2 at batch 4 x 24 tokens), and optionally the trials of a
tuning run made on the GPU (their measured GPU-seconds per planned step, which include evaluation, graph capture,
longer sequences and the work lost to interrupted trials).

    python benchmarks/study_time.py configs/smollm2.yaml --glue ../shared/data/glue \\
        --rates benchmarks/results/train_step_workers_h200.json \\
        --trials benchmarks/results/tune_smollm2_h200x4.json \\
        --out benchmarks/results/study_time_smollm2_h200_estimate.json

What it leaves out is printed with the table: early stopping (makes runs shorter), evaluation passes and graph
captures (longer; the trials-based column includes them), extraction, drift, serving and the report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import product
from pathlib import Path

import numpy as np

from lorastudy import data as D
from lorastudy.config import load_config


def planned_steps(n_train: int, batch_size: int, epochs: float) -> int:
    return math.ceil(epochs * math.ceil(n_train / batch_size))


def search_grid(space) -> list[tuple[int, int]]:
    """(batch size, epochs) pairs of the search space; TPE samples them roughly uniformly in the 10 start-up
    trials, so the mean over the grid is the expected size of a trial."""
    return list(product(space.batch_size, range(space.epochs.low, space.epochs.high + 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--glue", required=True, help="local GLUE directory")
    ap.add_argument("--rates", type=Path, required=True, help="worker-scaling JSON of benchmarks/train_step.py")
    ap.add_argument("--trials", type=Path, help="trials JSON of a tuning run on the same GPU")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cfg = load_config(a.config, [f"data.source={a.glue}"])
    rates = json.loads(a.rates.read_text())
    fast_rate = rates["best"]["aggregate_steps_per_s"]
    eager_rate = rates["eager_one_run_steps_per_s"]

    rows = []
    for task in cfg.tasks:
        n_train = len(D.splits_for(cfg, task).train)
        n_hpo = min(n_train, cfg.search.train_subset.get(task, n_train))
        for method in cfg.methods:
            grid = search_grid(cfg.search.spaces[method])
            per_trial = float(np.mean([planned_steps(n_hpo, b, e) for b, e in grid]))
            rows.append({"phase": "tune", "task": task, "method": method, "n_train": n_hpo,
                         "runs": cfg.search.n_trials, "steps": per_trial * cfg.search.n_trials})
            rows.append({"phase": "train-all", "task": task, "method": method, "n_train": n_train,
                         "runs": len(cfg.seeds), "steps": float(len(cfg.seeds) * planned_steps(
                             n_train, cfg.train.batch_size, cfg.train.epochs))})

    sec_per_step_trials = None
    if a.trials:
        data = json.loads(a.trials.read_text())
        # a complete run is recorded with its calls ({"meta": {"calls", "gpus"}, "trials"}); a partial one as a list
        trials = data["trials"] if isinstance(data, dict) else data
        done = [t for t in trials if t["state"] == "COMPLETE"]
        steps = 0
        for t in done:
            n = next(r["n_train"] for r in rows if r["phase"] == "tune" and r["task"] == t["task"])
            steps += planned_steps(n, t["params"]["batch_size"], t["params"]["epochs"])
        if isinstance(data, dict):
            # GPU-seconds of the calls (wall time x GPUs, the work lost to interrupted and failed trials included)
            # per planned step of the completed trials: the time on one GPU at the run's per-GPU concurrency
            gpu_s = sum(c["wall_s"] for c in data["meta"]["calls"]) * data["meta"]["gpus"]
        else:
            from datetime import datetime

            # completed trials only, over the span in which they ran (runs still in flight then are not counted:
            # a pessimistic rate)
            gpu_s = (max(datetime.fromisoformat(t["end"]) for t in done)
                     - min(datetime.fromisoformat(t["start"]) for t in done)).total_seconds()
        sec_per_step_trials = gpu_s / steps

    for r in rows:
        r["seconds_fast_best_concurrency"] = r["steps"] / fast_rate
        r["seconds_one_eager_run"] = r["steps"] / eager_rate
        if sec_per_step_trials:
            r["seconds_at_tuning_run_rate"] = r["steps"] * sec_per_step_trials
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith("seconds") or k == "steps"}
    out = {"config": str(a.config), "rates_from": str(a.rates), "trials_from": str(a.trials) if a.trials else None,
           "fast_aggregate_steps_per_s": fast_rate, "eager_steps_per_s": eager_rate,
           "tuning_run_seconds_per_planned_step": sec_per_step_trials, "rows": rows, "total": total,
           "not_included": ["early stopping (shortens runs)", "evaluation passes and graph captures (in the "
                            "tuning-run column only)", "extraction, drift, serving benchmark, report"],
           "command": "python " + " ".join(sys.argv)}
    print(f"{'phase':10s} {'task':5s} {'method':6s} {'runs':>4s} {'steps':>10s} {'fast h':>8s} {'eager h':>8s}"
          + (f" {'tune-rate h':>11s}" if sec_per_step_trials else ""))
    for r in rows + [dict(phase="TOTAL", task="", method="", runs=0, **total)]:
        print(f"{r['phase']:10s} {r['task']:5s} {r['method']:6s} {r['runs']:4d} {r['steps']:10.0f} "
              f"{r['seconds_fast_best_concurrency'] / 3600:8.2f} {r['seconds_one_eager_run'] / 3600:8.2f}"
              + (f" {r['seconds_at_tuning_run_rate'] / 3600:11.2f}" if sec_per_step_trials else ""))
    print("not included:", "; ".join(out["not_included"]))
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
