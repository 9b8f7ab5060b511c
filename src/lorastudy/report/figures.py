"""Figures (matplotlib, Agg): PNG at 300 dpi and PDF beside it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lorastudy.serving.analysis import graph_weights_only  # noqa: E402

P = ParamSpec("P")
R = TypeVar("R")
COLORS = {"full": "#c0392b", "lora": "#2874a6", "merged": "#7f8c8d", "peft": "#d68910", "batched": "#1e8449",
          "vllm": "#8e44ad"}


# Our figures draw under an explicit style: matplotlib's defaults plus these. Without it they inherit whatever the
# process set globally: Optuna's plotting calls plt.style.use("ggplot") (grey panels, white grid lines across the
# heatmap) when `run` tunes before it draws.
STYLE = {"axes.grid": False, "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
         "font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11, "legend.fontsize": 7}


def styled(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a figure function under ``plt.style.context(["default", STYLE])`` (restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(*a: P.args, **kw: P.kwargs) -> R:
        with plt.style.context(["default", STYLE]):
            return fn(*a, **kw)

    return wrapper


def save(fig, path: Path) -> list[str]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=300, bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return [str(path.with_suffix(".png")), str(path.with_suffix(".pdf"))]


def _stars(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def _signed_pct(x: float) -> str:
    """'+56%' / '−118%' (a true minus sign; never a sign typed in front of a formatted negative number)."""
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.0%}".replace("-", "\u2212")


def _layer_ticks(ax, names: list[str], axis: str = "x") -> None:
    """Tick labels = layer names, at most ~12 of them (embeddings, layerN, final_norm)."""
    step = max(1, len(names) // 12)
    idx = list(range(0, len(names), step))
    if idx[-1] != len(names) - 1:  # always label the last layer, in place of the grid tick beside it (no overlap)
        idx[-1:] = [len(names) - 1] if len(idx) > 1 else [idx[-1], len(names) - 1]
    if axis == "x":
        ax.set_xticks(idx, [names[i] for i in idx], rotation=45, ha="right")
    else:
        ax.set_yticks(idx, [names[i] for i in idx])


@styled
def drift_figures(results: dict, hyp: dict, outdir: Path, withheld: dict[str, list[str]] | None = None) -> list[str]:
    """The RQ1 figures from drift_analysis_results.json and hypothesis_test_results.json, one panel per task with
    its own scale (a task whose drift is 100x another's would otherwise be a flat line on a shared axis):
    drift_heatmap, drift_profiles, cka_vs_cosine, lora_vs_full (PNG + PDF in ``outdir``); returns the paths.
    ``withheld``: task -> its unsound runs (e.g. ``lora/seed2024 failed``); such a task's panel says "no verdict"
    as the report does, with the rule's outcome beside it."""
    withheld = withheld or {}
    tasks = list(results["tasks"])
    files = []
    per = hyp.get("H1b", {}).get("per_task", {})
    # 1. heatmap: drift by layer x method, one row of panels per task, each with its own colour scale
    names = results["tasks"][tasks[0]]["layer_names"]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6, 0.28 * len(names) + 2.5), 1.3 * len(tasks) + 1.2),
                             squeeze=False, layout="constrained")
    for j, t in enumerate(tasks):
        ax = axes[j, 0]
        r = results["tasks"][t]
        methods = list(r["profiles"])
        data = np.array([r["profiles"][m]["drift"]["mean"] for m in methods], dtype=float)
        finite = data[np.isfinite(data)]
        im = ax.imshow(data, aspect="auto", cmap="magma_r", vmin=min(0.0, float(finite.min()) if finite.size else 0),
                       vmax=float(finite.max()) if finite.size and finite.max() > 0 else None, interpolation="nearest")
        ax.set_yticks(range(len(methods)), [f"{t} / {m}" for m in methods])
        if j == len(tasks) - 1:
            _layer_ticks(ax, r["layer_names"])
        else:
            ax.set_xticks([])
        fig.colorbar(im, ax=ax, label="1 − debiased CKA", fraction=0.04, pad=0.01)
    fig.suptitle("Representation drift by layer (mean over seeds, last-token pooling; colour scale per task)")
    files += save(fig, outdir / "drift_heatmap")

    # 2. profiles with seed bands and the noise floor; 4. cosine beside CKA
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.9), squeeze=False, layout="constrained")
    fig2, axes2 = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.9), squeeze=False, layout="constrained")
    for j, t in enumerate(tasks):
        r = results["tasks"][t]
        x = np.arange(len(r["layer_names"]))
        ax, ax2 = axes[0, j], axes2[0, j]
        for m, prof in r["profiles"].items():
            mu, sd = np.array(prof["drift"]["mean"], float), np.array(prof["drift"]["std"], float)
            ax.plot(x, mu, color=COLORS.get(m), marker=".", label=f"{m} vs base")
            ax.fill_between(x, mu - sd, mu + sd, color=COLORS.get(m), alpha=0.2)
            if m in r["noise_floor"]:
                ax.plot(x, r["noise_floor"][m]["drift_mean"], color=COLORS.get(m), ls="--", lw=1,
                        label=f"{m} seed vs seed")
            ax2.plot(x, mu, color=COLORS.get(m), label=f"{m}: 1 − CKA (debiased)")
            ax2.plot(x, 1 - np.array(prof["cos_std"]["mean"], float), color=COLORS.get(m), ls=":",
                     label=f"{m}: 1 − cosine (standardized)")
            ax2.plot(x, 1 - np.array(prof["cos_raw"]["mean"], float), color=COLORS.get(m), ls="-.", lw=0.8,
                     label=f"{m}: 1 − cosine (raw)")
        for a_ in (ax, ax2):
            a_.set_title(t)
            _layer_ticks(a_, r["layer_names"])
        ax.set_ylabel("drift (1 − debiased CKA to base)")
        ax2.set_ylabel("1 − similarity to base")
    axes[0, 0].legend()
    axes2[0, 0].legend(fontsize=6)
    fig.suptitle("Drift profile: mean ± std over seeds; dashed = seed-vs-seed noise floor (y scale per task)")
    fig2.suptitle("CKA drift beside cosine drift (y scale per task)")
    files += save(fig, outdir / "drift_profiles")
    files += save(fig2, outdir / "cka_vs_cosine")

    # 3. LoRA vs full FT, whole-model drift per seed, the noise floors and the H1b decision, one panel per task
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks) + 1.2, 3.6), squeeze=False,
                             layout="constrained")
    for j, t in enumerate(tasks):
        ax = axes[0, j]
        r = results["tasks"][t]
        for k, m in enumerate(("full", "lora")):
            prof = r["profiles"].get(m)
            if prof is None:
                continue
            wm = prof["whole_model_drift"]
            ax.bar(k, wm["mean"], 0.6, yerr=wm["std"], color=COLORS[m], capsize=3, label=m)
            ax.scatter([k] * len(wm["per_seed"]), wm["per_seed"], color="k", s=8, zorder=3,
                       label="per seed" if k == 0 else None)
            if m in r["noise_floor"]:
                ax.hlines(r["noise_floor"][m]["whole_model_drift"], k - 0.4, k + 0.4, color=COLORS[m], ls="--",
                          lw=1.2, label="seed-vs-seed floor" if k == 0 else None)
        ax.set_xticks(range(2), ["full", "lora"])
        ax.set_xlim(-0.6, 1.6)
        ax.margins(y=0.25)
        if t in per:
            d = per[t]
            verdict = f"H1b: {d.get('decision', 'n/a')}"
            stars = _stars(d.get("p_holm"))
            if withheld.get(t):  # (no stars either: no significance claim rests on it)
                verdict = f"H1b: no verdict ({', '.join(withheld[t])})\nrule outcome: {d.get('decision', 'n/a')}"
                stars = ""
            ax.set_title(f"{t}: reduction {_signed_pct(d['estimate'])} {stars}".rstrip() + f"\n{verdict}",
                         fontsize=8)
        else:
            ax.set_title(t, fontsize=8)
        if j == 0:
            ax.set_ylabel("whole-model drift (1 − debiased CKA)")
    axes[0, 0].legend(fontsize=6, loc="upper right")
    fig.suptitle("LoRA vs full FT: bars = mean ± std over seeds, dots = seeds, dashed = noise floor; "
                 "stars: H1b Holm-adjusted one-sided p vs the 20% bound (seeds fixed)", fontsize=8)
    files += save(fig, outdir / "lora_vs_full")
    return files


