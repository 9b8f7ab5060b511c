"""Render benchmarks/results/RESULTS.md from the JSON files in benchmarks/results/ (no number typed by hand).

    python benchmarks/results_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

R = Path(__file__).resolve().parent / "results"


def _load(name: str):
    p = R / name
    return json.loads(p.read_text()) if p.is_file() else None


def sst2() -> list[str]:
    out = ["## SmolLM2-135M on the full SST-2 training split (H200)", "",
           "Command (on the H200, after staging with `../shared/tools/device-stage typer rich`): "
           "`MAX_STEPS=1200 bash benchmarks/gpu/sst2_full.sh` — both runs side by side on one GPU, "
           "`lorastudy train configs/smollm2.yaml --task sst2 --method full|lora --seed 42 --set hp.batch_size=32 "
           "--set hp.epochs=1 --set hp.warmup_ratio=0.06 --set hp.max_steps=1200 --set hp.lr=2e-5|8e-4`.", "",
           "| method | lr | batch | steps (examples) | val acc | test acc | test F1 | train time s | tokens/s | "
           "peak GPU GiB | trainable params |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ("full", "lora"):
        d = _load(f"sst2_smollm2_{m}_h200.json")
        if d is None:
            continue
        hp = d["hparams"]
        out.append(f"| {m} | {hp['lr']:g} | {hp['batch_size']} | {d['steps']} ({d['steps'] * hp['batch_size']:,} of "
                   f"{d['n_train']:,}) | {d['validation']['accuracy']:.4f} | {d['test']['accuracy']:.4f} | "
                   f"{d['test']['f1']:.4f} | {d['train_time_s']:.0f} | {d['tokens_per_s']:.0f} | "
                   f"{d['peak_memory_bytes'] / 2**30:.2f} | {d['trainable_params']:,} |")
    return out + [""]


def train_step() -> list[str]:
    d = _load("train_step_h200.json")
    if d is None:
        return []
    out = ["## Training step: fast path (static shapes + CUDA graphs) vs eager (H200)", "",
           f"Command: `PART=steps STEPS={d['meta']['steps']} bash benchmarks/gpu/fast.sh` = `{d['meta']['command']}` "
           f"(device {d['meta']['device']}, torch {d['meta']['torch']}; eager loops {d['meta']['steps']} timed "
           f"steps, fast path {5 * d['meta']['steps']}, after {d['meta']['warmup']} warm-up; random token batches; "
           "bf16 autocast, fp32 master weights, AdamW, clipping at 0.3). HF eager = a plain HF/PEFT loop "
           "(`.item()` per step); eager = `train.fast_step=eager`; fast = `train.fast_step=cuda_graph`. MFU: model "
           "FLOPs (6N per token full FT, 4N LoRA, plus attention) over 790 TFLOP/s. "
           + d["meta"].get("machine", "") + ("; " + d["meta"]["note"] if d["meta"].get("note") else "") + ".", "",
           "| model | method | tokens | batch | HF eager ms | eager ms | fast ms | fast vs HF | fast tokens/s | "
           "MFU (fast) | kernels per step (4 x 24 tokens) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['model']} | {r['method']} | {r['seq_len']} | {r['batch_size']} | {r['hf_eager_ms']:.1f} | "
                   f"{r['lorastudy_eager_ms']:.1f} | {r['fast_ms']:.2f} | {r['speedup_fast_vs_hf']:.1f}x | "
                   f"{r['fast_tokens_per_s']:.0f} | {r['mfu_fast']:.1%} | {r.get('kernels_per_step_b4_sst2', '')} |")
    prof = [r for r in d["rows"] if r.get("kernel_histogram_b4_sst2")]
    if prof:
        us = [r["fast_ms"] * 1e3 / r["kernels_per_step_b4_sst2"] for r in prof
              if r["model"] == "smollm2" and r["batch_size"] == 4]
        out += ["", "Profile of one fast-path step at batch 4 x 24 tokens (`torch.profiler`, CUDA kernels inside the "
                "replayed graphs, grouped by the first 50 characters of their name): a serial chain of thousands of "
                f"small kernels, so at SmolLM2 size the step time is kernel count x per-kernel latency "
                f"({min(us):.1f}-{max(us):.1f} us), "
                "not FLOPs or bytes. TinyLlama full FT (longer kernels) also streams the fp32 master weights, "
                "gradients and AdamW moments of 1.1B parameters through memory every step, a fixed cost that does "
                "not shrink with the batch (batch 1 already takes most of the batch-16 time).", "",
                "| model | method | kernels per step | fast ms (batch 4) | us per kernel | 5 ms would need <= kernels "
                "| most frequent kernels (count) |", "|---|---|---|---|---|---|---|"]
        for r in prof:
            if r["batch_size"] != 4:
                continue
            n, ms = r["kernels_per_step_b4_sst2"], r["fast_ms"]
            top = "; ".join(f"`{k.replace('void at::native::', '')}` {c}" for k, c in r["kernel_histogram_b4_sst2"][:4])
            out.append(f"| {r['model']} | {r['method']} | {n:,} | {ms:.2f} | {ms * 1e3 / n:.2f} | "
                       f"{5e3 / (ms * 1e3 / n):,.0f} | {top} |")
    before = _load("train_step_h200_before_rmsnorm.json")
    if before is not None:
        old = {(r["model"], r["method"], r["batch_size"]): r for r in before["rows"]}
        out += ["", "Fused RMSNorm (`torch.rms_norm` on the fast path, one kernel each way instead of HF's ~6 forward "
                "and ~10 backward): the fast step before (`train_step_h200_before_rmsnorm.json`, same command, "
                "measured in the previous session, before the change) and now.", "",
                "| model | method | batch | fast ms before | fast ms now | change | kernels per step before -> now |",
                "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            b = old.get((r["model"], r["method"], r["batch_size"]))
            if b is None:
                continue
            k = (f"{b['kernels_per_step_b4_sst2']:,} -> {r['kernels_per_step_b4_sst2']:,}"
                 if b.get("kernels_per_step_b4_sst2") and r.get("kernels_per_step_b4_sst2") else "")
            out.append(f"| {r['model']} | {r['method']} | {r['batch_size']} | {b['fast_ms']:.2f} | "
                       f"{r['fast_ms']:.2f} | {r['fast_ms'] / b['fast_ms'] - 1:+.1%} | {k} |")
    return out + [""]


def trajectories() -> list[str]:
    d = _load("train_step_trajectory_lora_h200.json")
    full = R / "train_step_trajectory_full_h200.log"
    if d is None:
        return []
    out = ["## Loss trajectories: fast vs eager, 200 real SST-2 steps (SmolLM2-135M, batch 4, dropout 0, H200)", "",
           "Command: `PART=trajectory bash benchmarks/gpu/fast.sh` (= `python benchmarks/train_step.py --parts "
           "trajectory --trajectory-steps 200`). Same initial weights and batches; `eager padded` runs the eager "
           "step on the same bucket-padded batches as the fast path: mathematically the same as `eager`, so its "
           "distance to `eager` is the bf16 noise floor that the fast path is judged against.", "",
           "| method | fast vs eager: max / median rel. diff per step | eager padded vs eager: max / median | "
           "mean loss of the last 20 steps (fast / eager / eager padded) |", "|---|---|---|---|"]
    r = d["trajectory"][0]
    last = r["mean_loss_last_20"]
    out.append(f"| {r['method']} | {r['max_rel_diff_fast_vs_eager']:.3f} / {r['median_rel_diff_fast_vs_eager']:.3f} | "
               f"{r['max_rel_diff_padded_vs_eager']:.3f} / {r['median_rel_diff_padded_vs_eager']:.3f} | "
               f"{last['fast']:.3f} / {last['eager']:.3f} / {last['eager_padded']:.3f} |")
    losses = r["losses"]
    out += ["", "Max relative difference over the first k steps (the trajectories agree until bf16 rounding "
            "differences, amplified by training, take over, and the fast path does so no faster than padding "
            "alone):", "", "| first k steps | fast vs eager | eager padded vs eager |", "|---|---|---|"]
    for k in (1, 5, 10, 20, 50, 200):
        def rel(v, k=k):
            return max(abs(a - b) / abs(b) for a, b in zip(v[:k], losses["eager"][:k], strict=True))
        out.append(f"| {k} | {rel(losses['fast']):.4f} | {rel(losses['eager_padded']):.4f} |")
    if full.is_file():
        out += ["", "Full FT (the JSON of that run was not written: its time limit ended the LoRA half; the line its "
                "log printed for full FT, verbatim, from `train_step_trajectory_full_h200.log`):", "",
                "    " + full.read_text().strip().splitlines()[0]]
    return out + [""]


def workers() -> list[str]:
    d = _load("train_step_workers_h200.json")
    if d is None:
        return []
    m = d["meta"]
    out = [f"## Worker scaling: concurrent SmolLM2 runs on one H200 ({m['method']}, batch {m['batch_size']} x "
           f"{m['seq_len']} tokens)", "",
           f"Command: `{m['command']}`. {m['note']}.", "",
           "| mode | processes | streams per process | concurrent runs | aggregate steps/s | per run steps/s | "
           "vs one eager run |", "|---|---|---|---|---|---|---|"]
    eager = d["eager_one_run_steps_per_s"]
    for p in d["points"]:
        out.append(f"| {p['mode']} | {p['processes']} | {p['streams']} | {p['runs']} | "
                   f"{p['aggregate_steps_per_s']:.1f} | {p['mean_per_run_steps_per_s']:.1f} | "
                   f"{p['aggregate_steps_per_s'] / eager:.1f}x |")
    later = _load("train_step_workers_streams16_partial_h200.json")
    if later is not None:
        pts = {(p["mode"], p["streams"]): p["aggregate_steps_per_s"] for p in later["workers"]["points"]}
        out += ["", f"Later, with the fused RMSNorm (`{later['meta']['command']}`; {later['meta']['note']}): one eager "
                f"run {pts[('eager', 1)]:.1f} steps/s, one fast run {pts[('fast', 1)]:.1f} steps/s; no 16-stream "
                "number."]
    return out + [""]


def study_time() -> list[str]:
    d = _load("study_time_smollm2_h200_estimate.json")
    if d is None:
        return []
    t = d["total"]
    out = ["## Whole-protocol time estimate, configs/smollm2.yaml on one H200 (a dry-run estimate, not a timed run)",
           "", f"Command: `{d['command']}`.", "",
           "| phase | task | method | runs | planned steps | h at best fast concurrency | h, one eager run | "
           "h at the tuning run's rate |", "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"] + [dict(phase="**total**", task="", method="", runs="", **t)]:
        tr = r.get("seconds_at_tuning_run_rate")
        out.append(f"| {r['phase']} | {r['task']} | {r['method']} | {r['runs']} | {r['steps']:,.0f} | "
                   f"{r['seconds_fast_best_concurrency'] / 3600:.2f} | {r['seconds_one_eager_run'] / 3600:.2f} | "
                   f"{'' if tr is None else f'{tr / 3600:.2f}'} |")
    out += ["", "Not included: " + "; ".join(d["not_included"]) + "."]
    if d.get("tuning_run_seconds_per_planned_step"):
        out += ["", f"The tuning-run rate is {d['tuning_run_seconds_per_planned_step'] * 1e3:.2f} GPU-ms per planned "
                f"step, from `{d['trials_from']}` (the calls' wall time x GPUs over the planned steps of the completed "
                "trials, so it includes evaluation, graph captures and the work lost to interrupted trials). At that "
                f"rate the protocol's training takes {t['seconds_at_tuning_run_rate'] / 60:.0f} min on one H200 "
                f"against the 25-minute target for everything ({t['seconds_at_tuning_run_rate'] / 1500:.1f}x over); "
                f"even at the best measured concurrency without evaluation it takes "
                f"{t['seconds_fast_best_concurrency'] / 60:.0f} min."]
    f = d.get("fused")
    if f:
        sh = f["shape"]
        src = f["rates_from"] if isinstance(f["rates_from"], list) else [f["rates_from"]]
        out += ["", f"With fused training (measured in {', '.join(f'`{x}`' for x in src)}"
                + (f" and, for SST-2's 3-seed phase-2 groups, `{f['phase2_from']}`" if f.get("phase2_from") else "")
                + f"; the other groups at batch {sh['batch_size']} x {sh['seq_len']} tokens; phase 2 planned with the "
                f"phase-1 best of `{f['best_hparams_from']}`; train.fuse_max_runs {f.get('fuse_max_runs', 32)}). "
                "The groups of a phase run at once, so a phase takes the larger of its throughput bound (each "
                "method's run-steps at its widest group's rate) and its longest chain (a group's longest run x the "
                "group's step time); the phases follow each other.", "",
                "| phase | group | slots | run-steps | group run-steps/s | throughput min | longest chain (steps) | "
                "chain min | step time from |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in f["rows"]:
            out.append(f"| {r['phase']} | {r['group']} | {r['slots']} | {r['run_steps']:,.0f} | "
                       f"{r['run_steps_per_s']:.0f} | {r['throughput_s'] / 60:.1f} | {r['longest_trial_steps']:,} | "
                       f"{r['critical_path_s'] / 60:.1f} | {r.get('step_from', 'stepper')} |")
        for r in f["rows"]:
            if "critical_path_shared_s" in r:
                out += ["", f"Measured side by side (`--phase2-together`, two threads and CUDA streams of one process, "
                        f"as train-all runs them): {r['group'].split(',')[0].rsplit('/', 1)[0]} steps at "
                        f"{r['together_ms']:.2f} ms beside the other SST-2 group against {r['step_ms']:.2f} ms alone, "
                        f"so its chain ends at {r['critical_path_shared_s'] / 60:.1f} min instead of "
                        f"{r['critical_path_s'] / 60:.1f}."]
        out += ["", f"Phase 1 ~ {f['tune_s'] / 60:.1f} min, phase 2 ~ {f['train_s'] / 60:.1f} min: "
                f"**{f['total_training_s'] / 60:.1f} min** of training (not included: early stopping, evaluation "
                "passes, graph captures, model set-up, phases 0 and 3-4)."]
        for o in d.get("fused_other_widths", []):
            out += ["", f"With train.fuse_max_runs {o['fuse_max_runs']}: phase 1 ~ {o['tune_s'] / 60:.1f} min, "
                       f"phase 2 ~ {o['train_s'] / 60:.1f} min: **{o['total_training_s'] / 60:.1f} min**."]
        for o in [f] + d.get("fused_other_widths", []):
            w = o.get("overlap_what_if")
            if w:
                crit = max(w["chains_s"], key=w["chains_s"].get)
                out += ["", f"What-if, not implemented (`lorastudy run` starts phase 2 once phase 1 is done; groups "
                        "that share the GPU taken at their alone step times, which the side-by-side measurement "
                        "above contradicts), "
                           f"train.fuse_max_runs {o['fuse_max_runs']}: each task x method's phase 2 started when its "
                           f"tuning ends, beside the rest: ~{w['total_s'] / 60:.1f} min (all the work at the widest "
                           f"groups' rates {w['all_work_s'] / 60:.1f} min; longest chain {crit}, "
                           f"{w['chains_s'][crit] / 60:.1f} min)."]
    cp = d.get("critical_path")
    if cp:
        out += ["", f"Critical path per task and method (longest tuning trial + one phase-2 run with the best "
                f"trial's batch size and epochs, both from `{d.get('trials_from')}`; sequential steps at a lone run's "
                f"latency from `{d.get('levers_from')}`, without and with all step levers):", "",
                "| task | method | tuning chain steps | phase-2 steps | phase-2 batch | ms/step none | ms/step all | "
                "min none | min all |", "|---|---|---|---|---|---|---|---|---|"]
        for r in cp["rows"]:
            out.append(f"| {r['task']} | {r['method']} | {r['tune_chain_steps']:,} | {r['phase2_steps']:,} | "
                       f"{r['phase2_batch']} | {r['ms_per_step_none']:.2f} | {r['ms_per_step_all']:.2f} | "
                       f"{r['chain_min_none']:.1f} | {r['chain_min_all']:.1f} |")
    return out + [""]


def tuning_complete() -> list[str]:
    d = _load("tune_smollm2_h200x4.json")
    if d is None:
        return []
    m, trials = d["meta"], d["trials"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    wall = sum(c["wall_s"] for c in m["calls"])
    out = [f"## Phase 1 complete: configs/smollm2.yaml tuning, {len(done)} trials ({m['machine']})", "",
           f"Inside each call: `{m['command_inside']}`. The Optuna database was carried from call to call "
           "(`.carryr/optuna.db`); trials still running when a call's time ran out were marked failed "
           "(`interrupted`) and rerun from scratch by the next call. Database, best hyperparameters "
           "(`*_optimal.yaml`), summary and optimization-history plots: `tune_smollm2_h200x4/`; every trial: "
           "`tune_smollm2_h200x4.json`; GPU samples: `tune_smollm2_h200x4_gpu.txt`.", "",
           "| call | command | wall s | rc | workers x streams | GPU max memory GiB (per GPU) | "
           "GPU mean util % (per GPU) | note |", "|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(m["calls"], 1):
        gpus = c["gpus"].values()
        mem = " / ".join(f"{g['max_memory_mib'] / 1024:.1f}" for g in gpus)
        util = " / ".join(f"{g['mean_util_pct']:.0f}" for g in gpus)
        out.append(f"| {i} | `{c['command']}` | {c['wall_s']} | {c['rc']} | {c['workers']} x "
                   f"{c['streams_per_worker']} | {mem} | {util} | {c['note']} |")
    out += ["", f"Tuning wall time over the three calls: {wall} s ({wall / 60:.1f} min) on 4 GPUs.", ""]
    reasons: dict[str, int] = {}
    for t in trials:
        if t["state"] == "FAIL":
            ua = t["user_attrs"]
            err = ua.get("error", "?")
            why = ("interrupted (call time limit)" if ua.get("interrupted") else
                   "surplus (proposed after the study had all its trials)" if ua.get("surplus") else
                   f"diverged ({t['method']}): non-finite training loss" if "non-finite" in err else err)
            reasons[why] = reasons.get(why, 0) + 1
    out += ["| trials failed or replaced, by cause | count |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
    summary = json.loads((R / "tune_smollm2_h200x4" / "summary.json").read_text())
    out += ["", "| task | method | complete | best val acc | best val F1 | trial s (median) | steps (median) | "
            "lr | batch | epochs | warmup | weight decay | LoRA alpha | LoRA dropout |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in summary["studies"]:
        mine = [t for t in done if t["task"] == st["task"] and t["method"] == st["method"]]
        secs = sorted(t["user_attrs"]["seconds"] for t in mine)
        steps = sorted(t["user_attrs"]["steps"] for t in mine)
        hp = st["best_hparams"]
        f1 = "" if st.get("best_val_f1") is None else f"{st['best_val_f1']:.4f}"
        drop = "" if hp.get("lora_dropout") is None else f"{hp['lora_dropout']:.3f}"
        out.append(f"| {st['task']} | {st['method']} | {st['n_complete']}/{st['n_trials_target']} | "
                   f"{st['best_value']:.4f} | {f1} | {secs[len(secs) // 2]:.0f} | {steps[len(steps) // 2]} | "
                   f"{hp['lr']:.2e} | {hp['batch_size']} | {hp['epochs']} | {hp['warmup_ratio']:.3f} | "
                   f"{hp['weight_decay']:.4f} | {hp.get('lora_alpha', '')} | "
                   f"{drop} |")
    return out + [""]


def tuning_partial() -> list[str]:
    rows = _load("tune_smollm2_partial_h200.json")
    if rows is None:
        return []
    out = ["## Earlier tuning run on one H200 (configs/smollm2.yaml, stopped by its time limit: partial; superseded by "
           "the complete run above)", "",
           "Command: `lorastudy tune configs/smollm2.yaml --data-dir $LORASTUDY_GLUE_DIR --set "
           "output_dir=/tmp/lorastudy/results --streams 8` under `timeout -s INT 450` (the call's limit ended it; the "
           "trial table was read from the Optuna database afterwards). That version gave each study's worker loops "
           "to one thread chunk, so only the three full-FT studies ran (6 threads); fixed since (loops move between "
           "studies). GPU memory sampled every 15 s: `tune_smollm2_partial_h200_gpu.txt`.", "",
           "| task | method | trial | state | val acc | lr | batch | epochs | trial s | train s | best step |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ua, p = r["user_attrs"], r["params"]
        val = "" if r["value"] is None else f"{r['value']:.4f}"
        out.append(f"| {r['task']} | {r['method']} | {r['number']} | {r['state']} | {val} | {p['lr']:.2e} | "
                   f"{p['batch_size']} | {p['epochs']} | {ua.get('seconds', 0):.0f} | "
                   f"{ua.get('train_time_s', 0):.0f} | {ua.get('best_step', '')} |")
    return out + [""]


# (file stem, what, command); the newest first. v3's code is commit 204de1f (the device copy's git metadata lagged a
# commit, so the JSON's code_version says 0a71e5c + uncommitted changes).
SERVE_RUNS = [
    ("serve_tinyllama_vllm_h200", "v3 + vLLM 0.26.0: (merged-vllm, and base + 3 adapters in vLLM), three adapters",
     "source /tmp/lorastudy/env.sh && source /tmp/vllm/env.sh && ARCHS=\"smollm2 tinyllama\" T_ARCH=245 bash "
     "benchmarks/gpu/vllm.sh"),
    ("serve_smollm2_vllm_h200", "v3 + vLLM 0.26.0: (merged-vllm, and base + 3 adapters in vLLM), three adapters",
     "source /tmp/lorastudy/env.sh && source /tmp/vllm/env.sh && ARCHS=\"smollm2 tinyllama\" T_ARCH=245 bash "
     "benchmarks/gpu/vllm.sh"),
    ("serve_tinyllama_h200", "v3 (current): fused q/k/v and gate/up projections and fused RMSNorm for merged and "
     "batched alike; LoRA as one shrink bmm and one in-place expand per projection group",
     "PARTS=bench ARCHS=tinyllama EAGER_REQUESTS=50 bash benchmarks/gpu/serve.sh"),
    ("serve_tinyllama_h200_n9", "v3 (current), nine adapters (3 tasks x 3 seeds)",
     "PARTS=bench ARCHS=tinyllama N_ADAPTERS=9 EAGER_REQUESTS=40 bash benchmarks/gpu/serve.sh"),
    ("serve_smollm2_h200", "v3 (current), nine adapters (3 tasks x 3 seeds)",
     "PARTS=bench ARCHS=smollm2 N_ADAPTERS=9 EAGER_REQUESTS=40 bash benchmarks/gpu/serve.sh"),
    ("serve_tinyllama_h200_v2", "v2: HF modules; one gather per shape group per forward, scaling folded into B, "
     "baddbmm (serve.sh of commit 62ecfed)", "REQUESTS=100 WARMUP=10 bash benchmarks/gpu/serve.sh"),
    ("serve_tinyllama_h200_v1", "v1: gather A, B and scale in every LoRA layer, then bmm, bmm, add "
     "(commit 'GPU-ready paths')", "bash benchmarks/gpu/bench.sh"),
]
TARGET = {"overhead": 0.10, "merged_b1_ms": 3.0}  # the issue's targets (TinyLlama, three adapters mixed)


def _serve_run(stem: str) -> tuple[dict | None, dict | None]:
    """A serve-bench run's benchmark_results and overhead_analysis, saved as <stem>.json and its overhead twin."""
    return _load(f"{stem}.json"), _load(stem.replace("_h200", "_overhead_h200") + ".json")


