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


def _train_unit(arg, ctx, stop: Callable[[], bool] | None = None):
    from lorastudy.checkpoint import RunPaused
    from lorastudy.training import HParams, run_and_save

    cfg, task, method, seed, hp_over = arg
    hp = HParams.from_config(cfg, method, hp_over)
    try:
        m = run_and_save(cfg, task, method, seed, hp, store.run_dir(cfg.out, task, method, seed), ctx=ctx,
                         stop=stop)
    except RunPaused as e:  # the time budget ran out mid-run: its checkpoint is written, the next pass resumes it
        return {"paused": str(e.path), "step": e.step}
    return {"test": m["test"][m["primary_metric"]], "collapsed": m["collapsed"]}


def train_all(cfg, workers: int = 1, progress=None, stop: Callable[[], bool] | None = None, log=print,
              streams: int = 1, tasks: list[str] | None = None, methods: list[str] | None = None) -> dict:
    """Phase 2: every task x method x seed with the phase-1 best hyperparameters on the full training split
    (``tasks`` / ``methods``: only those; the summary then covers only them).

    ``stop()`` (the time budget) is checked between runs and, inside runs, at every step boundary: a run it stops
    writes its checkpoint (``paused`` in the summary) and the next invocation resumes it."""
    import functools

    from lorastudy import checkpoint, execution
    from lorastudy.tuning import best_hparams

    units, skipped, warned = [], [], set()
    for t, m, s in production_units(cfg):
        if (tasks and t not in tasks) or (methods and m not in methods):
            continue
        if store.is_complete(store.run_dir(cfg.out, t, m, s)):
            skipped.append(f"{t}/{m}/seed{s}")
            checkpoint.remove(checkpoint.path_for(store.run_dir(cfg.out, t, m, s)))  # left by a kill after saving
            continue
        hp = best_hparams(cfg, t, m)
        if hp is None:
            if (t, m) not in warned:  # once per task x method, not once per seed
                log(f"train-all: no phase-1 best.yaml for {t}/{m}; using the config's train settings")
                warned.add((t, m))
            hp = {}
        units.append((f"{t}/{m}/seed{s}", (cfg, t, m, s, hp)))
    if progress is not None:
        progress.set_total(len(units))
    if execution.fuse_enabled(cfg):  # fused groups planned by the critical path (execution.plan_groups)
        res = execution.train_fused(cfg, units, workers=workers, progress=progress, stop=stop, log=log)
    else:
        res = execution.run_units(units, functools.partial(_train_unit, stop=stop), workers, progress=progress,
                                  stop=stop, streams=streams)
    failures = [{"unit": r.name, "error": r.error} for r in res if not r.ok]
    paused = [r.name for r in res if r.ok and isinstance(r.value, dict) and "paused" in r.value]
    summary = {"trained": [r.name for r in res if r.ok and r.name not in paused], "paused": paused,
               "skipped_complete": skipped, "failures": failures, "not_started": len(units) - len(res),
               "selection": {"tasks": list(tasks or cfg.tasks), "methods": list(methods or cfg.methods)}}
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
    earlier = _earlier_phases(cfg)
    summary: dict = {"phases": {}, "out": str(cfg.out), "config_hash": cfg.hash()}
    recorded: dict = {}  # what run_summary.json keeps per phase: the time of the pass that did the work
    for ph in phases:
        if budget.exhausted():
            summary["stopped"] = f"time budget exhausted before phase {ph}; rerun to continue"
            _write_run_summary(cfg, summary, recorded, earlier)
            break
        t0 = time.monotonic()
        up_to_date = _up_to_date(cfg, ph)
        with Progress(f"phase {ph}", console=console) as prog:
            summary["phases"][ph] = _run_phase(cfg, ph, prog, budget, workers, log, streams)
        seconds = round(time.monotonic() - t0, 1)
        if ph == "extract":
            up_to_date = not summary["phases"][ph].get("extracted")
        summary["phases"][ph]["seconds"] = seconds
        recorded[ph] = {**summary["phases"][ph], **_phase_seconds(earlier.get(ph), seconds, up_to_date)}
        stopped = budget.exhausted() and ph != phases[-1]
        if stopped:
            recorded[ph]["budget_stopped"] = True  # may have work left: the next pass adds its time
            summary["stopped"] = f"time budget exhausted after phase {ph}; rerun to continue"
        # written after every phase: the report phase reads the wall times of those before it, and a killed pass
        # keeps the record of the phases it finished
        _write_run_summary(cfg, summary, recorded, earlier)
        if stopped:
            break
    tracking.log_study_artifacts(cfg)  # drift, serving, report: artifacts of the study run (never raises)
    return summary


def _write_run_summary(cfg, summary: dict, recorded: dict, earlier: dict) -> None:
    """run_summary.json: this pass's summary, with the phases it did not run keeping their earlier record (so the
    file describes the whole study)."""
    phases_all = {p: recorded.get(p, earlier.get(p)) for p in PHASES if p in recorded or p in earlier}
    store.atomic_write_json(cfg.out / "run_summary.json", {**summary, "phases": phases_all})


def _earlier_phases(cfg) -> dict:
    """Phase records of earlier passes over this results directory with this config ({} when none)."""
    path = cfg.out / "run_summary.json"
    try:
        old = store.read_json(path) if path.is_file() else {}
    except store.StoreError:
        return {}
    if not isinstance(old, dict) or old.get("config_hash") != cfg.hash():
        return {}
    return {k: v for k, v in (old.get("phases") or {}).items() if isinstance(v, dict)}


def _up_to_date(cfg, ph: str) -> bool:
    """Whether phase ``ph`` finds all its work done before it starts (it will only skip). Drift and the report are
    recomputed on every pass; extraction is judged from its result (see ``run``)."""
    if ph in ("sanity", "baselines"):
        return store.read_current(cfg.out / "phase0" / f"{ph}.json", cfg) is not None
    if ph == "tune":
        from lorastudy.tuning import is_done

        return all(is_done(cfg, t, m) for t in cfg.tasks for m in cfg.methods)
    if ph == "train":
        return all(store.is_complete(store.run_dir(cfg.out, t, m, s)) for t, m, s in production_units(cfg))
    if ph == "serve":
        from lorastudy.serving.benchmark import current_result, serve_parts

        return all(current_result(cfg, extra_arch=a) is not None for a in serve_parts(cfg))
    return False


def _phase_seconds(earlier: dict | None, seconds: float, up_to_date: bool) -> dict:
    """The wall time to record for a phase: that of the pass that did its work. A pass that found the phase done
    keeps the earlier pass's time (not its own near-zero skip time); a pass that continued a phase an earlier pass
    left unfinished (time budget) adds its time to the earlier one."""
    if earlier is None or "seconds" not in earlier:
        return {"seconds": seconds, **({"skipped_this_pass": True} if up_to_date else {})}
    if up_to_date:
        return {"seconds": earlier["seconds"], "this_pass_seconds": seconds, "skipped_this_pass": True}
    if earlier.get("budget_stopped"):
        return {"seconds": round(earlier["seconds"] + seconds, 1), "this_pass_seconds": seconds}
    return {"seconds": seconds}


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
        from lorastudy.serving.benchmark import deployment_dir, run_serve_bench, serve_parts

        for a in serve_parts(cfg):  # the study's adapters, then each of serve.archs
            run_serve_bench(cfg, progress=prog, log=log, extra_arch=a)
        return {"path": str(deployment_dir(cfg))}
    if ph == "report":
        from lorastudy.report.build import build_report

        path = build_report(cfg)
        return {"path": str(path)}
    raise ValueError(ph)