@styled
def serving_figures(res: dict, ov: dict, outdir: Path, h2_max: float = 0.30) -> list[str]:
    """Latency against batch size, overhead against the number of adapters mixed (with the H2 bound ``h2_max``, a
    fraction), peak memory per engine: PNG and PDF under ``outdir``; returns the paths. ``res``: the serving
    phase's ``benchmark_results.json``; ``ov``: its ``overhead_analysis.json``."""
    recs = res["records"]
    files = []
    n_max = max(r["n_adapters"] for r in recs)
    engines = sorted({r["engine"] for r in recs})
    # latency vs batch size per engine (every adapter mixed; merged: one task per batch)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for e in engines:
        k = 1 if e.startswith("merged") else n_max
        pts = sorted((r["batch_size"], r["latency_ms"]["p50"], r["latency_ms"]["p95"]) for r in recs
                     if r["engine"] == e and r["n_adapters"] == k)
        if not pts:
            continue
        x, p50, p95 = zip(*pts, strict=True)
        base = e.split("-")[0]
        ax.plot(x, p50, marker="s" if e.endswith("vllm") else "o", color=COLORS.get(base),
                ls="--" if e.endswith("eager") else ":" if e.endswith("-vllm") else "-",
                label=f"{e} ({k} adapter{'s' if k > 1 else ''})")
        ax.fill_between(x, p50, p95, color=COLORS.get(base), alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    lat = [v for r in recs for v in (r["latency_ms"]["p50"], r["latency_ms"]["p95"])]
    # engines 2 ms (CUDA graphs) and 200 ms (PEFT) apart: on a linear axis the fast ones lie flat on zero
    log_y = min(lat) > 0 and max(lat) / min(lat) > 20
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel("latency per batch, ms (p50; band to p95)" + (", log scale" if log_y else ""))
    ax.set_title(f"Serving latency ({res.get('device')}, {res.get('dtype')}, seq {recs[0]['seq_len']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    files += save(fig, outdir / "latency_vs_batch")
    # overhead vs number of adapters: one panel per engine, each on its own linear axis (PEFT's hundreds of
    # percent on a shared axis flatten the engines near the H2 bound)
    engines_ov = sorted({r["engine"] for r in ov["rows"]}) or ["(no engine compared with merged)"]
    batches = sorted({r["batch_size"] for r in ov["rows"]})
    ncol = min(2, len(engines_ov))
    nrow = -(-len(engines_ov) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False, sharex=True)
    bound = 100 * h2_max
    h2_engines = {h["engine"] for h in (ov.get("H2"), ov.get("H2_vllm")) if h and h.get("engine")}
    for ax, e in zip(axes.flat, engines_ov, strict=False):
        for b in batches:
            pts = sorted((r["n_adapters"], r["overhead"], *r["ci95"]) for r in ov["rows"]
                         if r["engine"] == e and r["batch_size"] == b)
            if not pts:
                continue
            k, o, lo, hi = zip(*pts, strict=True)
            ax.errorbar(k, 100 * np.array(o), yerr=[100 * (np.array(o) - lo), 100 * (np.array(hi) - o)],
                        marker="o", capsize=2, color=COLORS.get(e.split("-")[0]),
                        alpha=0.3 + 0.7 * (b / max(batches)), label=f"batch {b}",
                        ls="--" if e.endswith("eager") else "-")
        if e in h2_engines:  # (H2 is a claim about these engines only)
            ax.axhline(bound, color="k", lw=0.8, ls=":", label=f"H2 bound ({bound:.0f}%)")
        ax.axhline(0, color="0.6", lw=0.6)
        ref = next((r["reference"] for r in ov["rows"] if r["engine"] == e), None)
        ax.set_title(f"{e} vs {ref}" if ref else e, fontsize=8)
        ax.set_ylabel("overhead (%)", fontsize=8)
        ax.legend(fontsize=6, loc="best")
    for ax in axes.flat[len(engines_ov):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("adapters served (mixed in a batch that holds them all, else in rotation)", fontsize=7)
    if not ov["rows"]:  # (serve.engines without a merged reference: nothing to compare, the panel says so)
        axes.flat[0].text(0.5, 0.5, "no overhead rows: serve.engines has no merged reference", ha="center",
                          va="center", fontsize=8, transform=axes.flat[0].transAxes)
    fig.suptitle("Overhead against the merged model, mean latency, 95% CI over interleaved repeats", fontsize=9)
    files += save(fig, outdir / "overhead_vs_adapters")
    # memory
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    mem = {}
    for r in recs:
        if r["peak_memory_bytes"] is not None:  # None: not measured (a vLLM worker without a GPU)
            mem[r["engine"]] = max(mem.get(r["engine"], 0), r["peak_memory_bytes"])
    ax.bar(list(mem), [v / 2**20 for v in mem.values()], color=[COLORS.get(e.split("-")[0]) for e in mem])
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    for t in ax.get_xticklabels():
        t.set_horizontalalignment("right")
    weights_only = [e for e in graph_weights_only(res) if e in mem]
    ax.set_ylabel("peak memory, MiB (largest over conditions)", fontsize=8)
    ax.set_title(f"Peak memory per engine, {n_max} adapters: merged and merged-eager hold one model per "
                 "adapter" + (", merged-vllm one" if "merged-vllm" in mem else "")
                 + (f"\n({', '.join(weights_only)}: weights only, CUDA-graph pools not counted)" if weights_only
                    else ""), fontsize=8)
    files += save(fig, outdir / "memory")
    return files