def serving() -> list[str]:
    out = serving_summary() + serving_profile()
    for stem, what, cmd in SERVE_RUNS:
        out += serving_run(stem, what, cmd)
    return out


def serving_summary() -> list[str]:
    """The issue's targets per run: batched with three adapters mixed vs merged, per batch size."""
    out = ["## Serving targets: batched (three adapters mixed in every batch) vs merged, CUDA graphs, H200", "",
           f"Targets (TinyLlama): overhead <= {TARGET['overhead']:.0%} at every batch size 1-16 and merged <= "
           f"{TARGET['merged_b1_ms']:g} ms at batch 1. Sections below give every row and the commands.", "",
           "| run | merged ms at b=1 | overhead b=1 | b=2 | b=4 | b=8 | b=16 | all <= 10%? | all loaded mixed: max |",
           "|---|---|---|---|---|---|---|---|---|"]
    for stem, what, _ in SERVE_RUNS:
        d, o = _serve_run(stem)
        if d is None or o is None:
            continue
        m1 = next(r for r in d["records"] if r["engine"] == "merged" and r["batch_size"] == 1 and r["n_adapters"] == 1)
        ov = {r["batch_size"]: r for r in o["rows"] if r["engine"] == "batched" and r["n_adapters"] == 3}
        cells = [f"{100 * ov[b]['overhead']:.1f}% [{100 * ov[b]['ci95'][1]:.1f}]" if b in ov else "" for b in
                 (1, 2, 4, 8, 16)]
        ok = all(r["ci95"][1] <= TARGET["overhead"] for r in ov.values())
        n = d["n_adapters_total"]
        every = [r["overhead"] for r in o["rows"] if r["engine"] == "batched" and r["n_adapters"] == n]
        arch, version = d.get("synthetic_arch") or "tinyllama", what.split()[0].rstrip(":,")
        label = f"{arch} {version}, {d['n_adapters_total']} loaded"
        out.append(f"| {label} | "
                   f"{m1['latency_ms']['p50']:.2f} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} | "
                   f"{100 * max(every):.1f}% ({n}) |")
    return out + ["", "Cells: overhead of mean latency [upper end of its bootstrap 95% CI].", ""]


