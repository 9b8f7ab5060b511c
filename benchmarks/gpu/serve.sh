#!/usr/bin/env bash
# On the H200, wheels only (no model or data needed): serving benchmark on random-weight architectures.
#   carry .carryw (pydantic, typer, rich wheels from ../shared/tools/device-stage), then:
#   bash benchmarks/gpu/serve.sh
set -u
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carryw/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for arch in ${ARCHS:-tinyllama smollm2}; do
  python3 -m lorastudy.cli serve-bench configs/tiny.yaml --synthetic-arch $arch --force \
    --set output_dir=/tmp/serve_$arch --set serve.max_adapters=${N_ADAPTERS:-3} \
    --set serve.warmup=${WARMUP:-20} --set serve.requests=${REQUESTS:-200} --set "serve.batch_sizes=[1,2,4,8,16]" \
    --set serve.seq_len=64 --set "tasks=[sst2,mrpc,rte]" 2>&1 | tee "$OUT/serve_$arch.log" | tail -5
  cp /tmp/serve_$arch/phase4/deployment/benchmark_results.json "$OUT/serve_${arch}_h200.json"
  cp /tmp/serve_$arch/phase4/deployment/overhead_analysis.json "$OUT/serve_${arch}_overhead_h200.json"
done
