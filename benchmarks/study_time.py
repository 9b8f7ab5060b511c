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

With fused training (``--fused``: the JSON of ``benchmarks/train_step.py --parts fused``, e.g. from
benchmarks/gpu/fused.sh), a second table: each phase's time as the larger of its throughput bound (run-steps over
the measured fused rate) and its critical path (the longest chain of sequential steps x the measured step time of
its group). Phase 2 is planned as ``lorastudy train-all`` plans it (execution.plan_groups), with the phase-1 best
hyperparameters of ``--best-dir`` (``<task>_<method>_optimal.yaml``; default: the config's ``train`` settings):

    python benchmarks/study_time.py configs/smollm2.yaml --glue ../shared/data/glue \\
        --rates benchmarks/results/train_step_workers_h200.json --fused benchmarks/results/fused_h200.json \\
        --best-dir benchmarks/results/tune_smollm2_h200x4
With ``--levers`` (the JSON of ``benchmarks/train_step.py --parts levers``) it also computes the critical path:
a run's steps are sequential, so however wide the GPU is used, the study takes at least the longest chain of
(the longest tuning trial of a task x method, then that task x method's phase-2 run) at a lone run's measured step
latency, plus its validation passes; it is printed beside the total work (all trials and runs, in run-steps).

    python benchmarks/study_time.py configs/smollm2.yaml --glue ../shared/data/glue \\
        --rates benchmarks/results/train_step_workers_h200.json \\
        --trials benchmarks/results/tune_smollm2_h200x4.json \\
        --levers benchmarks/results/train_step_levers_h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import product
from pathlib import Path

import numpy as np
import yaml

from lorastudy import data as D
from lorastudy.config import load_config


def planned_steps(n_train: int, batch_size: int, epochs: float) -> int:
    return math.ceil(epochs * math.ceil(n_train / batch_size))


def search_grid(space) -> list[tuple[int, int]]:
    """(batch size, epochs) pairs of the search space; TPE samples them roughly uniformly in the 10 start-up
    trials, so the mean over the grid is the expected size of a trial."""
    return list(product(space.batch_size, range(space.epochs.low, space.epochs.high + 1)))


def _step_ms(points: list[dict], n: int) -> float:
    """Fused step time at ``n`` runs, linear between the measured group sizes (clamped at the ends)."""
    pts = sorted((p["n"], p["fused_step_ms"]) for p in points)
    if n <= pts[0][0]:
        return pts[0][1]
    for (n0, t0), (n1, t1) in zip(pts, pts[1:], strict=False):
        if n <= n1:
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
    return pts[-1][1] * n / pts[-1][0]  # beyond the largest group: no better than its rate


def best_hparams(cfg, best_dir: Path | None, task: str, method: str):
    """A phase-2 run's hyperparameters (training.HParams): ``best_dir/<task>_<method>_optimal.yaml`` over the
    config's train settings, as train-all takes them."""
    from lorastudy.training import HParams

    p = best_dir / f"{task}_{method}_optimal.yaml" if best_dir else None
    over = (yaml.safe_load(p.read_text()) or {}).get("hparams", {}) if p and p.is_file() else {}
    return HParams.from_config(cfg, method, over)


def merge_fused(files: list[dict], optimizer: str | None) -> dict:
    """The ``fused`` parts of several benchmarks/train_step.py JSONs as one: their points, groups and streams;
    ``optimizer``: keep only the stepper points of that optimizer pass (points that do not name one are kept)."""
    out: dict = {"points": [], "group": [], "streams": [], "lone": []}
    for d in files:
        f = d.get("fused", d)
        for k in out:
            out[k] += f.get(k, [])
    if optimizer:  # points of that pass; points that name none only for a method without tagged ones (older files)
        tagged = {p["method"] for p in out["points"] if "optimizer" in p}
        out["points"] = [p for p in out["points"] if p.get("optimizer") == optimizer
                         or ("optimizer" not in p and p["method"] not in tagged)]
    return out


def fused_estimate(cfg, f: dict, best_dir: Path | None, phase2: dict | None = None) -> dict:
    """Phase 1 and 2 times with fused groups, from measured fused step times (see the module docstring).

    Groups of a phase run at once (tune: one group per method and worker; train-all: its groups as units on the
    worker's streams), so a phase takes the larger of its throughput bound (each method's run-steps at the widest
    group's measured rate, the methods one after the other) and its longest chain (a group's longest run x that
    group's step time: measured in the trainer's loop for the phase-2 groups of ``phase2`` where one matches the
    method and batch size, else the stepper curve at batch 2). The phases follow each other."""

    from lorastudy.execution import PlannedRun, plan_groups

    stepper = [p for p in f["points"] if "fused_step_ms" in p and not p.get("lora_dropout")]
    shape = (stepper[0]["batch_size"], stepper[0]["seq_len"])
    curves = {m: [p for p in stepper if p["method"] == m and (p["batch_size"], p["seq_len"]) == shape]
              for m in cfg.methods}
    group = {p["method"]: p for p in f.get("group", []) if "run_steps_per_s" in p}
    widest = {}
    for m in cfg.methods:  # the aggregate rate of a full GPU: the widest group the config allows, in the
        # trainer's loop where measured at that width
        fit = [p for p in curves[m] if p["n"] <= cfg.train.fuse_max_runs] or curves[m]
        top = max(fit, key=lambda p: p["n"])
        g = group.get(m)
        widest[m] = g["run_steps_per_s"] if g and g["n"] == top["n"] else top["run_steps_per_s"]
    pts2 = [p for p in (phase2 or {}).get("phase2", {}).get("points", []) if "fused_step_ms" in p]
    measured2: dict = {}  # (method, batch) -> (ms, runs): the fastest variant alone
    for p in pts2:
        k = (p["method"], p["batch_size"])
        if not p.get("together") and (k not in measured2 or p["fused_step_ms"] < measured2[k][0]):
            measured2[k] = (p["fused_step_ms"], p["n"])
    # side by side, as train-all runs a process's groups (normal-priority streams: the urgent variant is not used)
    together2 = {(p["method"], p["batch_size"]): p["fused_step_ms"] for p in pts2
                 if p.get("together") and not p.get("urgent")}
    rows = []
    n_train = {t: len(D.splits_for(cfg, t).train) for t in cfg.tasks}
    # phase 1: one fused group per method takes every trial of the method's studies
    tune = {}
    for m in cfg.methods:
        grid = search_grid(cfg.search.spaces[m])
        work = chain = 0.0
        for t in cfg.tasks:
            n_hpo = min(n_train[t], cfg.search.train_subset.get(t, n_train[t]))
            work += float(np.mean([planned_steps(n_hpo, b, e) for b, e in grid])) * cfg.search.n_trials
            chain = max(chain, max(planned_steps(n_hpo, b, e) for b, e in grid))
        slots = min(cfg.train.fuse_max_runs, cfg.search.n_trials * len(cfg.tasks))
        ms = _step_ms(curves[m], slots)
        rate = group[m]["run_steps_per_s"] if m in group and group[m]["n"] == slots else slots / ms * 1e3
        tune[m] = {"run_steps": work, "slots": slots, "run_steps_per_s": rate, "throughput_s": work / rate,
                   "longest_trial_steps": chain, "critical_path_s": chain * ms / 1e3, "step_from": "stepper"}
        rows.append({"phase": "tune", "group": f"{m} x{slots}", **tune[m]})
    tune_s = max(sum(v["throughput_s"] for v in tune.values()), max(v["critical_path_s"] for v in tune.values()))
    # phase 2: the groups train-all plans
    runs = []
    for t in cfg.tasks:
        for m in cfg.methods:
            hp = best_hparams(cfg, best_dir, t, m)
            for s in cfg.seeds:
                runs.append(PlannedRun(f"{t}/{m}/seed{s}", t, m, s, hp, planned_steps(n_train[t], hp.batch_size,
                                                                                       hp.epochs)))
    work2 = dict.fromkeys(cfg.methods, 0.0)
    train_chain = 0.0
    for g in plan_groups(cfg, runs, cfg.train.fuse_max_runs):
        m, n = g[0].method, len(g)
        bs = {r.hp.batch_size for r in g}
        key = (m, next(iter(bs))) if len(bs) == 1 else None
        if key in measured2 and measured2[key][1] == n:  # this group's shape measured in the trainer's loop
            ms, src = measured2[key][0], "phase2 group"
        else:
            ms, src = _step_ms(curves[m], n), "stepper"
        steps = max(r.steps for r in g)
        run_steps = sum(r.steps for r in g)
        work2[m] += run_steps
        train_chain = max(train_chain, steps * ms / 1e3)
        rows.append({"phase": "train-all", "group": ",".join(r.name for r in g), "run_steps": run_steps,
                     "slots": n, "run_steps_per_s": n / ms * 1e3, "throughput_s": run_steps / widest[m],
                     "longest_trial_steps": steps, "critical_path_s": steps * ms / 1e3, "step_from": src,
                     "step_ms": ms, "together_ms": together2.get(key) if src == "phase2 group" else None})
    train_work = sum(work2[m] / widest[m] for m in cfg.methods)
    train_chain_alone = train_chain
    shared = [r for r in rows if r["phase"] == "train-all" and r.get("together_ms")]
    # measured side by side (two groups: the SST-2 pair): both at their shared-GPU step until one ends, then alone;
    # other groups running meanwhile are not modelled (they are short: see the table)
    if len(shared) == len(together2) > 1:
        left = {id(r): float(r["longest_trial_steps"]) for r in shared}
        t = 0.0
        while left:
            running = [r for r in shared if id(r) in left]
            ms = {id(r): (r["together_ms"] if len(running) > 1 else r["step_ms"]) for r in running}
            first = min(running, key=lambda r: left[id(r)] * ms[id(r)])
            dt = left[id(first)] * ms[id(first)] / 1e3
            t += dt
            for r in running:
                left[id(r)] -= dt * 1e3 / ms[id(r)]
                if left[id(r)] <= 1e-6:
                    del left[id(r)]
                    r["critical_path_shared_s"] = t
        train_chain = max(train_chain, max(r["critical_path_shared_s"] for r in shared))
    train_s = max(train_work, train_chain)
    # what-if, not what `lorastudy run` does (it starts phase 2 once phase 1 is done): each task x method's phase 2
    # starting when its own tuning ends, beside the rest of the work on the same GPU. Bounded by all the work at the
    # widest groups' rates and by the longest (longest trial of its task in its tune group, then its phase-2 chain)
    chains = {}
    for t in cfg.tasks:
        n_hpo = min(n_train[t], cfg.search.train_subset.get(t, n_train[t]))
        for m in cfg.methods:
            trial = max(planned_steps(n_hpo, b, e) for b, e in search_grid(cfg.search.spaces[m]))
            p2 = max((r["critical_path_s"] for r in rows if r["phase"] == "train-all"
                      and any(name.startswith(f"{t}/{m}/") for name in r["group"].split(","))), default=0.0)
            chains[f"{t}/{m}"] = trial * _step_ms(curves[m], tune[m]["slots"]) / 1e3 + p2
    all_work = sum((tune[m]["run_steps"] + work2[m]) / widest[m] for m in cfg.methods)
    overlap_s = max(all_work, max(chains.values()))
    print(f"\nfused groups, step times measured at batch {shape[0]} x {shape[1]} tokens unless `phase2 group` (the "
          "trainer's loop on real batches)")
    print(f"{'phase':10s} {'group':44s} {'slots':>5s} {'run-steps':>10s} {'run-steps/s':>11s} {'throughput min':>14s}"
          f" {'longest chain':>13s} {'chain min':>9s}  step from")
    for r in rows:
        print(f"{r['phase']:10s} {r['group'][:44]:44s} {r['slots']:5d} {r['run_steps']:10.0f} "
              f"{r['run_steps_per_s']:11.0f} {r['throughput_s'] / 60:14.1f} {r['longest_trial_steps']:13.0f} "
              f"{r['critical_path_s'] / 60:9.1f}  {r['step_from']}")
    for r in rows:
        if "critical_path_shared_s" in r:
            print(f"  {r['group'][:44]}: {r['step_ms']:.2f} ms alone, {r['together_ms']:.2f} ms beside the other "
                  f"measured group: ends at {r['critical_path_shared_s'] / 60:.1f} min (alone "
                  f"{r['critical_path_s'] / 60:.1f})")
    print(f"phase 1 ~ {tune_s / 60:.1f} min, phase 2 ~ {train_s / 60:.1f} min (each the larger of its throughput "
          f"bound and its longest chain): {(tune_s + train_s) / 60:.1f} min of training; not included: early "
          "stopping, evaluation passes, graph captures, model set-up, phases 0 and 3-4")
    crit = max(chains, key=chains.get)
    print(f"what-if (not implemented: `lorastudy run` starts phase 2 after phase 1; and groups that share the GPU "
          f"taken at their alone step times): each task x method's phase 2 started when its tuning ends "
          f"~ {overlap_s / 60:.1f} min (all work at the widest groups' rates "
          f"{all_work / 60:.1f} min; longest chain {crit} {chains[crit] / 60:.1f} min)")
    return {"shape": {"batch_size": shape[0], "seq_len": shape[1]}, "rows": rows, "tune_s": tune_s,
            "train_s": train_s, "train_throughput_s": train_work, "train_chain_s": train_chain,
            "train_chain_alone_s": train_chain_alone,
            "widest_rate": widest, "total_training_s": tune_s + train_s, "fuse_max_runs": cfg.train.fuse_max_runs,
            "overlap_what_if": {"total_s": overlap_s, "all_work_s": all_work, "chains_s": chains},
            "best_hparams_from": str(best_dir) if best_dir else None}


def step_latencies(levers_json: dict) -> dict:
    """{(method, batch): {"none": ms, "all": ms, "all_levers": [...]}} from the levers part's points (training
    points without dropout; "all" = the point with the most levers), and {"eval": {method: ms per batch}}."""
    out: dict = {}
    for p in levers_json.get("levers", {}).get("points", []):
        if "error" in p or p.get("dropout"):
            continue
        if p.get("eval"):
            if p["levers"]:
                out.setdefault("eval", {})[p["method"]] = (p["ms_per_step"], p["batch_size"])
            continue
        d = out.setdefault((p["method"], p["batch_size"]), {})
        if not p["levers"]:
            d["none"] = p["ms_per_step"]
        elif len(p["levers"]) >= len(d.get("all_levers", [])):
            d["all"], d["all_levers"] = p["ms_per_step"], p["levers"]
    return out


def latency(lat: dict, method: str, batch: int, which: str) -> tuple[float | None, int | None]:
    """ms per step for (method, batch); the nearest measured batch of that method when this one was not."""
    have = [b for (m, b), d in ((k, v) for k, v in lat.items() if isinstance(k, tuple)) if m == method and which in d]
    if not have:
        return None, None
    b = min(have, key=lambda x: (abs(x - batch), x))
    return lat[(method, b)][which], b


def critical_path(cfg, n_train: dict, hpo_n: dict, trials: list | None, lat: dict) -> dict:
    """Per task x method: the longest tuning trial (trials run side by side, so the tuning phase lasts at least
    that long) followed by one phase-2 run with the best trial's batch size and epochs (seeds side by side), in
    steps and minutes at the no-lever and all-lever step latencies (plus validation passes at the measured
    evaluation rate: 4 per epoch over the validation split). Without trials: the search grid's longest trial and
    the config's batch size and epochs."""
    rows = []
    for task in cfg.tasks:
        for method in cfg.methods:
            done = [t for t in (trials or []) if t["task"] == task and t["method"] == method
                    and t["state"] == "COMPLETE"]
            if done:
                tune = max(planned_steps(hpo_n[task], t["params"]["batch_size"], t["params"]["epochs"]) for t in done)
                best = max(done, key=lambda t: t["value"])["params"]
                bs, ep = best["batch_size"], best["epochs"]
            else:
                tune = max(planned_steps(hpo_n[task], b, e) for b, e in search_grid(cfg.search.spaces[method]))
                bs, ep = cfg.train.batch_size, cfg.train.epochs
            run = planned_steps(n_train[task], bs, ep)
            r = {"task": task, "method": method, "tune_chain_steps": tune, "phase2_batch": bs, "phase2_epochs": ep,
                 "phase2_steps": run, "chain_steps": tune + run}
            ev = lat.get("eval", {}).get(method)
            n_val = min(cfg.data.validation_max, math.ceil(n_train[task] * cfg.data.validation_fraction))
            eval_s = ev[0] / 1e3 * math.ceil(n_val / ev[1]) * cfg.train.evals_per_epoch * ep if ev else 0.0
            r["phase2_eval_s"] = eval_s
            for which in ("none", "all"):
                ms, b = latency(lat, method, bs, which)
                r[f"ms_per_step_{which}"], r[f"latency_batch_{which}"] = ms, b
                r[f"chain_min_{which}"] = (r["chain_steps"] * ms / 1e3 + eval_s) / 60 if ms else None
            rows.append(r)
    key = lambda r: r["chain_min_all"] or r["chain_min_none"] or 0  # noqa: E731
    crit = max(rows, key=key)
    return {"rows": rows, "critical": {k: crit[k] for k in ("task", "method", "chain_steps", "chain_min_none",
                                                            "chain_min_all")}}


def phase2_chains(cfg, rows: list[dict], measured: dict, best_dir: Path | None) -> list[dict]:
    """Per task x method: its phase-2 run's steps (best hyperparameters of ``best_dir``, else the config's) x the
    fastest measured step of a fused group of that method and batch size (benchmarks/train_step.py part phase2)."""
    fastest: dict = {}
    for p in measured.get("phase2", {}).get("points", []):
        if "fused_step_ms" in p and not p.get("together"):  # each group alone
            key = (p["method"], p["batch_size"])
            if key not in fastest or p["fused_step_ms"] < fastest[key][0]:
                fastest[key] = (p["fused_step_ms"], p.get("variant"))
    out = []
    for task in cfg.tasks:
        n = next(r["n_train"] for r in rows if r["phase"] == "train-all" and r["task"] == task)
        for method in cfg.methods:
            hp = best_hparams(cfg, best_dir, task, method)
            bs = hp.batch_size
            steps = planned_steps(n, bs, hp.epochs)
            ms, variant = fastest.get((method, bs), (None, None))
            out.append({"task": task, "method": method, "batch": bs, "steps": steps, "ms_per_step": ms,
                        "variant": variant, "minutes": steps * ms / 60e3 if ms else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--glue", required=True, help="local GLUE directory")
    ap.add_argument("--rates", type=Path, required=True, help="worker-scaling JSON of benchmarks/train_step.py")
    ap.add_argument("--trials", type=Path, help="trials JSON of a tuning run on the same GPU")
    ap.add_argument("--fused", type=Path, nargs="+", help="JSON(s) of benchmarks/train_step.py --parts fused")
    ap.add_argument("--fused-optimizer", default="triton", help="the stepper points of this optimizer pass (what "
                    "train.fuse_optimizer=auto picks on CUDA); points that name none are kept")
    ap.add_argument("--fuse-max-runs", type=int, nargs="*", help="with --fused: the estimate also for groups of "
                    "these widths (train.fuse_max_runs; the step time at a width between the measured ones is "
                    "interpolated)")
    ap.add_argument("--best-dir", type=Path, help="directory of <task>_<method>_optimal.yaml (phase-1 best)")
    ap.add_argument("--levers", type=Path, help="levers JSON of benchmarks/train_step.py: the critical path")
    ap.add_argument("--phase2", type=Path, help="phase2 JSON of benchmarks/train_step.py (3-seed groups in the "
                    "trainer's loop): phase-2 chains at the measured group step")
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
    if a.fused:
        measured = merge_fused([json.loads(p.read_text()) for p in a.fused], a.fused_optimizer)
        p2 = json.loads(a.phase2.read_text()) if a.phase2 else None
        out["fused"] = fused_estimate(cfg, measured, a.best_dir, p2)
        out["fused"]["rates_from"] = [str(p) for p in a.fused]
        out["fused"]["phase2_from"] = str(a.phase2) if a.phase2 else None
        out["fused_other_widths"] = []
        for w in a.fuse_max_runs or []:  # the same estimate with groups of another width (train.fuse_max_runs)
            if w != cfg.train.fuse_max_runs:
                print(f"\nwith train.fuse_max_runs={w}:")
                est = fused_estimate(load_config(a.config, [f"data.source={a.glue}", f"train.fuse_max_runs={w}"]),
                                     measured, a.best_dir, p2)
                out["fused_other_widths"].append(est)
    if a.levers:
        lat = step_latencies(json.loads(a.levers.read_text()))
        n_train = {t: next(r["n_train"] for r in rows if r["phase"] == "train-all" and r["task"] == t)
                   for t in cfg.tasks}
        hpo_n = {t: next(r["n_train"] for r in rows if r["phase"] == "tune" and r["task"] == t) for t in cfg.tasks}
        trials = None
        if a.trials:
            data = json.loads(a.trials.read_text())
            trials = data["trials"] if isinstance(data, dict) else data
        cp = critical_path(cfg, n_train, hpo_n, trials, lat)
        out["critical_path"] = cp
        out["levers_from"] = str(a.levers)
        # total work: every trial and run, one after another on one lone-run stream (the no-parallelism bound)
        work = {m: sum(r["steps"] for r in rows if r["method"] == m) for m in cfg.methods}
        out["total_work_run_steps"] = work
        print(f"\ncritical path (longest tuning trial + one phase-2 run, sequential steps at a lone run's latency; "
              f"latencies from {a.levers}):")
        print(f"{'task':5s} {'method':6s} {'tune':>7s} {'phase2':>8s} {'batch':>5s} {'ms none':>8s} {'ms all':>7s} "
              f"{'min none':>9s} {'min all':>8s}")
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        for r in cp["rows"]:
            print(f"{r['task']:5s} {r['method']:6s} {r['tune_chain_steps']:7d} {r['phase2_steps']:8d} "
                  f"{r['phase2_batch']:5d} {fmt(r['ms_per_step_none'], '8.2f')} {fmt(r['ms_per_step_all'], '7.2f')} "
                  f"{fmt(r['chain_min_none'], '9.1f')} {fmt(r['chain_min_all'], '8.1f')}")
        c = cp["critical"]
        print(f"critical path: {c['task']}/{c['method']}, {c['chain_steps']} sequential steps = "
              f"{fmt(c['chain_min_none'], '.1f')} min without levers, {fmt(c['chain_min_all'], '.1f')} min with "
              f"all levers; total work {sum(work.values()):.0f} run-steps ({work})")
    if a.phase2:
        out["phase2_groups"] = phase2_chains(cfg, rows, json.loads(a.phase2.read_text()), a.best_dir)
        out["phase2_from"] = str(a.phase2)
        print(f"\nphase-2 chains at the measured step of their fused group in the trainer's loop ({a.phase2}; the "
              "fastest variant per method and batch; evaluations not included):")
        for r in out["phase2_groups"]:
            print(f"{r['task']:5s} {r['method']:6s} batch {r['batch']} {r['steps']:8d} steps x "
                  + (f"{r['ms_per_step']:.2f} ms ({r['variant']}) = {r['minutes']:.1f} min" if r["ms_per_step"]
                     else "(no group of this method and batch measured)"))
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
