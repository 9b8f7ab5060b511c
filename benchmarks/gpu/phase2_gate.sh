#!/usr/bin/env bash
# On the 2-GPU machine (issue 18), after staging: measure SST-2's phase-2 groups, then start the rest of the study
# only if it fits what is left of the lease.
#
#   1. benchmarks/train_step.py --parts phase2: the trainer's own loop for the SST-2 phase-2 groups of
#      configs/smollm2.yaml (3 seeds; LoRA batch 1 with dropout 0.12, full FT batch 2) on real SST-2 batches,
#      pageable vs pinned host copies, with and without the fused_kernels lever (Liger), one GPU per method.
#   2. The predicted train phase = 1.05 x the longer chain (LoRA 130,698 steps, full FT 65,349) x its measured step
#      (the faster variant; fused_kernels only where it measured faster for both methods).
#   3. If it ends, with extraction, drift and the merge (~4 min), before END_BY - 60 s: study.sh run, detached:
#      the sst2 shard from .carryr/shard-sst2.tgz (phase 1 done), phases train extract drift on both GPUs
#      (--workers 2: the LoRA group on GPU 0, the full-FT group on GPU 1), then merge with the shards unpacked
#      into $R by a later call, serving if 5 minutes are left, report, export. Otherwise nothing is started.
#
# CPU dry run (no launch): EXTRA="--smoke --phase2-steps 3 --phase2-warmup 1" DRY=1 OUT=/tmp/g END_BY=... \
#   PATH=<dir with an nvidia-smi stub>:$PATH LORASTUDY_GLUE_DIR=../shared/data/glue bash benchmarks/gpu/phase2_gate.sh
#   source .carry1/device-env.sh && END_BY=$(( $(date +%s) + BUDGET_LEFT - 90 )) bash benchmarks/gpu/phase2_gate.sh
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
mkdir -p "$OUT" /tmp/lorastudy/study
: "${END_BY:?END_BY: epoch seconds by which everything must have stopped}"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "from lorastudy import modeling as M; print(M.resolve_source('smollm2-135m'))"  # GGUF -> HF once
# one method per GPU, at once: each measures its own group as the study will run it
CUDA_VISIBLE_DEVICES=0 timeout ${T_BENCH:-170} python3 benchmarks/train_step.py --parts phase2 --methods lora \
  --glue "$LORASTUDY_GLUE_DIR" ${EXTRA:-} --out "$OUT/phase2_lora_h200.json" > "$OUT/phase2_lora.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout ${T_BENCH:-170} python3 benchmarks/train_step.py --parts phase2 --methods full \
  --glue "$LORASTUDY_GLUE_DIR" ${EXTRA:-} --out "$OUT/phase2_full_h200.json" > "$OUT/phase2_full.log" 2>&1 &
wait
grep -h "^group" "$OUT"/phase2_*.log
decision=$(python3 - "$OUT/phase2_lora_h200.json" "$OUT/phase2_full_h200.json" "$END_BY" <<'EOF'
import json, sys, time
steps = {"lora": 130698, "full": 65349}
best = {}
for path in sys.argv[1:3]:
    try:
        pts = json.load(open(path))["phase2"]["points"]
    except Exception as e:
        print(f"GO=0 WHY='no measurement in {path}: {e}'"); sys.exit()
    for p in pts:
        if "fused_step_ms" in p:
            best.setdefault(p["method"], {})[p["variant"]] = p["fused_step_ms"]
if set(best) != {"lora", "full"}:
    print(f"GO=0 WHY='measured only {sorted(best)}'"); sys.exit()
lever = all(m.get("pinned+fused_kernels", 1e9) < m.get("pinned", 1e9) for m in best.values())
variant = "pinned+fused_kernels" if lever else "pinned"
ms = {m: best[m].get(variant, min(best[m].values())) for m in best}
train_s = 1.05 * max(steps[m] * ms[m] / 1e3 for m in steps)
left = float(sys.argv[3]) - time.time()
go = int(train_s + 240 < left - 60)
print(f"GO={go} LEVERS={'fused_kernels' if lever else ''} PRED={train_s:.0f} LEFT={left:.0f} "
      f"WHY='lora {ms['lora']:.2f} ms, full {ms['full']:.2f} ms per step ({variant})'")
EOF
)
echo "$decision" | tee "$OUT/decision.txt"
eval "$decision"
if [ "${GO:-0}" = 1 ] && [ -z "${DRY:-}" ]; then
  (DEADLINE=$END_BY Q0="sst2" GPUS=0,1 WORKERS=2 PHASES="train extract drift" LEVERS="$LEVERS" \
    setsid bash benchmarks/gpu/study.sh run > /tmp/lorastudy/study.log 2>&1 < /dev/null &)
  echo "study started: DEADLINE=$END_BY LEVERS=$LEVERS"
fi
