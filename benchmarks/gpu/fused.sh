#!/usr/bin/env bash
# On the H200: fused multi-run training (fused.py, issue 15). About 4 minutes. Outputs to $OUT.
# Stage first (CPU machine, project root): ../shared/tools/device-stage pytest   (pytest is not in the GPU image)
# then, as usual, send .carry0 (bash .carry0/device-env.sh) and .carry1 (source .carry1/device-env.sh && this).
#   1. GPU pytest selection: the CUDA-graph fused step against the same static code (tests/test_fused.py -k cuda)
#   2. benchmarks/train_step.py --parts fused (JSON written after every point, so a cut run keeps what it measured):
#      LoRA and full FT at batch 2 x 24 tokens, N = 1, 8, 32 runs per fused group (the fused step alone), beside one
#      lone fast-path run of that shape and 8 lone runs on 8 streams; at N=32 also batch 1 and 4 (rows padded to a
#      common batch size cost what); LoRA N=32 with dropout 0.1; the trainer's own loop at N=32 on real SST-2
#      batches; peak memory; a fused run vs the same run alone over 200 real SST-2 steps (groups of 8)
#   3. the table, printed last
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
export LORASTUDY_TEST_GLUE_DIR=${LORASTUDY_GLUE_DIR:-}
mkdir -p "$OUT"
if python3 -c "import pytest" 2>/dev/null; then
  timeout ${T_TEST:-90} python3 -m pytest -q -x -p no:cacheprovider tests/test_fused.py -k cuda 2>&1 \
    | tail -15 | tee "$OUT/fused_pytest.log"
else
  echo "pytest is not installed here: stage it with ../shared/tools/device-stage pytest" | tee "$OUT/fused_pytest.log"
fi
timeout ${T_BENCH:-220} python3 benchmarks/train_step.py --parts fused --methods lora full --fused-n ${NS:-1 8 32} \
  --fused-batch-sizes ${BS:-2} --fused-extra-bs ${EXTRA_BS:-1 4} --fused-lengths sst2 --fused-dropout-n 32 \
  --fused-group-n ${GROUP_N:-32} --fused-streams ${STREAMS:-8} --worker-seconds 3 \
  --fused-trajectory-steps ${TRAJ:-200} --steps ${STEPS:-30} --warmup 5 --out "$OUT/fused_h200.json" 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/fused.log"
python3 benchmarks/train_step.py --table "$OUT/fused_h200.json"
