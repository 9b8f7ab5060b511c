"""Overhead of multi-adapter serving against merged models, and H2, from benchmark records (pure: no I/O).

overhead = mean latency(multi-adapter engine) / mean latency(merged, one task per batch) - 1, on the same batch
shapes, each engine against its like: ``batched`` vs ``merged`` (serving path), ``batched-eager`` and ``peft`` vs
``merged-eager`` (HF's modules), ``vllm`` vs ``merged-vllm`` (both in vLLM). The estimate and its 95% CI come from
the timing repeats, which were interleaved in time: a paired bootstrap over repeats (``stats.paired_ratio_bootstrap``).
A multi-adapter engine more than ``IMPLAUSIBLE_SPEEDUP`` faster than merged on the same shapes does strictly more
work, so such a result is flagged as a measurement problem and decides nothing.
"""

from __future__ import annotations

from lorastudy import stats as T

IMPLAUSIBLE_SPEEDUP = 0.10  # a multi-adapter engine this much faster than merged: a measurement problem
H2_ENGINES = ("batched", "vllm")  # the project's engine; the study plan's "in vLLM"


def _reference(engine: str, have: set[str]) -> str:
    if engine.startswith("vllm"):
        return "merged-vllm"
    if engine == "batched":
        return "merged" if "merged" in have else "merged-eager"
    return "merged-eager" if "merged-eager" in have else "merged"


def _compare(x: dict, y: dict, n_boot: int, seed: int, h2_max: float) -> dict:
    """x against y: estimate, CI over paired repeats, one-sided p for H0: overhead >= h2_max, flag."""
    xs, ys = x["repeat_mean_ms"], y["repeat_mean_ms"]
    m = min(len(xs), len(ys))
    out = {"n_repeats": m}
    if m >= 2:
        bs = T.paired_ratio_bootstrap(xs[:m], ys[:m], n_resamples=n_boot, seed=seed)
        out.update(overhead=bs["estimate"], ci95=list(bs["ci"]),
                   p_one_sided_h2=T.bootstrap_p_value(bs["distribution"], h2_max, "less"))
    else:  # too few repeats for a CI
        out.update(overhead=x["latency_ms"]["mean"] / y["latency_ms"]["mean"] - 1, ci95=[None, None],
                   p_one_sided_h2=None)
    out["flag"] = (f"implausible: {-out['overhead']:.0%} faster than its merged reference on the same shapes; a "
                   "measurement problem, not a result") if out["overhead"] < -IMPLAUSIBLE_SPEEDUP else None
    return out


def overhead_analysis(records: list[dict], n_boot: int = 2000, seed: int = 0, h2_max: float = 0.30,
                      alpha: float = 0.05) -> dict:
    """Overhead rows per engine, batch size and adapter count; H2 for the project's engine (``H2``) and for vLLM
    (``H2_vllm``); the project's engine against vLLM per batch size (``vllm_vs_batched``).

    Records need ``engine``, ``batch_size``, ``n_adapters``, ``latency_ms.mean`` and ``repeat_mean_ms``."""
    by = {(r["engine"], r["batch_size"], r["n_adapters"]): r for r in records}
    have = {k[0] for k in by}
    rows = []
    for (e, b, k), r in sorted(by.items()):
        if e.startswith("merged"):
            continue
        ref = by.get((_reference(e, have), b, 1))
        if ref is None:
            continue
        rows.append({"engine": e, "reference": ref["engine"], "batch_size": b, "n_adapters": k,
                     "mixing": r.get("mixing"), **_compare(r, ref, n_boot, seed, h2_max)})
    h2 = _h2(rows, "batched" if any(r["engine"] == "batched" for r in rows) else "batched-eager", h2_max, alpha)
    h2_vllm = _h2(rows, "vllm", h2_max, alpha) if any(r["engine"] == "vllm" for r in rows) else None
    versus = []
    for (e, b, k), r in sorted(by.items()):
        if e == "vllm" and ("batched", b, k) in by and k == max(x[2] for x in by if x[0] == "vllm"):
            c = _compare(r, by[("batched", b, k)], n_boot, seed, h2_max)
            versus.append({"batch_size": b, "n_adapters": k, "batched_ms": by[("batched", b, k)]["latency_ms"]["mean"],
                           "vllm_ms": r["latency_ms"]["mean"], "vllm_over_batched": c["overhead"],
                           "ci95": c["ci95"]})
    return {
        "definition": "overhead = mean latency(multi-adapter engine) / mean latency(merged, one task per batch) - 1",
        "ci": f"percentile bootstrap over timing repeats interleaved in time (paired across conditions), {n_boot} "
              "resamples",
        "implausible_below": -IMPLAUSIBLE_SPEEDUP,
        "rows": rows,
        "H2": h2,
        "H2_vllm": h2_vllm,
        "vllm_vs_batched": versus,
    }


