#!/usr/bin/env bash
# On the H200 (after .carry1/device-env.sh): training-step benchmark and serving benchmark. Outputs to $OUT.
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
mkdir -p "$OUT"
python3 benchmarks/train_step.py --steps ${TS_STEPS:-10} --warmup 3 --out "$OUT/train_step_h200.json" 2>&1 | tee "$OUT/train_step.log"
python3 -m lorastudy.cli serve-bench configs/tiny.yaml --synthetic-arch tinyllama --force \
  --set output_dir=/tmp/lorastudy/serve_tinyllama --set serve.max_adapters=${N_ADAPTERS:-3} \
  --set serve.warmup=${WARMUP:-10} --set serve.requests=${REQUESTS:-100} --set "serve.batch_sizes=[1,2,4,8,16]" \
  --set serve.seq_len=64 --set "tasks=[sst2,mrpc,rte]" 2>&1 | tee "$OUT/serve_tinyllama.log"
cp /tmp/lorastudy/serve_tinyllama/phase4/deployment/benchmark_results.json "$OUT/serve_tinyllama_h200.json"
cp /tmp/lorastudy/serve_tinyllama/phase4/deployment/overhead_analysis.json "$OUT/serve_tinyllama_overhead_h200.json"
