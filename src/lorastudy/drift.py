"""RQ1: drift of fine-tuned representations from the base model, LoRA vs full FT, with honest statistics.

Units and tests (the design is written into the output, too):
- drift = 1 - debiased linear CKA to the base model, per layer (biased CKA and cosine beside it);
  whole-model drift = mean over layers (embeddings, decoder layers, final norm) and seeds.
- noise floor: CKA between seeds of the same method (how much two runs differ by chance).
- drift reduction (LoRA vs full FT) = 1 - D_lora / D_full, with a 95% CI from the delete-one jackknife over probe
  examples. Why the jackknife: debiased HSIC is a U-statistic; bootstrap resampling with replacement puts duplicate
  rows into it (a duplicated pair is perfectly similar), which biases it, while leave-one-out has a closed form
  (similarity.hsic_unbiased_loo): exact and cheap.
- seed-level test: exact permutation test on per-seed whole-model drift (3 vs 3 seeds: 20 relabelings, p >= 0.1).
- example-level test: paired sign-flip permutation test on per-example standardized-cosine drift (full - LoRA).
- H1a (accuracy non-inferiority, margin 3 points): bootstrap over test examples and seeds.
- H1b (drift reduction >= 20%): one-sided jackknife t-test per task and overall (stratified by task).
  Decided only when full-FT drift is above its seed-vs-seed noise floor (else: within seed noise).
- corrections: Holm over the per-task family of each hypothesis (Bonferroni reported beside).

``analyze_task`` and ``hypotheses`` are pure (arrays in, dicts out); ``run_drift`` does the I/O.
"""

from __future__ import annotations

import itertools
import math
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import stats as ss

from lorastudy import similarity as S
from lorastudy import stats as T


@dataclass
class TaskReps:
    task: str
    layer_names: list[str]
    base: np.ndarray  # [L, n, d]
    runs: dict[tuple[str, int], np.ndarray]  # (method, seed) -> [L, n, d]


def layer_groups(layer_names: list[str]) -> dict[str, list[int]]:
    """early / middle / late thirds of the decoder layers (embeddings and final norm reported on their own)."""
    dec = [i for i, n in enumerate(layer_names) if n.startswith("layer")]
    k = len(dec)
    a, b = math.ceil(k / 3), math.ceil(2 * k / 3)
    return {"early": dec[:a], "middle": dec[a:b], "late": dec[b:]}


MEASURES = ("cka_debiased", "cka_biased", "cos_raw", "cos_std")
# Whole-model drift at or below this is no drift: representations are stored in float32 at best (unit roundoff
# 6e-8), so CKA of a rescaled or shifted copy of the base comes out 1 - 1e-10..1e-9, not exactly 1; a reduction
# relative to such a D_full would be a ratio of rounding errors.
NO_DRIFT = 1e-6


