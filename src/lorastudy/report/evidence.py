"""What a study's evidence can carry: protocol size, collapsed runs, seed noise, seed spread, pooling agreement.

The report prints a decision as a finding only when its rule holds *and* its inputs are sound; otherwise it says
why not. This module decides that, from the config and the artifacts' contents (pure: no I/O). The rules are stated
in docs/PROTOCOL.md ("Protocol size", "What the report concludes").
"""

from __future__ import annotations

import math

from lorastudy.config import StudyConfig

TINY_MODEL = "tiny-random-llama"
NO_VERDICT = "no verdict"


def protocol_shortfalls(cfg: StudyConfig) -> list[str]:
    """Every way in which ``cfg`` is smaller than the protocol, in words; an empty list means protocol size.

    The protocol is the config's defaults (``StudyConfig()``, docs/PROTOCOL.md): a real pretrained model, at least
    15 tuning trials per task x method, at least 3 seeds, no cap on optimizer steps (training or tuning), no row
    limits on train/validation/test, the validation carve-out up to 2,000 rows, a probe set of up to 750 rows,
    tuning on at least the protocol's training subset (SST-2: 3,000 rows; others: all), and a search space that
    allows at least as many epochs as the protocol's lowest (2). The quick and tiny presets fall short on several.
    """
    p = StudyConfig()
    out = []
    if cfg.model.source == TINY_MODEL:
        out.append("model: a tiny random-weight test model, not a pretrained one")
    if cfg.search.n_trials < p.search.n_trials:
        out.append(f"{cfg.search.n_trials} tuning trial(s) per task x method (protocol: {p.search.n_trials})")
    if len(cfg.seeds) < len(p.seeds):
        out.append(f"{len(cfg.seeds)} seed(s) per method (protocol: {len(p.seeds)})")
    if cfg.train.max_steps is not None:
        out.append(f"training runs capped at {cfg.train.max_steps} optimizer steps (protocol: no cap)")
    if cfg.search.max_steps is not None:
        out.append(f"tuning trials capped at {cfg.search.max_steps} optimizer steps (protocol: no cap)")
    for split, limits in (("training", cfg.data.train_limit), ("validation", cfg.data.validation_limit),
                          ("test", cfg.data.test_limit)):
        capped = {t: n for t, n in limits.items() if t in cfg.tasks}
        if capped:
            out.append(f"{split} rows capped ({', '.join(f'{t} {n}' for t, n in capped.items())}; protocol: all)")
    if cfg.data.validation_max < p.data.validation_max:
        out.append(f"validation carve-out at most {cfg.data.validation_max} rows (protocol: "
                   f"{p.data.validation_max:,})")
    if cfg.data.probe_size < p.data.probe_size:
        out.append(f"probe set of at most {cfg.data.probe_size} rows (protocol: {p.data.probe_size})")
    small = []
    for t in cfg.tasks:
        mine, ref = cfg.search.train_subset.get(t), p.search.train_subset.get(t)
        if mine is not None and (ref is None or mine < ref):
            small.append(f"{t} {mine}")
    if small:
        out.append(f"tuning on training subsets of {', '.join(small)} rows (protocol: SST-2 3,000, others all)")
    for m in cfg.methods:
        space, ref = cfg.search.spaces.get(m), p.search.spaces.get(m)
        if space is not None and ref is not None and space.epochs.high < ref.epochs.low:
            out.append(f"{m}: at most {space.epochs.high} epoch(s) per run (protocol: {ref.epochs.low} to "
                       f"{ref.epochs.high})")
    return out


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def seed_spread(per_seed: list[float]) -> dict:
    """min, max and max/min of per-seed whole-model drift (ratio None unless both are positive)."""
    v = [x for x in per_seed if _finite(x)]
    if not v:
        return {"min": None, "max": None, "ratio": None, "n": 0}
    lo, hi = min(v), max(v)
    return {"min": lo, "max": hi, "ratio": hi / lo if lo > 0 else None, "n": len(v)}


