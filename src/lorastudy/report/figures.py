"""Figures (matplotlib, Agg): PNG at 300 dpi and PDF beside it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"full": "#c0392b", "lora": "#2874a6", "merged": "#7f8c8d", "peft": "#d68910", "batched": "#1e8449",
          "vllm": "#8e44ad"}


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


def drift_figures(results: dict, hyp: dict, outdir: Path) -> list[str]:
    tasks = list(results["tasks"])
    files = []
    # 1. heatmap: drift by layer x (task, method)
    rows, labels = [], []
    for t in tasks:
        for m, prof in results["tasks"][t]["profiles"].items():
            rows.append(prof["drift"]["mean"])
            labels.append(f"{t} / {m}")
    names = results["tasks"][tasks[0]]["layer_names"]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names) + 2), 0.45 * len(rows) + 1.5))
    im = ax.imshow(np.array(rows), aspect="auto", cmap="magma_r", vmin=0)
    ax.set_yticks(range(len(labels)), labels)
    step = max(1, len(names) // 12)
    ax.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)], rotation=45,
                  ha="right")
    fig.colorbar(im, ax=ax, label="drift = 1 − debiased CKA to base")
    ax.set_title("Representation drift by layer (mean over seeds, last-token pooling)")
    files += save(fig, outdir / "drift_heatmap")

    # 2. profiles with seed bands and the noise floor; 4. cosine beside CKA
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False, sharey=True)
    fig2, axes2 = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False, sharey=True)
    for j, t in enumerate(tasks):
        r = results["tasks"][t]
        x = np.arange(len(r["layer_names"]))
        ax, ax2 = axes[0, j], axes2[0, j]
        for m, prof in r["profiles"].items():
            mu, sd = np.array(prof["drift"]["mean"]), np.array(prof["drift"]["std"])
            ax.plot(x, mu, color=COLORS.get(m), label=f"{m} vs base")
            ax.fill_between(x, mu - sd, mu + sd, color=COLORS.get(m), alpha=0.2)
            if m in r["noise_floor"]:
                ax.plot(x, r["noise_floor"][m]["drift_mean"], color=COLORS.get(m), ls="--", lw=1,
                        label=f"{m} seed vs seed")
            ax2.plot(x, mu, color=COLORS.get(m), label=f"{m}: 1 − CKA (debiased)")
            ax2.plot(x, 1 - np.array(prof["cos_std"]["mean"]), color=COLORS.get(m), ls=":",
                     label=f"{m}: 1 − cosine (standardized)")
            ax2.plot(x, 1 - np.array(prof["cos_raw"]["mean"]), color=COLORS.get(m), ls="-.", lw=0.8,
                     label=f"{m}: 1 − cosine (raw)")
        for a_ in (ax, ax2):
            a_.set_title(t)
            a_.set_xlabel("layer (0 = embeddings, last = final norm)")
        ax.set_ylabel("drift")
    axes[0, 0].legend(fontsize=7)
    axes2[0, 0].legend(fontsize=6)
    fig.suptitle("Drift profile: mean ± std over seeds; dashed = seed-vs-seed noise floor")
    fig2.suptitle("CKA drift beside cosine drift")
    files += save(fig, outdir / "drift_profiles")
    files += save(fig2, outdir / "cka_vs_cosine")

    # 3. LoRA vs full FT, whole-model drift with significance markers
    per = hyp.get("H1b", {}).get("per_task", {})
    fig, ax = plt.subplots(figsize=(1.8 * len(tasks) + 2, 3.6))
    w = 0.38
    for j, t in enumerate(tasks):
        for k, m in enumerate(("full", "lora")):
            prof = results["tasks"][t]["profiles"].get(m)
            if prof is None:
                continue
            wm = prof["whole_model_drift"]
            ax.bar(j + (k - 0.5) * w, wm["mean"], w, yerr=wm["std"], color=COLORS[m], capsize=3,
                   label=m if j == 0 else None)
            ax.scatter([j + (k - 0.5) * w] * len(wm["per_seed"]), wm["per_seed"], color="k", s=8, zorder=3)
        if t in per:
            top = max(results["tasks"][t]["profiles"][m]["whole_model_drift"]["mean"] for m in ("full", "lora"))
            ax.text(j, top * 1.08 + 1e-3, f"−{per[t]['estimate']:.0%} {_stars(per[t]['p_holm'])}", ha="center",
                    fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("whole-model drift (1 − debiased CKA)")
    ax.set_title("LoRA vs full FT (reduction; H1b Holm-adjusted one-sided p vs 20%)", fontsize=9)
    ax.legend()
    files += save(fig, outdir / "lora_vs_full")
    return files


def serving_figures(res: dict, ov: dict, outdir: Path) -> list[str]:
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
        ax.plot(x, p50, marker="o", color=COLORS.get(base), ls="--" if e.endswith("eager") else "-",
                label=f"{e} ({k} adapter{'s' if k > 1 else ''})")
        ax.fill_between(x, p50, p95, color=COLORS.get(base), alpha=0.12)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per batch, ms (p50; band to p95)")
    ax.set_title(f"Serving latency ({res.get('device')}, {res.get('dtype')}, seq {recs[0]['seq_len']})", fontsize=9)
    ax.legend(fontsize=7)
    files += save(fig, outdir / "latency_vs_batch")
    # overhead vs number of adapters
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for e in sorted({r["engine"] for r in ov["rows"]}):
        for b in sorted({r["batch_size"] for r in ov["rows"]}):
            pts = sorted((r["n_adapters"], r["overhead"], *r["ci95"]) for r in ov["rows"]
                         if r["engine"] == e and r["batch_size"] == b)
            if not pts:
                continue
            k, o, lo, hi = zip(*pts, strict=True)
            ax.errorbar(k, 100 * np.array(o), yerr=[100 * (np.array(o) - lo), 100 * (np.array(hi) - o)],
                        marker="o", capsize=2, color=COLORS.get(e.split("-")[0]),
                        alpha=0.35 + 0.65 * (b / max(r["batch_size"] for r in ov["rows"])), label=f"{e} b={b}",
                        ls="--" if e.endswith("eager") else "-")
    ax.axhline(30, color="k", lw=0.8, ls=":", label="H2 bound (30%)")
    ax.set_xlabel("distinct adapters mixed in each batch")
    ax.set_ylabel("overhead vs merged (%)")
    ax.legend(fontsize=6, ncol=2)
    files += save(fig, outdir / "overhead_vs_adapters")
    # memory
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    mem = {}
    for r in recs:
        if r["peak_memory_bytes"] is not None:  # None: not measured (a vLLM worker without a GPU)
            mem[r["engine"]] = max(mem.get(r["engine"], 0), r["peak_memory_bytes"])
    ax.bar(list(mem), [v / 2**20 for v in mem.values()], color=[COLORS.get(e.split("-")[0]) for e in mem])
    ax.set_ylabel("peak memory, MiB (weights + activations)")
    ax.set_title(f"Memory with {n_max} adapters (merged = {n_max} model copies)", fontsize=9)
    files += save(fig, outdir / "memory")
    return files