def _nanmean(a, axis=None):
    """Mean ignoring NaN (undefined values); NaN, without a warning, where nothing is defined."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _try(fn, *a, **kw):
    """``fn(*a, **kw)``, or (NaN, why) when the measure is undefined on these inputs."""
    try:
        return fn(*a, **kw), None
    except S.UndefinedSimilarity as e:
        return np.nan, str(e)


def analyze_task(tr: TaskReps) -> dict:
    """Per run and layer: debiased/biased CKA, raw/standardized cosine vs base; leave-one-out debiased CKA;
    per-example standardized cosine; seed-vs-seed noise floor within each method.

    Values that are not estimable (similarity.UndefinedSimilarity: e.g. a layer whose probe rows are all but one
    identical) are NaN here and listed in ``undefined`` (measure -> layer -> why, per model); a layer undefined for
    the base or any run in a measure is excluded from that measure for every run of the task (``excluded_layers``),
    so all runs average the same layers. For debiased CKA, the primary measure, a layer is also excluded when a
    leave-one-out value is undefined (the jackknife needs every one). Arrays: [runs, layers] (+ [n] per example)."""
    runs = sorted(tr.runs)
    L, n = tr.base.shape[0], tr.base.shape[1]
    R = len(runs)
    vals = {k: np.zeros((R, L)) for k in MEASURES}
    loo = np.zeros((R, L, n))
    cos_ex = np.zeros((R, L, n))
    methods = sorted({m for m, _ in runs})
    pairs = {m: list(itertools.combinations([r for r in runs if r[0] == m], 2)) for m in methods}
    floor = {m: np.zeros((len(pairs[m]), L)) for m in methods}
    undefined: dict[str, dict[str, dict[str, str]]] = {k: {} for k in MEASURES}
    n_undef_examples = {"cos_raw": 0, "cos_std": 0}
    for li in range(L):
        name = tr.layer_names[li]
        xb = tr.base[li]  # native dtype: the rounding tests are relative to the stored precision
        gb = S.GramStats(xb)
        grams = {r: S.GramStats(tr.runs[r][li]) for r in runs}
        why: dict[str, dict[str, str]] = {k: {} for k in MEASURES}
        for ri, r in enumerate(runs):
            label = f"{r[0]}/seed{r[1]}"
            x = tr.runs[r][li]
            g = grams[r]
            for key, debiased in (("cka_debiased", True), ("cka_biased", False)):
                vals[key][ri, li], w = _try(gb.cka, g, debiased=debiased)
                if w:
                    why[key][label] = w
            loo[ri, li] = gb.cka_debiased_loo(g)
            if np.isnan(loo[ri, li]).any() and "cka_debiased" not in why:
                why["cka_debiased"][label] = (f"leave-one-out debiased CKA undefined for "
                                              f"{int(np.isnan(loo[ri, li]).sum())} probe example(s)")
            for key, std in (("cos_raw", False), ("cos_std", True)):
                per, w = _try(S.cosine_per_example, xb, x, standardize=std)
                if w:
                    why[key][label] = w
                    per = np.full(n, np.nan)
                n_undef_examples[key] += int(np.isnan(per).sum())
                vals[key][ri, li] = _nanmean(per)
                if std:
                    cos_ex[ri, li] = per
        for key in MEASURES:
            if why[key] or np.isnan(vals[key][:, li]).any():
                undefined[key][name] = why[key] or {"*": "undefined"}
                vals[key][:, li] = np.nan
                if key == "cka_debiased":
                    loo[:, li] = np.nan
        for m in methods:
            for pi, (a, b) in enumerate(pairs[m]):
                floor[m][pi, li] = np.nan if name in undefined["cka_debiased"] else \
                    _try(grams[a].cka, grams[b], debiased=True)[0]
    return {"runs": runs, "cka_debiased": vals["cka_debiased"], "cka_biased": vals["cka_biased"],
            "cos_raw": vals["cos_raw"], "cos_std": vals["cos_std"],
            "loo_cka_debiased": loo, "cos_std_per_example": cos_ex, "noise_floor_cka_debiased": floor,
            "noise_floor_pairs": pairs, "layer_names": tr.layer_names, "n": n,
            "undefined_layers": list(undefined["cka_debiased"]), "undefined": undefined,
            "excluded_layers": {k: list(v) for k, v in undefined.items()},
            "n_undefined_examples": n_undef_examples}


def _method_rows(a: dict, method: str) -> list[int]:
    return [i for i, r in enumerate(a["runs"]) if r[0] == method]


def summarize_task(a: dict, n_resamples: int, seed: int, min_reduction: float) -> dict:
    """Profiles, groups, whole-model drift and the LoRA-vs-full comparison for one task."""
    names = a["layer_names"]
    groups = layer_groups(names)
    drift = 1 - a["cka_debiased"]
    out = {"layer_names": names, "n_probe": a["n"], "groups": groups, "per_run": [], "profiles": {},
           "noise_floor": {}, "undefined_layers": a["undefined_layers"],
           "n_layers_excluded": len(a["undefined_layers"]), "n_layers_used": len(names) - len(a["undefined_layers"]),
           "undefined": a["undefined"], "excluded_layers": a["excluded_layers"],
           "n_undefined_examples": a["n_undefined_examples"],
           "note": "a similarity that is not estimable (e.g. a layer whose probe rows are all but one identical: "
                   "self-HSIC zero up to rounding) is undefined (null), never a number; layers in undefined_layers "
                   "are left out of every drift mean for every run, and counted in n_layers_excluded"}
    for ri, (m, s) in enumerate(a["runs"]):
        out["per_run"].append({
            "method": m, "seed": s, "cka_debiased": a["cka_debiased"][ri].tolist(),
            "cka_biased": a["cka_biased"][ri].tolist(), "cos_raw": a["cos_raw"][ri].tolist(),
            "cos_std": a["cos_std"][ri].tolist(), "drift": drift[ri].tolist(),
            "whole_model_drift": float(_nanmean(drift[ri])),
            "group_drift": {g: float(_nanmean(drift[ri, idx])) if idx else None for g, idx in groups.items()},
        })
    for m, fl in a["noise_floor_cka_debiased"].items():
        rows = _method_rows(a, m)
        prof = {}
        for key in ("cka_debiased", "cka_biased", "cos_raw", "cos_std"):
            v = a[key][rows]
            prof[key] = {"mean": v.mean(0).tolist(), "std": (v.std(0, ddof=1) if len(rows) > 1 else 0 * v[0]).tolist()}
        d = drift[rows]
        prof["drift"] = {"mean": d.mean(0).tolist(), "std": (d.std(0, ddof=1) if len(rows) > 1 else 0 * d[0]).tolist()}
        wm = _nanmean(d, 1)
        prof["whole_model_drift"] = {"mean": float(wm.mean()), "std": float(wm.std(ddof=1)) if len(wm) > 1 else 0.0,
                                     "per_seed": wm.tolist()}
        prof["group_drift"] = {g: {"mean": float(_nanmean(d[:, idx])),
                                   "std": float(_nanmean(d[:, idx], 1).std(ddof=1)) if len(rows) > 1 else 0.0}
                               if idx else {"mean": None, "std": None} for g, idx in groups.items()}
        out["profiles"][m] = prof
        if len(fl):
            out["noise_floor"][m] = {"pairs": [[p[0][1], p[1][1]] for p in a["noise_floor_pairs"][m]],
                                     "cka_debiased_mean": fl.mean(0).tolist(),
                                     "drift_mean": (1 - fl).mean(0).tolist(),
                                     "whole_model_drift": float(_nanmean(1 - fl))}
    if {"full", "lora"} <= set(out["profiles"]):
        c = compare(a, n_resamples, seed, min_reduction)
        if "undefined" in c:  # kept apart: readers of "comparison" may rely on every statistic being there
            out["comparison_undefined"] = c["undefined"]
        else:
            out["comparison"] = c
    return out


def _reduction_loo(a: dict) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Drift reduction and its leave-one-out values; also per-method leave-one-out drift."""
    fr, lr = _method_rows(a, "full"), _method_rows(a, "lora")
    drift = 1 - a["cka_debiased"]
    d_full, d_lora = _nanmean(drift[fr]), _nanmean(drift[lr])
    loo_drift = 1 - a["loo_cka_debiased"]  # [R, L, n]
    lf, ll = _nanmean(loo_drift[fr], (0, 1)), _nanmean(loo_drift[lr], (0, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        red = 1 - d_lora / d_full
        red_loo = 1 - ll / lf
    return float(red), red_loo, lf, ll


def compare(a: dict, n_resamples: int, seed: int, min_reduction: float) -> dict:
    fr, lr = _method_rows(a, "full"), _method_rows(a, "lora")
    drift = 1 - a["cka_debiased"]
    wm_full, wm_lora = _nanmean(drift[fr], 1), _nanmean(drift[lr], 1)
    red, red_loo, loo_full, loo_lora = _reduction_loo(a)
    if not (math.isfinite(red) and np.isfinite(red_loo).all()) or _nanmean(wm_full) <= NO_DRIFT:
        # no defined layer, or no drift at all in full FT (1 - D_lora / 0): the reduction is not estimable
        why = "no layer with a defined debiased CKA" if not np.isfinite(wm_full).any() else \
            "full FT shows no drift from the base model (D_full = 0): a reduction relative to it is undefined"
        return {"whole_model_drift": {"full": float(_nanmean(wm_full)), "lora": float(_nanmean(wm_lora))},
                "drift_reduction": {"estimate": None, "ci95": [None, None], "se": None, "undefined": why},
                "h1b_one_sided": None, "undefined": why}
    jk = T.jackknife(red, red_loo)
    n = a["n"]
    t_stat = (red - min_reduction) / jk["se"] if jk["se"] > 0 else math.copysign(math.inf, red - min_reduction)
    p_h1b = float(ss.t.sf(t_stat, n - 1))
    seed_test = T.permutation_test_independent(wm_full, wm_lora, "two-sided", n_resamples, seed)
    # example level: per-example standardized-cosine drift, averaged over seeds and layers; paired full - lora
    ex_full = _nanmean(1 - a["cos_std_per_example"][fr], (0, 1))
    ex_lora = _nanmean(1 - a["cos_std_per_example"][lr], (0, 1))
    ex_ok = np.isfinite(ex_full) & np.isfinite(ex_lora)  # examples undefined in every layer and seed are left out
    ex_full, ex_lora = ex_full[ex_ok], ex_lora[ex_ok]
    ex_test = T.permutation_test_paired(ex_full - ex_lora, "two-sided", n_resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_layer_red = 1 - drift[lr].mean(0) / np.where(drift[fr].mean(0) > 0, drift[fr].mean(0), np.nan)
    return {
        "whole_model_drift": {"full": float(wm_full.mean()), "lora": float(wm_lora.mean())},
        "drift_reduction": {"estimate": red, "ci95": list(jk["ci"]), "se": jk["se"], "method":
                            "delete-one jackknife over probe examples (seeds fixed), t interval"},
        "drift_reduction_per_layer": [None if not np.isfinite(v) else float(v) for v in per_layer_red],
        "seed_level_test": seed_test.as_dict(),
        "example_level_test": {**ex_test.as_dict(), "quantity": "per-example standardized-cosine drift, full - lora",
                               "mean_difference": float((ex_full - ex_lora).mean()),
                               "n_examples_excluded": int((~ex_ok).sum()),
                               "cohens_dz": T.cohens_dz(ex_full - ex_lora)},
        "cohens_d_seed_level": T.cohens_d(wm_full, wm_lora),
        "h1b_one_sided": {"null": f"reduction <= {min_reduction}", "t": float(t_stat), "df": n - 1, "p": p_h1b},
        # leave-one-out whole-model drift per method (for the stratified overall jackknife); not written out
        "_loo_full": loo_full, "_loo_lora": loo_lora,
    }


def _decide(p_adj: float, ci: tuple[float, float], threshold: float, alpha: float, higher_is_better: bool) -> str:
    if p_adj < alpha:
        return "supported"
    below = ci[1] < threshold if higher_is_better else ci[0] > threshold
    return "contradicted" if below else "not supported (inconclusive)"


def h1a(correct: dict[str, dict[tuple[str, int], np.ndarray]], margin_points: float, n_resamples: int, seed: int,
        alpha: float) -> dict:
    """LoRA loses at most ``margin_points`` accuracy points against full FT (per task). Bootstrap over test
    examples (paired: same rows for every run) and seeds (resampled within each method). Each task's resamples
    come from its own generator (``seed`` and the task's name), so a task's CI and p do not depend on which other
    tasks the study holds or their order (a task shard reports what the merged study reports)."""
    per_task, pvals = {}, []
    tasks = [t for t in correct if {m for m, _ in correct[t]} >= {"full", "lora"}]
    for task in tasks:
        c = correct[task]
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])  # crc32: stable across processes (hash is not)
        cf = np.stack([c[k] for k in sorted(c) if k[0] == "full"]).astype(np.float32)
        cl = np.stack([c[k] for k in sorted(c) if k[0] == "lora"]).astype(np.float32)
        n = cf.shape[1]
        est = 100 * (cl.mean() - cf.mean())
        reps = np.empty(n_resamples)
        chunk = max(1, 2_000_000 // n)
        for s in range(0, n_resamples, chunk):
            r = min(chunk, n_resamples - s)
            sf = rng.integers(0, cf.shape[0], (r, cf.shape[0]))
            sl = rng.integers(0, cl.shape[0], (r, cl.shape[0]))
            ex = rng.integers(0, n, (r, n))
            pf = cf[sf].mean(1)  # [r, n] per-example accuracy over resampled seeds
            pl = cl[sl].mean(1)
            rows = np.arange(r)[:, None]
            reps[s:s + r] = 100 * (pl[rows, ex].mean(1) - pf[rows, ex].mean(1))
        ci = T.percentile_ci(reps)
        p = float((np.sum(reps <= -margin_points) + 1) / (n_resamples + 1))
        pvals.append(p)
        per_task[task] = {"estimate_points": float(est), "ci95_points": list(ci), "p_one_sided": p,
                          "lora_accuracy": float(cl.mean()), "full_accuracy": float(cf.mean()),
                          "n_test": n, "seeds": {"full": cf.shape[0], "lora": cl.shape[0]}}
    holm = T.correct(pvals, "holm", family=f"H1a over tasks {tasks}", alpha=alpha)
    bonf = T.correct(pvals, "bonferroni", family=f"H1a over tasks {tasks}", alpha=alpha)
    for i, task in enumerate(tasks):
        d = per_task[task]
        d["p_holm"], d["p_bonferroni"] = holm["adjusted"][i], bonf["adjusted"][i]
        d["decision"] = _decide(d["p_holm"], d["ci95_points"], -margin_points, alpha, higher_is_better=True)
    return {
        "hypothesis": f"H1a: LoRA loses at most {margin_points:g} accuracy points against full FT on the test split",
        "estimate": "mean LoRA accuracy - mean full-FT accuracy over seeds, in points",
        "test": f"one-sided bootstrap test of H0: difference <= -{margin_points:g} points ({n_resamples} resamples of "
                "test examples, paired across runs, and of seeds within each method)",
        "correction": "Holm over the per-task family (Bonferroni also given)",
        "decision_rule": f"supported if the Holm-adjusted one-sided p < {alpha}; contradicted if the whole 95% CI "
                         f"lies below -{margin_points:g}; otherwise not supported (inconclusive)",
        "per_task": per_task,
    }


WITHIN_NOISE = "not supported (within seed noise)"


def noise_check(summary: dict) -> dict:
    """Whole-model drift of each method against its seed-vs-seed noise floor, from one task's ``summarize_task``.

    Returns ``{method: {"drift", "floor", "within_floor"}}`` (drift: mean over seeds of 1 - debiased CKA to base,
    averaged over layers; floor: the same between two seeds of the method, averaged over seed pairs; within_floor:
    drift <= floor, None without a floor, i.e. with one seed). A drift no larger than the floor is
    indistinguishable from seed noise: two seeds of the method disagree with each other at least as much as each
    disagrees with the base model (docs/PROTOCOL.md, H1b)."""
    out = {}
    for m, prof in summary["profiles"].items():
        drift = prof["whole_model_drift"]["mean"]
        fl = summary["noise_floor"].get(m, {}).get("whole_model_drift")
        ok = fl is not None and math.isfinite(fl) and math.isfinite(drift)
        out[m] = {"drift": drift, "floor": fl if ok else None, "within_floor": bool(drift <= fl) if ok else None}
    return out


def _overall_noise(per_task: list[dict]) -> dict:
    """The same check on drift and floor averaged over tasks (the quantities the overall reduction is made of)."""
    out = {}
    for m in ("full", "lora"):
        rows = [n[m] for n in per_task if m in n]
        drift = float(np.mean([r["drift"] for r in rows])) if rows else math.nan
        fls = [r["floor"] for r in rows]
        fl = float(np.mean(fls)) if rows and all(f is not None for f in fls) else None
        out[m] = {"drift": drift, "floor": fl, "within_floor": bool(drift <= fl) if fl is not None else None}
    return out


def _floor_decision(rule_decision: str, noise: dict) -> str:
    """H1b's decision given its test's and the noise floor: a reduction of a full-FT drift that is within seed
    noise is a ratio of noise, so neither support nor contradiction is drawn from it."""
    return WITHIN_NOISE if noise.get("full", {}).get("within_floor") else rule_decision


def h1b(summaries: dict[str, dict], min_reduction: float, alpha: float) -> dict:
    not_estimable = {t: s["comparison_undefined"] for t, s in summaries.items() if "comparison_undefined" in s}
    tasks = [t for t in summaries if "comparison" in summaries[t]]
    per_task, pvals = {}, []
    for t in tasks:
        c = summaries[t]["comparison"]
        per_task[t] = {"estimate": c["drift_reduction"]["estimate"], "ci95": c["drift_reduction"]["ci95"],
                       "p_one_sided": c["h1b_one_sided"]["p"], "t": c["h1b_one_sided"]["t"],
                       "seed_level_exact_p": c["seed_level_test"]["p_value"],
                       "seed_level_min_p": c["seed_level_test"]["min_p_value"],
                       "example_level_p": c["example_level_test"]["p_value"],
                       "cohens_d_seed_level": c["cohens_d_seed_level"]}
        pvals.append(c["h1b_one_sided"]["p"])
    holm = T.correct(pvals, "holm", family=f"H1b over tasks {tasks}", alpha=alpha)
    bonf = T.correct(pvals, "bonferroni", family=f"H1b over tasks {tasks}", alpha=alpha)
    for i, t in enumerate(tasks):
        d = per_task[t]
        d["p_holm"], d["p_bonferroni"] = holm["adjusted"][i], bonf["adjusted"][i]
        d["rule_decision"] = _decide(d["p_holm"], d["ci95"], min_reduction, alpha, higher_is_better=True)
        d["noise"] = noise_check(summaries[t])
        d["decision"] = _floor_decision(d["rule_decision"], d["noise"])
    overall = None
    if tasks:
        # overall: reduction of the task-averaged drift; stratified jackknife (examples deleted within their task)
        full = np.mean([summaries[t]["comparison"]["whole_model_drift"]["full"] for t in tasks])
        lora = np.mean([summaries[t]["comparison"]["whole_model_drift"]["lora"] for t in tasks])
        red = 1 - lora / full
        var = 0.0
        for t in tasks:
            c = summaries[t]["comparison"]
            lf, ll = c["_loo_full"], c["_loo_lora"]
            others_f = sum(summaries[u]["comparison"]["whole_model_drift"]["full"] for u in tasks if u != t)
            others_l = sum(summaries[u]["comparison"]["whole_model_drift"]["lora"] for u in tasks if u != t)
            loo = 1 - (others_l + ll) / (others_f + lf)
            nt = len(loo)
            var += (nt - 1) / nt * ((loo - loo.mean()) ** 2).sum()
        se = math.sqrt(var)
        dfree = sum(summaries[t]["n_probe"] for t in tasks) - len(tasks)
        tcrit = ss.t.ppf(0.975, dfree)
        tt = (red - min_reduction) / se if se > 0 else math.copysign(math.inf, red - min_reduction)
        p = float(ss.t.sf(tt, dfree))
        ci = [float(red - tcrit * se), float(red + tcrit * se)]
        noise = _overall_noise([per_task[t]["noise"] for t in tasks])
        rule = _decide(p, ci, min_reduction, alpha, True)
        overall = {"estimate": float(red), "ci95": ci, "se": se, "t": float(tt), "p_one_sided": p,
                   "rule_decision": rule, "noise": noise, "decision": _floor_decision(rule, noise),
                   "tasks_within_noise": [t for t in tasks if per_task[t]["noise"]["full"]["within_floor"]],
                   "method": "stratified delete-one jackknife (examples deleted within their task)"}
    return {
        "hypothesis": f"H1b: LoRA shows at least {min_reduction:.0%} less representation drift than full FT",
        "estimate": "drift reduction 1 - D_lora/D_full, D = mean over layers and seeds of (1 - debiased CKA to base)",
        "test": "one-sided jackknife t-test of H0: reduction <= threshold (probe examples as the sampling unit); "
                "seed-level exact permutation p and example-level sign-flip p reported beside",
        "correction": "Holm over the per-task family (Bonferroni also given); the overall test is a separate "
                      "single test",
        "decision_rule": f"supported if the Holm-adjusted one-sided p < {alpha}; contradicted if the whole 95% CI "
                         f"lies below {min_reduction}; otherwise not supported (inconclusive); in every case "
                         f"'{WITHIN_NOISE}' when full-FT drift is not above its seed-vs-seed noise floor",
        "per_task": per_task, "overall": overall,
        "not_estimable": not_estimable,  # tasks left out of the family, with the reason
    }


# -- I/O: the phase over a study ----------------------------------------------------------------------------------
def json_safe(o):
    """``o`` with NaN/inf (undefined values) as None (null in JSON) and numpy scalars/arrays as plain Python, so
    that no artifact ever holds NaN or a number outside a measure's range where the value is undefined."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def _strip_private(o):
    if isinstance(o, dict):
        return {k: _strip_private(v) for k, v in o.items() if not str(k).startswith("_")}
    if isinstance(o, list):
        return [_strip_private(v) for v in o]
    return o


def load_task_reps(cfg, task: str) -> dict[str, TaskReps] | None:
    """Every pooling's TaskReps for one task, each file read once (None when the base model has none yet)."""
    from lorastudy import representations as RP
    from lorastudy import store

    base_path = store.rep_dir(cfg.out, task) / RP.FILE
    if not base_path.is_file():
        return None
    base, meta = RP.load(base_path)
    runs = {}
    for m in cfg.methods:
        for s in cfg.seeds:
            p = store.rep_dir(cfg.out, task, m, s) / RP.FILE
            if p.is_file():
                arr, md = RP.load(p)
                if md.get("probe_hash") != meta.get("probe_hash"):
                    raise ValueError(f"{p}: probe set differs from the base model's ({md.get('probe_hash')} vs "
                                     f"{meta.get('probe_hash')}); re-run extract")
                runs[(m, s)] = arr
    names = list(meta["layer_names"])
    return {p: TaskReps(task, names, base[p], {k: v[p] for k, v in runs.items()}) for p in RP.POOLINGS}


def load_correct(cfg) -> dict:
    """Per task: (method, seed) -> bool array of correct test predictions, from phase-2 metrics."""
    from lorastudy import store

    out = {}
    for task in cfg.tasks:
        out[task] = {}
        for m in cfg.methods:
            for s in cfg.seeds:
                rd = store.run_dir(cfg.out, task, m, s)
                if store.check_not_damaged(rd, "`lorastudy run CONFIG --only train` (or `train-all`)"):
                    mt = store.read_json(rd / "metrics.json")
                    out[task][(m, s)] = np.asarray(mt["test_predictions"]) == np.asarray(mt["test_labels"])
    return out


def task_state_path(out, task: str):
    """Where the drift phase keeps one task's analysis state: ``phase4/drift/tasks/<task>.json``."""
    from pathlib import Path

    return Path(out) / "phase4" / "drift" / "tasks" / f"{task}.json"


def write_task_state(cfg, task: str, summary: dict, secondary: dict) -> None:
    """Persist one task's analysis state: its ``summarize_task`` output (private leave-one-out drift per method
    included: the overall H1b's stratified jackknife needs it) and its secondary-pooling entry, with the drift
    settings it was computed with. A few KB per task (O(probe rows)), so a results dir without representations
    (e.g. one merged from task shards, ``lorastudy merge``) can still recompute every pooled statistic.

    Written with Python's JSON, which keeps NaN (undefined values) as NaN, so the state reloads to the same floats
    bit for bit (repr round-trips float64). Raises StoreError when the file cannot be written."""
    from lorastudy import store

    store.atomic_write_json(task_state_path(cfg.out, task), {
        "task": task, "drift_settings": cfg.drift.model_dump(mode="json"),
        "runs": [list(r) for r in sorted({(p["method"], p["seed"]) for p in summary["per_run"]})],
        "summary": summary, "secondary": secondary})


def load_task_state(cfg, task: str, log=print) -> tuple[dict, dict] | None:
    """``(summary, secondary)`` of ``write_task_state`` for ``task``, or None when there is none or it was
    computed with other drift settings than ``cfg.drift`` (stale: logged). Arrays the pooled statistics compute
    with come back as numpy arrays. Raises StoreError on a corrupted file."""
    from lorastudy import store

    path = task_state_path(cfg.out, task)
    if not path.is_file():
        return None
    st = store.read_json(path)
    if st.get("drift_settings") != cfg.drift.model_dump(mode="json"):
        log(f"drift: {path} was computed with other drift settings; ignored (extract and rerun drift)")
        return None
    summary = st["summary"]
    c = summary.get("comparison")
    if c is not None:
        c["_loo_full"], c["_loo_lora"] = np.asarray(c["_loo_full"], float), np.asarray(c["_loo_lora"], float)
    return summary, st["secondary"]


def run_drift(cfg, log=print) -> dict:
    """Phase 4A over the study in ``cfg.out``: per task, the analysis of its representations (persisted as its
    analysis state, ``write_task_state``), or, for a task whose representations are not here, its persisted state;
    then H1a (from the phase-2 test predictions), H1b per task and overall, the JSON artifacts and figures."""
    from lorastudy import store
    from lorastudy.report import figures

    d = cfg.drift
    outdir = cfg.out / "phase4" / "drift"
    results = {"design": __doc__.strip().splitlines()[2:], "primary_pooling": "last", "tasks": {}, "secondary": {}}
    summaries = {}
    for task in cfg.tasks:
        reps = load_task_reps(cfg, task)
        if reps is None or not reps["last"].runs:
            state = load_task_state(cfg, task, log)
            if state is None:
                log(f"drift: no representations and no analysis state for {task}; run extract first (in a "
                    "results dir merged from shards: merge the shard that holds it)")
                continue
            # e.g. a results dir merged from task shards: representations stay on the machine that made them
            log(f"drift: {task} from its analysis state {task_state_path(cfg.out, task)} (no representations here)")
            summaries[task], results["secondary"][task] = state
            continue
        summaries[task] = summarize_task(analyze_task(reps["last"]), d.n_resamples, d.seed, d.h1b_min_reduction)
        sm = summarize_task(analyze_task(reps["mean"]), d.n_resamples, d.seed, d.h1b_min_reduction)
        results["secondary"][task] = {"pooling": "mean (non-pad tokens, excluding BOS)",
                                      "profiles": {m: {"drift": p["drift"], "whole_model_drift":
                                                       p["whole_model_drift"]} for m, p in sm["profiles"].items()},
                                      "drift_reduction": sm.get("comparison", {}).get("drift_reduction")}
        write_task_state(cfg, task, summaries[task], results["secondary"][task])
    hyp = {"alpha": d.alpha,
           "H1a": h1a(load_correct(cfg), d.h1a_margin_points, d.n_resamples, d.seed, d.alpha),
           "H1b": h1b(summaries, d.h1b_min_reduction, d.alpha)}
    results["tasks"] = _strip_private(summaries)
    store.atomic_write_json(outdir / "drift_analysis_results.json", json_safe(results))
    store.atomic_write_json(outdir / "hypothesis_test_results.json", json_safe(hyp))
    if summaries:
        figures.drift_figures(results, hyp, outdir, withheld=unsound_runs(cfg, list(summaries)))
    return {"results": results, "hypotheses": hyp}


def unsound_runs(cfg, tasks: list[str]) -> dict[str, list[str]]:
    """Per task, its phase-2 runs that failed or collapsed to the majority class, as ``"method/seedN
    failed|collapsed"``: the tasks whose decisions the report withholds (report.evidence.assess), read by the
    report's own walk over the runs (report.build.phase2_runs)."""
    from lorastudy.report.build import phase2_runs

    out: dict[str, list[str]] = {}
    for r in phase2_runs(cfg):
        if r["task"] in tasks and (r["failed"] or r["collapsed"]):
            out.setdefault(r["task"], []).append(
                f"{r['method']}/seed{r['seed']} {'failed' if r['failed'] else 'collapsed'}")
    return out
