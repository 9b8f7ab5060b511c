#!/usr/bin/env bash
# On the H200, wheels only (no model or data needed): serving on random-weight architectures.
#   carry .carryw (pydantic, typer, rich wheels from ../shared/tools/device-stage), then:
#   PARTS="profile bench" ARCHS="tinyllama smollm2" bash benchmarks/gpu/serve.sh
# profile: kernels per forward, graph replay time and floors, plain vs fused (benchmarks/serve_profile.py);
# bench:   lorastudy serve-bench per architecture (REQUESTS timed per graph row, EAGER_REQUESTS per eager row);
#          the in-process engines only (vLLM rows: benchmarks/gpu/vllm.sh).
set -u
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carryw/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
for part in ${PARTS:-profile bench}; do
  case "$part" in
    profile)
      timeout ${T_PROFILE:-240} python3 benchmarks/serve_profile.py --archs ${ARCHS:-tinyllama smollm2} \
        --out "$OUT/serve_profile_h200.json" 2>&1 | tee "$OUT/serve_profile.log" | tail -12 ;;
    bench)
      for arch in ${ARCHS:-tinyllama smollm2}; do
        timeout ${T_BENCH:-400} python3 -m lorastudy.cli serve-bench configs/tiny.yaml --synthetic-arch $arch --force \
          --set output_dir=/tmp/serve_$arch --set serve.max_adapters=${N_ADAPTERS:-3} \
          --set serve.warmup=${WARMUP:-100} --set serve.requests=${REQUESTS:-1000} \
          --set serve.eager_requests=${EAGER_REQUESTS:-100} --set "serve.batch_sizes=[1,2,4,8,16]" \
          --set serve.seq_len=64 --set "tasks=[sst2,mrpc,rte]" --set "serve.engines=[merged,peft,batched]" 2>&1 | tee "$OUT/serve_$arch.log" | tail -3
        cp /tmp/serve_$arch/phase4/deployment/benchmark_results.json "$OUT/serve_${arch}_h200.json"
        cp /tmp/serve_$arch/phase4/deployment/overhead_analysis.json "$OUT/serve_${arch}_overhead_h200.json"
        mkdir -p "$OUT/$arch" && cp /tmp/serve_$arch/phase4/deployment/*.png "$OUT/$arch/"
      done ;;
  esac
done
