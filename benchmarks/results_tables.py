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
    out = ["## Training step: lorastudy vs a plain HF/PEFT eager loop (H200)", "",
           f"Command: `{d['meta']['command']}` (device {d['meta']['device']}, torch {d['meta']['torch']}; "
           f"{d['meta']['steps']} timed steps after {d['meta']['warmup']} warm-up, random token batches).", "",
           "| model | method | length | batch | HF eager ms | lorastudy ms | speed-up | lorastudy tokens/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['model']} | {r['method']} | {r['length_profile']} ({r['seq_len']}) | {r['batch_size']} | "
                   f"{r['hf_eager_ms']:.1f} | {r['lorastudy_ms']:.1f} | {r['speedup']:.2f} | "
                   f"{r['lorastudy_tokens_per_s']:.0f} |")
    return out + [""]


SERVE_RUNS = [
    ("", "current engine: one gather per shape group per forward, scaling folded into B, baddbmm",
     "REQUESTS=100 WARMUP=10 bash benchmarks/gpu/serve.sh"),
    ("_v1", "first engine: gather A, B and scale in every LoRA layer, then bmm, bmm, add (commit 'GPU-ready paths')",
     "bash benchmarks/gpu/bench.sh"),
]


def serving() -> list[str]:
    out = []
    for suffix, what, cmd in SERVE_RUNS:
        out += serving_run(suffix, what, cmd)
    return out


def serving_run(suffix: str, what: str, cmd: str) -> list[str]:
    d, o = _load(f"serve_tinyllama_h200{suffix}.json"), _load(f"serve_tinyllama_overhead_h200{suffix}.json")
    if d is None:
        return []
    out = [f"## Serving: merged vs multi-adapter (TinyLlama-1.1B architecture, random weights, H200) — {what}", "",
           f"Command: `{cmd}` (= `lorastudy serve-bench configs/tiny.yaml --synthetic-arch tinyllama --set "
           f"serve.max_adapters=3 --set serve.warmup={d['warmup']} --set serve.requests={d['requests']} --set "
           "serve.seq_len=64`).", "",
           f"{d['adapter_source']}; {d['n_adapters_total']} adapters; {d['dtype']}; {d['warmup']} warm-up and "
           f"{d['requests']} timed batches per condition; CUDA events. Max |logit difference| vs merged on a mixed "
           f"batch: " + ", ".join(f"{k} {v:.3g}" for k, v in d["parity_max_abs_logit_diff"].items()) + ".", "",
           "| engine | CUDA graph | adapters mixed | batch | p50 ms | p95 ms | p99 ms | rows/s | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in d["records"]:
        lat = r["latency_ms"]
        out.append(f"| {r['engine']} | {'yes' if r['cuda_graph'] else 'no'} | {r['n_adapters']} | {r['batch_size']} | "
                   f"{lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {r['throughput_rps']:.0f} | "
                   f"{r['peak_memory_bytes'] / 2**20:.0f} |")
    if o:
        out += ["", "Overhead vs merged (bootstrap 95% CI):", "",
                "| engine | vs | adapters | batch | overhead | 95% CI |", "|---|---|---|---|---|---|"]
        for r in o["rows"]:
            out.append(f"| {r['engine']} | {r['reference']} | {r['n_adapters']} | {r['batch_size']} | "
                       f"{100 * r['overhead']:.1f}% | [{100 * r['ci95'][0]:.1f}%, {100 * r['ci95'][1]:.1f}%] |")
        out += ["", f"H2 ({o['H2']['hypothesis']}): {o['H2']['decision']} — {o['H2']['decision_rule']}."]
    if d.get("mixed_traffic"):
        out += ["", "Mixed traffic (random stream over the tasks):", "",
                "| batch | requests | A: merged per task rows/s | B: base + adapters mixed rows/s |",
                "|---|---|---|---|"]
        for m in d["mixed_traffic"]:
            out.append(f"| {m['batch_size']} | {m['requests']} | {m['A: merged per task']['throughput_rps']:.0f} | "
                       f"{m['B: base + adapters, mixed']['throughput_rps']:.0f} |")
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


def main() -> None:
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/results_tables.py` from the JSON files "
             "beside this file. Each section names the command that produced it.", ""]
    lines += sst2() + train_step() + serving() + drift()
    (R / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {R / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