def serving_profile() -> list[str]:
    d = _load("serve_profile_h200.json")
    if d is None:
        return []
    c = d["ceilings"]
    out = ["## Serving: kernels per forward and floors (H200, bf16, 64 tokens, three adapters, LoRA on q and v)", "",
           "Command: `PARTS=profile bash benchmarks/gpu/serve.sh` (= `python benchmarks/serve_profile.py --archs "
           "tinyllama smollm2`). Plain = HF's modules; fused = the serving path (serving/fuse.py). Floors: decoder "
           f"weights read once at the measured copy bandwidth ({c['copy_bytes_per_s'] / 1e12:.2f} TB/s), matmul "
           f"FLOPs at the measured bf16 matmul rate ({c['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s).", "",
           "| arch | engine | fused | batch | kernels | CUDA-graph p50 ms | us per kernel | bytes floor ms "
           "| FLOP floor ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['arch']} | {r['engine']} | {'yes' if r['fused'] else 'no'} | {r['batch_size']} | "
                   f"{r['kernels']} | {r['graph_p50_ms']:.3f} | {r['us_per_kernel']:.2f} | "
                   f"{r['floor_bytes_ms']:.3f} | {r['floor_flops_ms']:.3f} |")
    return out + [""]


def serving_run(stem: str, what: str, cmd: str) -> list[str]:
    d, o = _serve_run(stem)
    if d is None:
        return []
    arch = d.get("synthetic_arch") or "tinyllama"
    eager_n = d.get("eager_requests", d["requests"])
    out = [f"## Serving: merged vs multi-adapter ({arch} architecture, random weights, H200) — {what}", "",
           f"Command: `{cmd}` (= `lorastudy serve-bench configs/tiny.yaml --synthetic-arch {arch} --set "
           f"serve.max_adapters={d['n_adapters_total']} --set serve.warmup={d['warmup']} --set "
           f"serve.requests={d['requests']}" + (f" --set serve.eager_requests={eager_n}" if eager_n != d["requests"]
                                                else "") + " --set serve.seq_len=64`).", "",
           f"{d['adapter_source']}; {d['n_adapters_total']} adapters; {d['dtype']}; {d['warmup']} warm-up and "
           f"{d['requests']} timed batches per CUDA-graph row, {eager_n} (and as many warm-up) per row without "
           "graphs; CUDA events. Max |logit difference| vs merged on HF's modules, one mixed batch: "
           + ", ".join(f"{k} {v:.3g}" for k, v in d["parity_max_abs_logit_diff"].items()) + ".", "",
           "| engine | fused | CUDA graph | adapters mixed | batch | p50 ms | p95 ms | p99 ms | rows/s | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["records"]:
        lat = r["latency_ms"]
        out.append(f"| {r['engine']} | {'yes' if r.get('fused') else 'no'} | {'yes' if r['cuda_graph'] else 'no'} | "
                   f"{r['n_adapters']} | {r['batch_size']} | {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} "
                   f"| {r['throughput_rps']:.0f} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    if o:
        out += ["", "Overhead vs merged (bootstrap 95% CI):", "",
                "| engine | vs | adapters | batch | overhead | 95% CI |", "|---|---|---|---|---|---|"]
        for r in o["rows"]:
            out.append(f"| {r['engine']} | {r['reference']} | {r['n_adapters']} | {r['batch_size']} | "
                       f"{100 * r['overhead']:.1f}% | [{100 * r['ci95'][0]:.1f}%, {100 * r['ci95'][1]:.1f}%] |")
        out += ["", f"H2 ({o['H2']['hypothesis']}): {o['H2']['decision']} — {o['H2']['decision_rule']}."]
        if o.get("H2_vllm"):
            h = o["H2_vllm"]
            out += ["", f"H2 in vLLM ({h['engine']} vs {h['reference']}, {h['n_adapters']} adapters): "
                    f"{h['decision']}; per batch size: " + ", ".join(
                        f"b={r['batch_size']} {100 * r['overhead']:.1f}% [{100 * r['ci95'][0]:.1f}%, "
                        f"{100 * r['ci95'][1]:.1f}%] {r['decision']}" for r in h["per_batch_size"]) + "."]
        for r in o.get("vllm_vs_batched", []):
            out.append(f"\nvLLM vs our batched engine, b={r['batch_size']}: {r['vllm_ms']:.2f} vs "
                       f"{r['batched_ms']:.2f} ms (vLLM / batched - 1 = {100 * r['vllm_over_batched']:+.0f}%, 95% CI "
                       f"[{100 * r['ci95'][0]:+.0f}%, {100 * r['ci95'][1]:+.0f}%]).")
    if d.get("vllm_parity"):
        p, v = d["vllm_parity"], d.get("vllm", {})
        out += ["", f"vLLM {v.get('version', '')} ({v.get('heads_reason', '')}): parity against {p['reference']} on "
                f"{p['rows']} rows: max |probability difference| vllm {p['max_abs_prob_diff']:.2e}, merged-vllm "
                f"{p['merged_vllm_max_abs_prob_diff']:.2e}; tolerance {p['tolerance']:.2e} ({p['rule']}): "
                f"{'PASS' if p['pass'] else 'FAIL'}."]
    if d.get("mixed_traffic"):
        graphs = d["mixed_traffic"][0].get("cuda_graphs", False)
        out += ["", "Mixed traffic (random stream over the tasks; "
                + ("CUDA graphs, partial batches padded" if graphs else "eager") + "):", "",
                "| batch | requests | A: merged per task rows/s | B: base + adapters mixed rows/s | B / A | "
                "A weights MiB | B weights MiB |", "|---|---|---|---|---|---|---|"]
        vt = bool(d["mixed_traffic"]) and "A (vLLM): merged per task" in d["mixed_traffic"][0]
        if vt:  # the same streams served by vLLM (one merged engine per task vs one engine with the adapters)
            out[-2] = out[-2][:-len("A weights MiB | B weights MiB |")] + "A in vLLM rows/s | B in vLLM rows/s | " \
                "B / A in vLLM | A weights MiB | B weights MiB |"
            out[-1] = "|---" * 10 + "|"
        for m in d["mixed_traffic"]:
            a, b = m["A: merged per task"], m["B: base + adapters, mixed"]
            row = (f"| {m['batch_size']} | {m['requests']} | {a['throughput_rps']:.0f} | {b['throughput_rps']:.0f}"
                   f" | {b['throughput_rps'] / a['throughput_rps']:.2f} |")
            if vt:
                va, vb = m["A (vLLM): merged per task"], m["B (vLLM): base + adapters, mixed"]
                row += (f" {va['throughput_rps']:.0f} | {vb['throughput_rps']:.0f} | "
                        f"{vb['throughput_rps'] / va['throughput_rps']:.2f} |")
            out.append(row + f" {a['weights_bytes'] / 2**20:.0f} | {b['weights_bytes'] / 2**20:.0f} |")
    return out + [""]


def drift() -> list[str]:
    d = _load("drift_analysis_cpu.json")
    if d is None:
        return []
    out = ["## Drift analysis at full-study size (CPU)", "",
           f"Command: `{d['command']}` on {d['cores']} CPU cores: base + {d['runs_per_task']} runs per task, 3 tasks, "
           f"{d['layers']} layers, {d['n']} x {d['dim']} representations, both poolings, {d['resamples']} resamples.",
           "", "| unit | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in d["timings_s"].items()]
    out += [f"| **total** | **{d['total_s']:.1f}** (target <= 120) |", ""]
    return out


def fused_adamw() -> list[str]:
    """The fused groups with the one-pass optimizer (fused_adamw.py) beside torch.optim.AdamW, issue 15."""
    names = ["fused_adamw_full_h200.json", "fused_adamw_lora_h200.json", "fused_adamw_group_full_h200.json",
             "fused_adamw_traj_full_h200.json", "fused_adamw_full_n16_h200.json", "fused_adamw_lora_n16_64_h200.json",
             "fused_adamw_sst2_bs_h200.json", "fused_adamw_rte_h200.json"]
    files = [(n, _load(f"fused_adamw_h200/{n}")) for n in names]
    files = [(n, d) for n, d in files if d is not None]
    if not files:
        return []
    meta = files[0][1]["meta"]
    out = ["## Fused training with the one-pass optimizer (fused_adamw.py), H200", "",
           "Commands (`benchmarks/gpu/fused_adamw.sh`, PART=full, then PART=lora; the full-FT group in a third "
           "call), each writing one JSON of `benchmarks/results/fused_adamw_h200/`:", ""]
    out += [f"- `{d['meta']['command']}`" for _, d in files]
    p2 = _load("fused_adamw_h200/phase2_adamw_h200.json")
    if p2:
        out.append(f"- `{p2['meta']['command']}`")
    out += ["", f"Device {meta['device']}, torch {meta['torch']}; {meta['steps']} timed steps after "
            f"{meta['warmup']} warm-up, batch 2 x 24 random tokens per run for `stepper` rows (the fused step "
            "alone, CUDA graphs), real SST-2 batches of the 3,000-row search subset for `group` rows (the trainer's "
            "loop). `opt`: the group's optimizer pass, `torch` = torch.optim.AdamW after separate clipping, decay "
            "and refresh passes (the reference), `triton` = fused_adamw's one pass (what `train.fuse_optimizer="
            "auto` picks on CUDA). Both rows of a pair come from the same run, so their ratio is measured. "
            "`streams` = 8 lone fast-path runs on 8 CUDA streams of one process (batch 4). Optimizer ms: the "
            "optimizer graph alone. Tree: see `benchmarks/results/fused_adamw_h200/README.md`.", "",
            "| kind | method | runs N | batch | tokens | opt | ms per step | run-steps/s | x lone | x torch | "
            "optimizer ms | kernels per step | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [r for _, d in files for k in ("lone", "streams", "points", "group") for r in d["fused"].get(k, [])]
    lone = {(r["method"], r["batch_size"], r["seq_len"]): r["run_steps_per_s"] for r in rows if r["kind"] == "lone"}
    torch_rate = {(r["method"], r["n"], r["batch_size"], r["seq_len"]): r["run_steps_per_s"] for r in rows
                  if r["kind"] == "stepper" and r.get("optimizer") == "torch" and "run_steps_per_s" in r}
    seen = set()
    for r in rows:
        key = (r["kind"], r["method"], r["n"], r["batch_size"], r.get("seq_len"), r.get("optimizer"))
        if key in seen:
            continue  # a point timed again by a later file (the lone runs, N=32 at batch 2): the first is shown
        seen.add(key)
        rate, ms = r.get("run_steps_per_s"), r.get("fused_step_ms", r.get("step_ms"))
        base = lone.get((r["method"], r["batch_size"], r.get("seq_len")))
        ref = (torch_rate.get((r["method"], r["n"], r["batch_size"], r.get("seq_len")))
               if r.get("optimizer") == "triton" else None)
        peak, opt = r.get("peak_memory_bytes"), r.get("optimizer_ms")
        cells = [r["kind"], r["method"], r["n"], r["batch_size"], r.get("seq_len", "real"),
                 r.get("optimizer", "auto" if r["kind"] == "group" else "-"),
                 f"{ms:.2f}" if ms else "-", f"{rate:,.0f}" if rate else r.get("error", "-"),
                 f"{rate / base:.1f}x" if rate and base else "-", f"{rate / ref:.2f}x" if rate and ref else "-",
                 f"{opt:.2f}" if opt else "-", r.get("kernels_per_step", "-"), f"{peak / 2**30:.1f}" if peak else "-"]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    streams = {r["method"]: r["run_steps_per_s"] for r in rows if r["kind"] == "streams"}
    best = {}  # the targets' shape, N=32, in the run that also timed the 8 streams (the first such point)
    for r in rows:
        if (r["kind"] == "stepper" and r.get("optimizer") == "triton" and r.get("run_steps_per_s")
                and (r["n"], r["batch_size"], r["seq_len"]) == (32, 2, 24)):
            best.setdefault(r["method"], r)
    out += ["", "Against the issue's targets (batch 2 x 24, N=32, the streams timed in the same run):"]
    for m, target in (("lora", "LoRA >= 2,000 run-steps/s and >= 6x the 8 streams"),
                      ("full", "full FT >= 500 run-steps/s")):
        if m in best:
            b = best[m]
            vs = f", {b['run_steps_per_s'] / streams[m]:.1f}x the 8 streams' {streams[m]:,.0f}" if m in streams else ""
            out.append(f"- {target}: N={b['n']} **{b['run_steps_per_s']:,.0f}** run-steps/s{vs}.")
    for r in rows:
        if r.get("top_kernels"):
            out += ["", f"Profile, {r['method']} N={r['n']}, opt `{r['optimizer']}` (one step of the same static code "
                    f"without graph capture, CUDA kernels by total time): {r['kernels_per_step']:,} kernels, "
                    f"{r['kernel_busy_ms']:.2f} ms of kernel time against a graph step of {r['fused_step_ms']:.2f} "
                    "ms.", "", "| ms | calls | kernel |", "|---|---|---|"]
            out += [f"| {k['ms']:.2f} | {k['calls']} | `{k['name'][:70]}` |" for k in r["top_kernels"][:6]]
            kern = next((k for k in r["top_kernels"] if k["name"] == "_adamw_kernel"), None)
            if kern:  # 28 B per parameter whatever the buffer: see fused_adamw's docstring
                gb = r["n"] * r["params_per_run"] * 28 / 1e9
                out += ["", f"The one-pass kernel reads master, gradient and both moments and writes master, moments "
                        f"and (matmul weights) the bf16 copy: 28 B per parameter, {r['n']} x "
                        f"{r['params_per_run'] / 1e6:.1f} M parameters = {gb:.0f} GB in {kern['ms']:.2f} ms = "
                        f"{gb / kern['ms']:.2f} TB/s, against the H200's 4.8 TB/s ({gb / 4.8:.1f} ms at that "
                        "floor)."]
    for _, d in files:
        for t in d["fused"].get("trajectory", []):
            ref = t.get("noise_reference", {}).get("padded_vs_eager_max_rel_diff_first_k", {})
            out += ["", f"Trajectory, {t['method']} (opt `auto` = triton): one run inside a fused group of "
                    f"{t['group_size']} vs the same run alone ({t['steps']} real SST-2 steps, batch 4, lr "
                    f"{t['lr']:g}): max relative difference of the per-step loss over the first k steps, beside the "
                    "bf16 noise band (eager on bucket-padded batches vs eager): "
                    + ", ".join(f"k={k}: {v:.4f} ({ref.get(k, float('nan')):.4f})"
                                for k, v in t["max_rel_diff_first_k"].items())
                    + f". Mean loss of the last 20 steps: fused {t['mean_loss_last_20']['fused']:.3f}, alone "
                    f"{t['mean_loss_last_20']['alone']:.3f}."]
    if p2:
        out += ["", "SST-2's phase-2 groups (3 seeds, the trainer's loop on real batches, pinned host batches, "
                "`fused_kernels`), with the one-pass optimizer:", ""]
        out += [f"- {r['method']} batch {r['batch_size']}: {r['fused_step_ms']:.2f} ms per step, "
                f"{r['run_steps_per_s']:.0f} run-steps/s" for r in p2["phase2"]["points"] if "fused_step_ms" in r]
    tog = _load("fused_adamw_h200/phase2_urgent_h200.json") or _load("fused_adamw_h200/phase2_together_h200.json")
    if tog:
        pts = [r for r in tog["phase2"]["points"] if "fused_step_ms" in r]
        alone = {(r["method"], r["batch_size"]): r for r in pts if not r.get("together")}
        out += ["", f"The same two groups alone and then at once (`{tog['meta']['command']}`: two threads and CUDA "
                "streams of one process, as train-all runs a process's groups, timed over the same 20 s after both "
                "warmed up):", ""]
        for r in pts:
            if r.get("together"):
                a = alone.get((r["method"], r["batch_size"]))
                urgent = r.get("urgent")
                tag = (f" (streams: {urgent[0]}'s at high priority)" if urgent else "") if "urgent" in r else ""
                ratio = f", {a['fused_step_ms']:.2f} ms alone ({r['fused_step_ms'] / a['fused_step_ms']:.2f}x)" \
                    if a else ""
                out.append(f"- {r['method']} batch {r['batch_size']}: {r['fused_step_ms']:.2f} ms per step beside "
                           f"the other group{tag}{ratio}")
        sw = _load("fused_adamw_h200/phase2_together_switch0.0005_h200.json")
        if sw:
            t = {r["method"]: r["fused_step_ms"] for r in sw["phase2"]["points"] if r.get("together")}
            out.append("- with the interpreter's thread switch interval at 0.5 ms instead of 5 "
                       "(`sys.setswitchinterval`, `phase2_together_switch.log`): "
                       + ", ".join(f"{m} {v:.2f} ms" for m, v in t.items())
                       + " together: no better")
        out += ["", "What slows them: not the CUDA block scheduler (a high-priority stream for the LoRA group changed "
                "nothing) and not Python (`lora_group_host_profile.log`: of the LoRA group's 6.93 ms per step alone, "
                "its thread spends ~6.1 ms inside `CUDAGraph.replay`, waiting to queue the graphs' kernels, and ~0.5 "
                "ms in the trainer's own Python). Each group's step is ~3,500 small kernels at ~2-3 us each, and the "
                "GPU's front end issues the kernels of all streams: side by side the two groups went through ~7,300 "
                "kernels in 13.1 ms (1.8 us each) where the LoRA group alone takes 2.0 us per kernel. Fewer kernels "
                "per fused step (the lone path's levers reach 1,777 for LoRA) is what would shorten the chains."]
    return out + [""]


def fused() -> list[str]:
    d = _load("fused_h200.json")
    if d is None or "fused" not in d:
        return []
    f = d["fused"]
    out = ["## Fused training: N runs trained as one model (H200)", "",
           f"Command: `bash benchmarks/gpu/fused.sh` = `{d['meta']['command']}` (device {d['meta']['device']}, torch "
           f"{d['meta']['torch']}; {d['meta']['steps']} timed steps after {d['meta']['warmup']} warm-up; random "
           "tokens for `stepper` rows (the fused step alone), real SST-2 batches of the 3,000-row search subset for "
           "`group` rows (the trainer's own loop, host work included; its width is the widest bucket among the "
           "runs' batches); `lone` = one run on today's fast path, `streams` = lone runs on that many CUDA streams of "
           "one process (batch 4). Optimizer ms: the optimizer graph alone (clipping, weight decay, AdamW, zeroing, "
           "compute-copy refresh).", "",
           "| kind | method | runs N | batch | tokens | LoRA dropout | ms per step | run-steps/s | x lone | "
           "optimizer ms | kernels per step | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lone = {(r["method"], r["batch_size"], r["seq_len"]): r["run_steps_per_s"] for r in f.get("lone", [])}
    for r in f.get("lone", []) + f.get("streams", []) + f.get("points", []) + f.get("group", []):
        rate, ms = r.get("run_steps_per_s"), r.get("fused_step_ms", r.get("step_ms"))
        base = lone.get((r["method"], r["batch_size"], r.get("seq_len")))
        peak, opt = r.get("peak_memory_bytes"), r.get("optimizer_ms")
        cells = [r["kind"], r["method"], r["n"], r["batch_size"], r.get("seq_len", "real"),
                 f"{r.get('lora_dropout', 0.0):g}", f"{ms:.2f}" if ms else "-",
                 f"{rate:.0f}" if rate else r.get("error", "-").split(". GPU ")[0],
                 f"{rate / base:.1f}x" if rate and base else "-",
                 f"{opt:.2f}" if opt else "-", r.get("kernels_per_step", "-"), f"{peak / 2**30:.1f}" if peak else "-"]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    for t in f.get("trajectory", []):
        ref = t.get("noise_reference", {}).get("padded_vs_eager_max_rel_diff_first_k", {})
        out += ["", f"Trajectory, {t['method']}: one run inside a fused group of {t['group_size']} vs the same run "
                f"alone ({t['steps']} real SST-2 steps, batch 4, lr {t['lr']:g}, dropout 0, {t['step_mode']}); max "
                "relative difference of the per-step training loss over the first k steps, beside the bf16 noise "
                "band (eager on bucket-padded batches vs eager, the trajectory table above):", "",
                "| first k steps | fused vs alone | eager padded vs eager |", "|---|---|---|"]
        for k, v in t["max_rel_diff_first_k"].items():
            out.append(f"| {k} | {v:.4f} | {ref[k]:.4f} |" if k in ref else f"| {k} | {v:.4f} | - |")
        out.append(f"\nMean loss of the last 20 steps: fused {t['mean_loss_last_20']['fused']:.3f}, alone "
                   f"{t['mean_loss_last_20']['alone']:.3f}.")
    return out + [""]


def levers(name: str = "train_step_levers_h200.json",
           title: str = "Step levers: a lone run's optimizer step (SmolLM2-135M, SST-2 shapes, H200)",
           knobs: str = "") -> list[str]:
    """The step levers of issue 20 (benchmarks/gpu/levers.sh -> ``name``), when measured."""
    d = _load(name)
    if d is None or "levers" not in d:
        return []
    res = d["levers"]
    pts = res.get("points", [])
    base = {(p["method"], p["batch_size"]): p for p in pts if not p.get("levers") and "error" not in p}
    seq = pts[0].get("seq_len", "?") if pts else "?"
    resumed = " (`--resume`: the points an earlier call measured are kept, the rest measured by this one)" \
        if "--resume" in d["meta"]["command"] else ""
    out = [f"## {title}", "",
           f"Command: `{knobs}bash benchmarks/gpu/levers.sh` = `{d['meta']['command']}`{resumed} (device "
           f"{d['meta']['device']}, "
           f"torch {d['meta']['torch']}; compile mode {res.get('compile_mode')}; Liger-Kernel "
           f"{'available' if res.get('liger_available') else 'not available'}; {seq} "
           "tokens; timed CUDA-graph replays after warm-up; kernels counted by the profiler on one step of the same "
           "code run without capture).", "",
           "| method | batch | levers | ms per step | vs no lever | kernels per step | us per kernel | first step s |",
           "|---|---|---|---|---|---|---|---|"]
    for p in pts:
        label = ("eval forward: " if p.get("eval") else "") + ("+".join(p["levers"]) or "none") \
            + (f" (dropout {p['dropout']})" if p.get("dropout") else "")
        if "error" in p:
            out.append(f"| {p['method']} | {p['batch_size']} | {label} | failed: {p['error'][:100]} | | | | |")
            continue
        b = base.get((p["method"], p["batch_size"]))
        upk = f"{p['us_per_kernel']:.2f}" if p.get("us_per_kernel") else ""
        out.append(f"| {p['method']} | {p['batch_size']} | {label} | {p['ms_per_step']:.2f} | "
                   f"{p['ms_per_step'] / b['ms_per_step']:.2f}x | {p['kernels_per_step'] or ''} | {upk} | "
                   f"{p['first_step_s']:.1f} |" if b else f"| {p['method']} | {p['batch_size']} | {label} | "
                   f"{p['ms_per_step']:.2f} | | {p['kernels_per_step'] or ''} | {upk} | {p['first_step_s']:.1f} |")
    from trajectory_band import band

    for t in res.get("trajectory", []):
        if "error" in t:
            continue
        bd = band(t["losses"])  # (recomputed from the losses: JSON of earlier runs has the relative reading only)
        rel, ab, i_max = bd["relative"], bd["absolute"], bd["argmax_relative"]
        out += ["", f"Trajectory, {t['method']} (batch {t['batch_size']}, {t['steps']} real SST-2 steps, all levers "
                f"`{'+'.join(t['levers'])}`): max loss difference to eager over the first k steps, relative and "
                f"absolute; within the bf16 noise band (levers <= max(2 x padded eager, 0.01) for every k): relative "
                f"{rel['within']}, absolute {ab['within']} (the largest relative difference is at step "
                f"{i_max + 1}, where eager's loss is {t['losses']['eager'][i_max]:.3f})",
                "", "| first k steps | levers vs eager, relative | eager padded vs eager, relative | levers vs eager, "
                "absolute | eager padded vs eager, absolute |", "|---|---|---|---|---|"]
        out += [f"| {k} | {rel['candidate'][k]:.4f} | {rel['padded'][k]:.4f} | {ab['candidate'][k]:.4f} | "
                f"{ab['padded'][k]:.4f} |" for k in bd["ks"]]
    if res.get("skipped"):
        out += ["", f"Not measured within the call's time budget: {res['skipped']}"]
    return out + [""]


def phase2() -> list[str]:
    """SST-2's phase-2 groups in the trainer's own loop (benchmarks/gpu/sst2_phase2.sh -> sst2_phase2_h200/), and
    the LoRA runs' progress when the lease ended."""
    d = _load("sst2_phase2_h200/phase2_h200.json")
    if d is None or "phase2" not in d:
        return []
    pts = d["phase2"]["points"]
    ref = {(p["method"]): p["fused_step_ms"] for p in pts if p.get("variant") == "pageable" and "fused_step_ms" in p}
    steps = {"lora": 130698, "full": 65350}  # 2 epochs of 65,349 rows at batch 1 and 2
    out = ["## SST-2 phase 2 of configs/smollm2.yaml: the 3-seed fused groups in the trainer's own loop (H200)", "",
           "Command: `bash benchmarks/gpu/sst2_phase2.sh start lora` (its first step: "
           f"`{d['meta']['command']}`; device {d['meta']['device']}, torch {d['meta']['torch']}; working tree at "
           "7e8518c; one GPU, one group at a time, real SST-2 batches of the 3,000-row search subset, "
           f"{d['phase2']['points'][0].get('warmup_steps')} warm-up steps (every padded width captured before "
           f"timing), {d['phase2']['points'][0].get('steps')} timed). Pageable vs pinned: host batches copied from "
           "ordinary or page-locked memory (fast_step.h2d); fused_kernels: Liger's SwiGLU and rotary embedding in "
           "the fused step (step lever).", "",
           "| method | runs | batch | LoRA dropout | host copies | levers | ms per fused step | run-steps/s "
           "| vs pageable | the run's chain (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        if "fused_step_ms" not in p:
            out.append(f"| {p['method']} | {p['n']} | {p['batch_size']} | | {p.get('variant')} | | failed: "
                       f"{p.get('error', '')[:80]} | | | |")
            continue
        ms = p["fused_step_ms"]
        out.append(f"| {p['method']} | {p['n']} | {p['batch_size']} | {p.get('lora_dropout', 0):g} | "
                   f"{'pinned' if p['pinned'] else 'pageable'} | {'+'.join(p['levers']) or 'none'} | {ms:.2f} | "
                   f"{p['run_steps_per_s']:.0f} | {ref[p['method']] / ms:.2f}x | "
                   f"{steps[p['method']] * ms / 1e3:,.0f} |")
    st = _load("sst2_phase2_h200/study_time_phase2.json")
    if st and st.get("phase2_groups"):
        out += ["", "Every phase-2 chain of the study at the fastest measured group step (`python "
                "benchmarks/study_time.py configs/smollm2.yaml --glue ../shared/data/glue --rates "
                "benchmarks/results/train_step_workers_h200.json --phase2 "
                "benchmarks/results/sst2_phase2_h200/phase2_h200.json --best-dir "
                "benchmarks/results/sst2_phase2_h200/best --out benchmarks/results/sst2_phase2_h200/"
                "study_time_phase2.json`; evaluations not included): "
                + "; ".join(f"{r['task']} {r['method']} {r['steps']:,} steps = {r['minutes']:.1f} min"
                            for r in st["phase2_groups"] if r["minutes"]) + "."]
    ck = _load("sst2_phase2_h200/lora_checkpoints.json")
    if ck:
        out += ["", "The LoRA group in `lorastudy train-all --method lora` (fused_kernels, checkpoints every 2 min), "
                "checkpointed by SIGTERM when the lease's device time ran out (`lora_checkpoints.json`): "
                + "; ".join(f"seed {r['seed']} at step {r['step']:,} of {ck['planned_steps']:,} after "
                            f"{r['train_time_s']:.0f} s ({r['ms_per_step_incl_evals']:.2f} ms per step, evaluations "
                            f"included; validation accuracy {r['curve'][-1]['val_accuracy']:.3f} at step "
                            f"{r['curve'][-1]['step']:,})" for r in ck["runs"]) + "."]
    return out + [""]


def sst2_finish() -> list[str]:
    """The third lease of the reference study (benchmarks/results/sst2_finish_h200x2/): phase times, and the fused
    trajectory with and without the fused_kernels lever that SST-2's phase 2 ran with."""
    d = _load("sst2_finish_h200x2/fused_levers_trajectory.json")
    tsv = R / "sst2_finish_h200x2" / "phases.tsv"
    if d is None:
        return []
    out = ["## The reference study's SST-2 phase 2-4 on 2 H200s (third lease)", "",
           "Commands and what happened: `sst2_finish_h200x2/README.md` (`benchmarks/gpu/study.sh run` with "
           "`Q0=sst2 PHASES=\"train extract drift\" LEVERS=fused_kernels GPUS=0,1 WORKERS=2`). Phase passes "
           "(`phases.tsv`: shard, phase, exit code, seconds, end time):", ""]
    if tsv.is_file():
        out += ["| shard | phase | exit | seconds |", "|---|---|---|---|"]
        rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        out += [f"| {' | '.join(r[:4])} |" for r in rows if len(r) >= 4]  # (other lines: the script's notes)
    out += ["", f"Fused trajectory with vs without the lever (`{d['meta']['command']}`; device {d['meta']['device']}, "
            f"torch {d['meta']['torch']}): max relative difference of the per-step loss over the first k real "
            "SST-2 steps, beside the fused-vs-alone difference and the bf16 noise band (eager on padded batches vs "
            "eager).", "", "| method | k | lever vs none | fused vs alone | bf16 noise band |", "|---|---|---|---|---|"]
    for t in d["fused"]["trajectory"]:
        lv = t["levers"]["max_rel_diff_vs_fused_first_k"]
        band = t["noise_reference"]["padded_vs_eager_max_rel_diff_first_k"]
        for k in ("5", "10", "50", "200"):
            out.append(f"| {t['method']} | {k} | {lv[k]:.4f} | {t['max_rel_diff_first_k'][k]:.4f} | {band[k]:.4f} |")
    return out + [""]


STUDY = R.parent.parent / "studies" / "smollm2"


def _serve_part_table(dep: Path) -> list[str]:
    """Per batch size, from a finished serving part (``benchmark_results.json`` and ``overhead_analysis.json``):
    mean latency of merged / batched (every adapter) / merged-vllm / vllm, the two H2 overheads with their CIs."""
    res = json.loads((dep / "benchmark_results.json").read_text())
    ov = json.loads((dep / "overhead_analysis.json").read_text())
    by = {(r["engine"], r["batch_size"], r["n_adapters"]): r for r in res["records"]}
    h2 = {r["batch_size"]: r for r in ov["H2"]["per_batch_size"]}
    h2v = {r["batch_size"]: r for r in (ov.get("H2_vllm") or {}).get("per_batch_size", [])}
    vs = {r["batch_size"]: r for r in ov.get("vllm_vs_batched", [])}
    k = ov["H2"]["n_adapters"]

    def ms(e, b, n):
        r = by.get((e, b, n))
        return f"{r['latency_ms']['mean']:.2f}" if r else "–"

    def ci(r, key="overhead"):
        return f"{100 * r[key]:+.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]" if r else "–"

    out = [f"| batch | merged ms | batched ms (all {k}) | overhead [95% CI] | merged-vllm ms | vllm ms (all {k}) | "
           "vLLM overhead [95% CI] | vllm vs batched [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for b in sorted(h2):
        out.append(f"| {b} | {ms('merged', b, 1)} | {ms('batched', b, k)} | {ci(h2[b])} | {ms('merged-vllm', b, 1)} | "
                   f"{ms('vllm', b, k)} | {ci(h2v.get(b))} | {ci(vs.get(b), 'vllm_over_batched')} |")
    return out


def serve_study() -> list[str]:
    """The reference study's serving phase (benchmarks/results/serve_study_h200x2/): two passes on 2 H200s, each
    part finished by the second; the tables read the committed study's results (studies/smollm2/phase4/deployment)."""
    parts = [(p, STUDY / "phase4" / "deployment" / sub) for p, sub in (("adapters", ""), ("tinyllama", "tinyllama"))]
    parts = [(p, d) for p, d in parts if (d / "benchmark_results.json").is_file()]
    if not parts:
        return []
    out = ["## The reference study's serving (RQ2) on 2 H200s: two passes", "",
           "Commands, logs and what happened: `serve_study_h200x2/README.md` (`benchmarks/gpu/serve_adapters.sh`, the "
           "study's 8 trained adapters on GPU 0 and `PART=tinyllama` on GPU 1, vLLM 0.26.0 included). The first pass "
           "(`T=1480`) kept the batch sizes each part finished; the second (`RESUME=`) finished both. Mean latency per "
           "call and the H2 overheads (the report's: `studies/smollm2/ANALYSIS_REPORT.md`, RQ2). The two parts shared "
           "the host, which slowed the eager and vLLM rows, not the CUDA-graph ones (the README and the report's "
           "operator's notes give the numbers).", ""]
    for p, d in parts:
        out += [f"{p} (`{d.relative_to(R.parent.parent)}`):", ""] + _serve_part_table(d) + [""]
    return out


def main() -> None:
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/results_tables.py` from the JSON files "
             "beside this file. Each section names the command that produced it.", ""]
    lines += sst2() + train_step() + trajectories() + workers() + fused() + fused_adamw() + levers()
    lines += levers("train_step_levers_autotune_full_h200.json", "Step levers, full FT, with Inductor's "
                    "max-autotune-no-cudagraphs (H200)", "MODE=max-autotune-no-cudagraphs EXTRA='--methods full "
                    "--batch-sizes 2' ")
    lines += phase2() + sst2_finish()
    lines += serve_study() + tuning_complete()
    lines += tuning_partial() + study_time() + serving() + drift()
    (R / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {R / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
