#!/usr/bin/env bash
# On the H200 (after .carry1/device-env.sh): SmolLM2-135M on the full SST-2 training split, full FT and LoRA run
# side by side on one GPU. Logs and metrics go to $OUT.  Usage: bash benchmarks/gpu/sst2_full.sh
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
R=/tmp/lorastudy/results
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "from lorastudy import modeling as M; print(M.resolve_source('smollm2-135m'))"  # convert the GGUF once
COMMON="--data-dir $LORASTUDY_GLUE_DIR --seed 42 --set output_dir=$R --set train.evals_per_epoch=4 --set hp.batch_size=32 --set hp.epochs=1 --set hp.warmup_ratio=0.06 --set hp.max_steps=${MAX_STEPS:-1500}"
start=$(date +%s)
python3 -m lorastudy.cli train configs/smollm2.yaml --task sst2 --method full $COMMON --set hp.lr=2e-5 > "$OUT/train_full.log" 2>&1 &
python3 -m lorastudy.cli train configs/smollm2.yaml --task sst2 --method lora $COMMON --set hp.lr=8e-4 > "$OUT/train_lora.log" 2>&1 &
while [ -n "$(jobs -r)" ]; do sleep 30; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$OUT/gpu_util.txt"; done
wait
echo "wall_s=$(( $(date +%s) - start ))" | tee "$OUT/wall.txt"
for m in full lora; do
  f=$R/phase2/sst2/$m/seed42/metrics.json
  [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open('$f')); [d.pop(k) for k in ('test_predictions','test_labels','test_idx')]; json.dump(d, open('$OUT/sst2_${m}_metrics.json','w'), indent=1); print('$m', d['test'], d['train_time_s'], d['steps'])"
  tail -3 "$OUT/train_$m.log"
done
