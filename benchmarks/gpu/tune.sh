#!/usr/bin/env bash
# On the H200 (after .carry1/device-env.sh): phase 1 of configs/smollm2.yaml, resumable across calls and machines.
# Restores the Optuna database carried in .carryr/optuna.db (if any), tunes for at most T seconds (SIGTERM then marks
# the running trials failed, to be replaced next time), and returns the database, the trial table, the log and
# the GPU samples in $OUT; carry the returned optuna.db back as .carryr/optuna.db for the next call.
# WORKERS processes (default: one per visible GPU, each on its own GPU) x STREAMS runs each.
#   T=480 STREAMS=8 bash benchmarks/gpu/tune.sh
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
R=/tmp/lorastudy/results
mkdir -p "$OUT" "$R/phase1"
if [ -f .carryr/optuna.db ] && [ ! -f "$R/phase1/optuna.db" ]; then cp .carryr/optuna.db "$R/phase1/optuna.db"; fi
W=${WORKERS:-$(nvidia-smi -L | wc -l)}
(while true; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader >> "$OUT/gpu_mem.txt"; sleep 15; done) &
mon=$!
start=$(date +%s)
timeout -s TERM -k 30 "${T:-480}" python3 -m lorastudy.cli tune configs/smollm2.yaml --data-dir "$LORASTUDY_GLUE_DIR" \
  --set "output_dir=$R" --streams "${STREAMS:-8}" --workers "$W" > "$OUT/tune.log" 2>&1
echo "rc=$? wall_s=$(( $(date +%s) - start )) workers=$W streams=${STREAMS:-8} gpus=$(nvidia-smi -L | wc -l)" | tee -a "$OUT/wall.txt"
kill $mon
cp "$R/phase1/optuna.db" "$OUT/optuna.db"
python3 benchmarks/tune_status.py configs/smollm2.yaml --set "data.source=$LORASTUDY_GLUE_DIR" --set "output_dir=$R" \
  --out "$OUT/trials.json" | tee "$OUT/status.txt"
[ -f "$R/phase1/summary.csv" ] && cp "$R/phase1/summary.csv" "$OUT/summary.csv"
tail -5 "$OUT/tune.log"