def assess(cfg: StudyConfig, runs: list[dict], drift: dict | None, hyp: dict | None, overhead: dict | None) -> dict:
    """Per task and hypothesis: the decision to print, the reasons it is qualified, whether a recommendation may
    rest on it.

    ``runs``: one dict per phase-2 run with ``task, method, seed, failed`` and, when not failed, ``collapsed``;
    ``drift``/``hyp``: drift_analysis_results.json / hypothesis_test_results.json (None when absent);
    ``overhead``: overhead_analysis.json. A decision is withheld (``no verdict``) when its task has collapsed or
    failed runs; every decision of a smoke-size study is shown as a smoke-run outcome; recommendations are drawn
    only from protocol-size studies and tasks whose decisions are neither withheld nor within seed noise."""
    smoke = protocol_shortfalls(cfg)
    tasks: dict[str, dict] = {}
    for t in cfg.tasks:
        rs = [r for r in runs if r["task"] == t]
        bad = [f"{r['method']}/seed{r['seed']}" for r in rs if r.get("failed") or r.get("collapsed")]
        kinds = [k for k, f in (("collapsed", "collapsed"), ("failed", "failed")) if any(r.get(f) for r in rs)]
        tasks[t] = {"n_runs": len(rs), "unsound_runs": bad, "unsound_words": " and ".join(kinds),
                    "collapsed": [f"{r['method']}/seed{r['seed']}" for r in rs if r.get("collapsed")],
                    "failed": [f"{r['method']}/seed{r['seed']}" for r in rs if r.get("failed")]}
    out: dict = {"smoke": smoke, "tasks": tasks, "h1a": {}, "h1b": {}, "h1b_overall": None, "h2": None}
    if hyp:
        for name in ("H1a", "H1b"):
            for t, d in hyp[name]["per_task"].items():
                out[name.lower()][t] = _verdict(d.get("decision"), tasks.get(t, {}), smoke)
        for t, v in out["h1b"].items():
            v.update(_drift_evidence(t, drift, hyp["H1b"]["per_task"][t], cfg.drift.h1b_min_reduction))
            if v.get("within_noise"):
                v["recommend"] = False
        ov = hyp["H1b"].get("overall")
        if ov:
            unsound = [t for t in out["h1b"] if tasks.get(t, {}).get("unsound_runs")]
            v = _verdict(ov.get("decision"), {"unsound_runs": unsound, "unsound_words": "collapsed or failed"},
                         smoke, what="tasks with {} runs: ")
            v["within_noise"] = bool(ov.get("noise", {}).get("full", {}).get("within_floor"))
            v["tasks_within_noise"] = ov.get("tasks_within_noise", [])
            if v["within_noise"] or v["tasks_within_noise"]:
                v["recommend"] = False
            out["h1b_overall"] = v
    if overhead and overhead.get("H2", {}).get("decision"):
        out["h2"] = _verdict(overhead["H2"]["decision"], {}, smoke)
    out["any_recommendation"] = any(v.get("recommend") for k in ("h1a", "h1b") for v in out[k].values()) or bool(
        out["h2"] and out["h2"]["recommend"])
    return out


def _verdict(decision: str | None, task: dict, smoke: list[str], what: str = "{} runs") -> dict:
    unsound = task.get("unsound_runs") or []
    if decision is None:
        return {"decision": "n/a", "rule_decision": None, "withheld": None, "smoke": bool(smoke),
                "recommend": False}
    if unsound:
        why = "rests on " + what.format(task.get("unsound_words") or "collapsed or failed")
        why += ", ".join(unsound) if what.endswith(": ") else ""
        return {"decision": NO_VERDICT, "rule_decision": decision, "withheld": why, "smoke": bool(smoke),
                "recommend": False}
    return {"decision": decision, "rule_decision": decision, "withheld": None, "smoke": bool(smoke),
            "recommend": not smoke and decision in ("supported", "contradicted")}


def _drift_evidence(task: str, drift: dict | None, h1b_task: dict, bound: float) -> dict:
    """Seed spread, noise floor and pooling agreement behind one task's H1b decision. ``pooling_other_side``: the
    two poolings' 95% CIs lie wholly on opposite sides of H1b's ``bound`` (one would say contradicted, the other
    clear of it), which a sign check alone misses (a reduction of 15% against 55% both have the same sign)."""
    out: dict = {"noise": h1b_task.get("noise"), "within_noise": False, "spread": {}, "pooling_disagrees": False,
                 "secondary_reduction": None, "secondary_ci95": None, "pooling_other_side": False}
    noise = h1b_task.get("noise") or {}
    out["within_noise"] = bool(noise.get("full", {}).get("within_floor"))
    out["noise_words"] = [f"{'full FT' if m == 'full' else 'LoRA'} {n['drift']:.4f} vs {n['floor']:.4f}"
                          for m, n in noise.items() if n.get("floor") is not None and _finite(n.get("drift"))]
    out["methods_within_noise"] = [m for m, n in noise.items() if n.get("within_floor")]
    if not drift or task not in drift.get("tasks", {}):
        return out
    for m, prof in drift["tasks"][task]["profiles"].items():
        out["spread"][m] = seed_spread(prof["whole_model_drift"].get("per_seed", []))
    sec = (drift.get("secondary", {}).get(task) or {}).get("drift_reduction") or {}
    prim = h1b_task.get("estimate")
    s = sec.get("estimate")
    out["secondary_reduction"] = s
    if _finite(prim) and _finite(s) and prim * s < 0:
        out["pooling_disagrees"] = True
    ci, sci = h1b_task.get("ci95"), sec.get("ci95")
    if ci and sci and all(_finite(x) for x in (*ci, *sci)):
        out["secondary_ci95"] = list(sci)
        out["pooling_other_side"] = (ci[1] < bound < sci[0]) or (sci[1] < bound < ci[0])
    return out
