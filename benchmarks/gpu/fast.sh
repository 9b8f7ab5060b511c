#!/usr/bin/env bash
# On the H200 (after .carry1/device-env.sh): the fast training step (#8). PART=steps|trajectory|workers (several
# allowed, space-separated). Outputs to $OUT.
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
mkdir -p "$OUT"
for part in ${PART:-steps}; do
  case "$part" in
    trajectory)  # graph replay vs eager on real SST-2 batches
      timeout ${T_TRAJ:-240} python3 benchmarks/train_step.py --parts trajectory --trajectory-steps ${TRAJ:-200} \
        --methods ${TRAJ_METHODS:-full lora} --out "$OUT/train_step_trajectory_h200.json" 2>&1 \
        | grep -v "Loading weights" | tee "$OUT/trajectory.log" ;;
    steps)
      timeout ${T_STEPS:-300} python3 benchmarks/train_step.py --parts steps --steps ${STEPS:-20} \
        --out "$OUT/train_step_h200.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/steps.log" ;;
    workers)
      timeout ${T_WORKERS:-400} python3 benchmarks/train_step.py --parts workers --worker-seconds ${SECS:-8} \
        --out "$OUT/train_step_workers_h200.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/workers.log" ;;
  esac
done
