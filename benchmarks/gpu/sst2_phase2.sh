#!/usr/bin/env bash
# On one H200 (issue 18): SST-2's phase 2 one method per lease. A full-FT checkpoint (~2 GB) cannot leave the
# machine, LoRA adapters and checkpoints can (a few MB): so one lease trains the LoRA runs and brings them back in
# the shard's pack; a later lease trains the full-FT runs beside them, extracts, computes drift and merges
# (benchmarks/gpu/study.sh with PHASES="train extract drift"). On one GPU both 3-seed groups at once share its
# front end (measured in the MRPC shard: 19-23 ms LoRA and 33-37 ms full-FT steps, against ~10 and ~19 alone).
#
#   start METHOD   (after staging; the shard's pack in .carryr/shard-sst2.tgz)
#     1. benchmarks/train_step.py --parts phase2: the trainer's own loop for SST-2's phase-2 groups (3 seeds; LoRA
#        batch 1, dropout 0.12; full FT batch 2) on real batches, pageable vs pinned host copies, with and without
#        the fused_kernels lever (Liger): $OUT/phase2_h200.json
#     2. `lorastudy train-all --method METHOD` on the shard, detached, with fused_kernels if it measured faster
#        for METHOD, checkpoints every 3 minutes
#   status         progress (the run's log) and GPU use
#   pack           the shard's small artifacts (LoRA adapters and checkpoints; no full-FT weights) to $OUT
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
R=/tmp/lorastudy/study
D=$R/shard-sst2
mkdir -p "$R"
case "${1:-status}" in
  start)
    method=${2:?METHOD: lora or full}
    mkdir -p "$OUT" "$D"
    # the shard's phase 1 must be there: without it train-all would train with the config's settings
    [ -f "$D/manifest.json" ] || tar xzf .carryr/shard-sst2.tgz -C "$D" || { rm -rf "$D"; exit 2; }
    ls "$D"/phase1/sst2_"$method"/best.yaml > /dev/null || { echo "no phase-1 best.yaml in $D: carry .carryr"; exit 2; }
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$R/gpu.txt"
    python3 -c "from lorastudy import modeling as M; print(M.resolve_source('smollm2-135m'))"  # GGUF -> HF once
    timeout "${T_BENCH:-200}" python3 benchmarks/train_step.py --parts phase2 --methods lora full \
      --phase2-steps "${STEPS:-300}" --phase2-warmup "${WARM:-100}" --glue "$LORASTUDY_GLUE_DIR" \
      --out "$R/phase2_h200.json" 2>&1 | grep -v "warn" | tee "$R/phase2.log"
    cp "$R/phase2_h200.json" "$R/phase2.log" "$OUT/" 2>/dev/null
    levers=$(python3 - "$R/phase2_h200.json" "$method" <<'PY'
import json, sys
pts = json.load(open(sys.argv[1]))["phase2"]["points"]
ms = {p["variant"]: p["fused_step_ms"] for p in pts if p["method"] == sys.argv[2] and "fused_step_ms" in p}
print("fused_kernels" if ms.get("pinned+fused_kernels", 1e9) < ms.get("pinned", 1e9) else "")
PY
)
    echo "train-all --method $method with step levers [$levers]" | tee "$R/decision.txt"
    (CUDA_VISIBLE_DEVICES=0 setsid python3 -m lorastudy.cli train-all configs/smollm2.yaml \
      --data-dir "$LORASTUDY_GLUE_DIR" --method "$method" --set "tasks=[sst2]" --set "output_dir=$D" \
      --set "train.fuse_max_runs=8" --set "train.step_levers=[$levers]" --set "train.checkpoint_every_min=3" \
      > "$R/train_$method.log" 2>&1 < /dev/null &)
    (while true; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader \
      | sed "s/^/$(date +%T), /" >> "$R/gpu_util.txt"; sleep 20; done > /dev/null 2>&1 < /dev/null &)
    sleep 45; tail -c 1500 "$R/train_$method.log"
    ;;
  status)
    date +%T; tail -2 "$R/gpu_util.txt" 2>/dev/null
    tail -c 1200 "$R"/train_*.log 2>/dev/null | tr '\r' '\n' | grep -v "^\s*$" | tail -8
    ls "$D"/phase2/sst2/*/ 2>/dev/null
    ;;
  pack)
    mkdir -p "$OUT"
    tar czf "$OUT/shard-sst2.tgz" -C "$D" --exclude='*/representations.safetensors' \
      --exclude='./phase2/*/full/*.ckpt' --exclude='./phase2/*/full/*/model/model.safetensors' .
    tar czf "$OUT/sst2_phase2_logs.tgz" -C "$R" --exclude='shard-*' --exclude='*.tgz' .
    ls -la "$OUT"
    ;;
esac