def _h2(rows: list[dict], engine: str, h2_max: float, alpha: float) -> dict:
    """H2 for one engine with every adapter mixed (the hardest case; at batch sizes below the adapter count, the
    adapters in rotation): one-sided test per batch size, Holm over the batch sizes with a valid test."""
    mine = [r for r in rows if r["engine"] == engine]
    k_max = max((r["n_adapters"] for r in mine), default=0)
    h2_rows = [r for r in mine if r["n_adapters"] == k_max]
    tested = [r for r in h2_rows if r["flag"] is None and r["p_one_sided_h2"] is not None]
    fam = f"H2 ({engine}) over batch sizes {[r['batch_size'] for r in tested]}"
    holm = T.correct([r["p_one_sided_h2"] for r in tested], "holm", family=fam, alpha=alpha)
    for r, padj in zip(tested, holm["adjusted"], strict=True):
        r["p_holm"] = padj
        r["decision"] = "supported" if padj < alpha else (
            "contradicted" if r["ci95"][0] > h2_max else "not supported (inconclusive)")
    for r in h2_rows:
        if r["flag"] is not None:
            r["p_holm"], r["decision"] = None, "measurement problem"
        elif r["p_one_sided_h2"] is None:
            r["p_holm"], r["decision"] = None, "not tested (fewer than 2 repeats)"
    decisions = [r["decision"] for r in h2_rows]
    if not h2_rows:
        verdict = None
    elif "measurement problem" in decisions:
        verdict = "not decided: measurement problem (see the flagged batch sizes)"
    elif all(d == "supported" for d in decisions):
        verdict = "supported"
    elif "contradicted" in decisions:
        verdict = "contradicted"
    else:
        verdict = "not supported (inconclusive)"
    ref = h2_rows[0]["reference"] if h2_rows else None
    return {"hypothesis": f"multi-adapter serving costs at most {h2_max:.0%} latency over merged models"
                          + (" (in vLLM)" if engine.startswith("vllm") else ""),
            "engine": engine if h2_rows else None, "reference": ref, "n_adapters": k_max or None,
            "test": f"one-sided bootstrap test of H0: overhead >= {h2_max:.0%}, per batch size",
            "correction": "Holm over batch sizes",
            "decision_rule": f"supported when every batch size has Holm-adjusted p < {alpha}; contradicted when "
                             f"a batch size's whole 95% CI lies above {h2_max:.0%}; otherwise not supported "
                             f"(inconclusive); a batch size whose multi-adapter engine is more than "
                             f"{IMPLAUSIBLE_SPEEDUP:.0%} faster than merged is a measurement problem and leaves H2 "
                             "undecided",
            "per_batch_size": h2_rows, "decision": verdict}


def graph_weights_only(serve: dict) -> list[str]:
    """Engines on CUDA graphs (vLLM's aside) whose recorded peak memory is their weights, within 1 MiB, in every
    condition: ``torch.cuda.max_memory_allocated`` does not see a graph's pool reserved at capture, so for them the
    "peak" is weights only (the report says so beside the table)."""
    by: dict[str, list[dict]] = {}
    for r in serve.get("records", []):
        if r.get("cuda_graph") and not r["engine"].endswith("vllm"):
            by.setdefault(r["engine"], []).append(r)
    return [e for e, rs in by.items()
            if all(r.get("peak_memory_bytes") is not None and r.get("weights_bytes") is not None
                   and abs(r["peak_memory_bytes"] - r["weights_bytes"]) < 2**20 for r in rs)]
