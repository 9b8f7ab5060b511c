"""`lorastudy run`: the phases in order, resumable, with a time budget; and phase 2 (`train-all`).

Every unit of work is skipped when its output is complete, so a rerun (after an interruption, a SIGKILL, or a
time budget) continues where the last one stopped and ends with the same results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lorastudy import store, tracking

PHASES = ("sanity", "baselines", "tune", "train", "extract", "drift", "serve", "report")


@dataclass
class Budget:
    seconds: float | None = None
    t0: float = field(default_factory=time.monotonic)

    def exhausted(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.t0 > self.seconds


def production_units(cfg) -> list[tuple[str, str, int]]:
    return [(t, m, s) for t in cfg.tasks for m in cfg.methods for s in cfg.seeds]


def _train_unit(arg, ctx):
    from lorastudy.training import HParams, run_and_save

    cfg, task, method, seed, hp_over = arg
    hp = HParams.from_config(cfg, method, hp_over)
    m = run_and_save(cfg, task, method, seed, hp, store.run_dir(cfg.out, task, method, seed), ctx=ctx)
    return {"test": m["test"][m["primary_metric"]], "collapsed": m["collapsed"]}


def train_all(cfg, workers: int = 1, progress=None, stop: Callable[[], bool] | None = None, log=print,
              streams: int = 1) -> dict:
    """Phase 2: every task x method x seed with the phase-1 best hyperparameters on the full training split."""
    from lorastudy import execution
    from lorastudy.tuning import best_hparams

    units, skipped = [], []
    for t, m, s in production_units(cfg):
        if store.is_complete(store.run_dir(cfg.out, t, m, s)):
            skipped.append(f"{t}/{m}/seed{s}")
            continue
        hp = best_hparams(cfg, t, m)
        if hp is None:
            log(f"train-all: no phase-1 best.yaml for {t}/{m}; using the config's train settings")
            hp = {}
        units.append((f"{t}/{m}/seed{s}", (cfg, t, m, s, hp)))
    if progress is not None:
        progress.set_total(len(units))
    if execution.fuse_enabled(cfg):  # fused groups planned by the critical path (execution.plan_groups)
        res = execution.train_fused(cfg, units, workers=workers, progress=progress, stop=stop, log=log)
    else:
        res = execution.run_units(units, _train_unit, workers, progress=progress, stop=stop, streams=streams)
    failures = [{"unit": r.name, "error": r.error} for r in res if not r.ok]
    summary = {"trained": [r.name for r in res if r.ok], "skipped_complete": skipped, "failures": failures,
               "not_started": len(units) - len(res)}
    store.atomic_write_json(cfg.out / "phase2" / "summary.json", summary)
    # a run that failed on the results dir itself (disk full, read-only): nothing later can succeed, so stop here
    # with the path and the cause instead of going on to a later phase's traceback
    io = [f for f in failures if (f["error"] or "").startswith(f"{store.StoreError.__name__}:")]
    if io:
        first = io[0]["error"].split("\n", 1)[0].split(": ", 1)[1]
        raise store.StoreError(f"phase 2: {len(io)} run(s) could not be written; {io[0]['unit']}: {first}")
    return summary


def run(cfg, *, only: str | None = None, from_: str | None = None, time_budget: float | None = None,
        workers: int = 1, force: bool = False, console=None, streams: int = 1) -> dict:
    """Phases 0 -> 4 and the report. Returns a summary with the paths written."""

    if only and only not in PHASES or from_ and from_ not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    with store.results_lock(cfg.out):
        return _run_locked(cfg, only, from_, time_budget, workers, force, console, streams)


def _run_locked(cfg, only, from_, time_budget, workers, force, console, streams) -> dict:
    from lorastudy.progress import Progress

    store.check_manifest(cfg, force=force)
    store.clean_partials(cfg.out)
    budget = Budget(time_budget)
    phases = [only] if only else list(PHASES[PHASES.index(from_):] if from_ else PHASES)
    log = console.print if console is not None else print
    summary: dict = {"phases": {}, "out": str(cfg.out)}
    for ph in phases:
        if budget.exhausted():
            summary["stopped"] = f"time budget exhausted before phase {ph}; rerun to continue"
            break
        t0 = time.monotonic()
        with Progress(f"phase {ph}", console=console) as prog:
            summary["phases"][ph] = _run_phase(cfg, ph, prog, budget, workers, log, streams)
        summary["phases"][ph]["seconds"] = round(time.monotonic() - t0, 1)
        if budget.exhausted() and ph != phases[-1]:
            summary["stopped"] = f"time budget exhausted after phase {ph}; rerun to continue"
            break
    store.atomic_write_json(cfg.out / "run_summary.json", summary)
    tracking.log_study_artifacts(cfg)  # drift, serving, report: artifacts of the study run (never raises)
    return summary


def _run_phase(cfg, ph: str, prog, budget: Budget, workers: int, log, streams: int = 1) -> dict:
    stop = budget.exhausted
    if ph == "sanity":
        from lorastudy.sanity import run_sanity

        res = run_sanity(cfg, progress=prog)
        bad = [f"{r['task']}/{r['method']}" for r in res if not r["passed"]]
        if bad:
            log(f"[red]sanity failed for {bad}[/] (reported; the study goes on)")
        return {"failed": bad, "path": str(cfg.out / "phase0" / "sanity.json")}
    if ph == "baselines":
        from lorastudy.baselines import run_baselines

        run_baselines(cfg)
        return {"path": str(cfg.out / "phase0" / "baselines.json")}
    if ph == "tune":
        from lorastudy.tuning import tune

        res = tune(cfg, workers=workers, progress=prog, stop=stop, streams=streams)
        return {"failures": res["failures"], "path": str(cfg.out / "phase1")}
    if ph == "train":
        res = train_all(cfg, workers, progress=prog, stop=stop, log=log, streams=streams)
        return {**{k: (len(v) if isinstance(v, list) else v) for k, v in res.items() if k != "failures"},
                "failures": res["failures"], "path": str(cfg.out / "phase2")}
    if ph == "extract":
        from lorastudy.representations import extract_study

        res = extract_study(cfg, progress=prog.advance_rows, log=log, stop=stop, set_total=prog.set_total)
        return {**{k: len(v) for k, v in res.items()}, "path": str(cfg.out / "phase3")}
    if ph == "drift":
        from lorastudy.drift import run_drift

        run_drift(cfg, log=log)
        return {"path": str(cfg.out / "phase4" / "drift")}
    if ph == "serve":
        from lorastudy.serving.benchmark import run_serve_bench

        run_serve_bench(cfg, progress=prog, log=log)
        return {"path": str(cfg.out / "phase4" / "deployment")}
    if ph == "report":
        from lorastudy.report.build import build_report

        path = build_report(cfg)
        return {"path": str(path)}
    raise ValueError(ph)
