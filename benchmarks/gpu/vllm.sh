#!/usr/bin/env bash
# On the H200: serve-bench with vLLM rows (issue 16) for random-weight TinyLlama and SmolLM2 architectures.
# Run after staging vLLM 0.26.0 (../shared/tools/vllm-stage) and the lorastudy wheels, in one call:
#   source /tmp/lorastudy/env.sh && source /tmp/vllm/env.sh && bash benchmarks/gpu/vllm.sh
# (vLLM's env last: its PYTHONPATH entry then comes first, so vLLM gets the dependency versions staged for it).
# Per architecture one serve-bench run: merged, peft, batched in-process and two vLLM engines, each in its own
# worker process (merged in vLLM; base + 3 adapters in vLLM), started together while the in-process engines are
# built; every condition timed with the same host clock, repeats interleaved in time. It writes under $OUT:
#   serve_<arch>_vllm_h200.json, serve_<arch>_vllm_overhead_h200.json, <arch>_vllm/*.png, <arch>.log, vllm_table.txt
# and prints, per architecture, the vLLM status and head mode, parity against PEFT (PASS/FAIL with its tolerance),
# the latency table, H2 (batched vs merged), H2 in vLLM (vllm vs merged-vllm) and vLLM vs batched.
# Budget: TinyLlama first; each run is capped at T_ARCH seconds (default 255) so both fit in one 9-minute call.
# Knobs: ARCHS, REQUESTS (100), EAGER_REQUESTS (10), WARMUP (10), REPEATS (10), BATCHES ([1,4,16]),
# VLLM_GRAPHS (true: CUDA graphs for the timed shapes; false: eager vLLM engines, faster start).
set -u
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
python3 -c "import importlib.metadata as m; print('vllm', m.version('vllm'))" 2>&1 | tee "$OUT/vllm_version.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for arch in ${ARCHS:-tinyllama smollm2}; do
  t0=$(date +%s)
  timeout -k 10 ${T_ARCH:-255} python3 -m lorastudy.cli serve-bench configs/tiny.yaml --synthetic-arch "$arch" --force \
    --set output_dir=/tmp/vllm_$arch --set serve.max_adapters=3 --set "tasks=[sst2,mrpc,rte]" \
    --set "serve.engines=[merged,peft,batched,vllm]" --set serve.seq_len=64 --set "serve.batch_sizes=${BATCHES:-[1,4,16]}" \
    --set serve.warmup=${WARMUP:-10} --set serve.requests=${REQUESTS:-100} \
    --set serve.eager_requests=${EAGER_REQUESTS:-10} --set serve.repeats=${REPEATS:-10} \
    --set serve.vllm_cuda_graphs=${VLLM_GRAPHS:-true} > "$OUT/$arch.log" 2>&1
  echo "$arch: serve-bench exit $? after $(( $(date +%s) - t0 )) s"
  d=/tmp/vllm_$arch/phase4/deployment
  [ -f $d/benchmark_results.json ] || { tail -30 "$OUT/$arch.log"; continue; }
  cp $d/benchmark_results.json "$OUT/serve_${arch}_vllm_h200.json"
  cp $d/overhead_analysis.json "$OUT/serve_${arch}_vllm_overhead_h200.json"
  mkdir -p "$OUT/${arch}_vllm" && cp $d/*.png "$OUT/${arch}_vllm/" 2>/dev/null
done
python3 - "$OUT" <<'PY' | tee "$OUT/vllm_table.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for arch in ("tinyllama", "smollm2"):
    p = out / f"serve_{arch}_vllm_h200.json"
    if not p.is_file():
        print(f"## {arch}: no results")
        continue
    d = json.loads(p.read_text())
    o = json.loads((out / f"serve_{arch}_vllm_overhead_h200.json").read_text())
    v, par = d.get("vllm") or {}, d.get("vllm_parity")
    print(f"## {arch} ({d['gpu']}, {d['dtype']}, seq {d['records'][0]['seq_len']}, {d['n_adapters_total']} adapters, "
          f"{d['requests']} timed calls per graph row / {d['eager_requests']} eager, {d['repeats']} repeats)")
    print(f"vLLM: {v.get('status')} {v.get('version', '')}: {v.get('heads_reason') or v.get('reason') or v.get('error')}")
    if par:
        print(f"parity vs {par['reference']}: max |dp| vllm {par['max_abs_prob_diff']:.2e}, merged-vllm "
              f"{par['merged_vllm_max_abs_prob_diff']:.2e}; tolerance {par['tolerance']:.2e} ({par['rule']}): "
              f"{'PASS' if par['pass'] else 'FAIL'}")
    print("max |dlogit| vs merged on HF modules: " + ", ".join(
        f"{k} {x:.3g}" for k, x in d["parity_max_abs_logit_diff"].items() if x is not None))
    print(f"{'engine':14} {'graph':5} {'k':>2} {'mixing':15} {'b':>3} {'mean ms':>8} {'p50':>8} {'p99':>8} "
          f"{'rows/s':>7} {'peak MiB':>9}")
    for r in d["records"]:
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        print(f"{r['engine']:14} {str(r['cuda_graph'])[0]:5} {r['n_adapters']:>2} {r['mixing']:15} {r['batch_size']:>3} "
              f"{r['latency_ms']['mean']:8.2f} {r['latency_ms']['p50']:8.2f} {r['latency_ms']['p99']:8.2f} "
              f"{r['throughput_rps']:7.0f} {mem:>9}")
    for key in ("H2", "H2_vllm"):
        h = o.get(key)
        if not h or not h.get("engine"):
            continue
        print(f"{key}: {h['engine']} ({h['n_adapters']} adapters) vs {h['reference']}: {h['decision']}")
        for r in h["per_batch_size"]:
            lo, hi = r["ci95"]
            ci = f"[{100 * lo:.1f}%, {100 * hi:.1f}%]" if lo is not None else "[n/a]"
            print(f"  b={r['batch_size']:<3} {r['mixing'] or '':15} overhead {100 * r['overhead']:6.1f}% {ci} "
                  f"-> {r['decision']}{'  ' + r['flag'] if r['flag'] else ''}")
    for r in o.get("vllm_vs_batched", []):
        lo, hi = r["ci95"]
        print(f"vllm vs batched, b={r['batch_size']}: {r['vllm_ms']:.2f} vs {r['batched_ms']:.2f} ms "
              f"({100 * r['vllm_over_batched']:+.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%])")
    for m in d.get("mixed_traffic", []):
        print(f"traffic b={m['batch_size']}: " + ", ".join(
            f"{k} {x['throughput_rps']:.0f} rows/s" for k, x in m.items() if isinstance(x, dict)))
PY
