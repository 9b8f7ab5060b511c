#!/usr/bin/env bash
# On the H200: mid-run checkpoints resume on the CUDA-graph paths (checkpoint.py, issue 18 item 2). About 1 minute.
# Stage first (CPU machine, project root): ../shared/tools/device-stage pytest   (pytest is not in the GPU image)
# then, as usual, send .carry0 (bash .carry0/device-env.sh) and .carry1 (source .carry1/device-env.sh && this).
# The tiny random Llama on real GLUE RTE rows, bf16 autocast: a fused group of 2 runs (LoRA with dropout 0.1, and
# full FT) and a lone LoRA run, each paused twice at a step boundary and resumed, against the same run
# uninterrupted. Asserts the same evaluation steps and validation losses within 2e-2 relative (bf16); prints per
# run whether the resumed run is bit-identical, the largest validation-loss difference and test-prediction
# agreement.
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
export LORASTUDY_TEST_GLUE_DIR=${LORASTUDY_GLUE_DIR:-}
mkdir -p "$OUT"
if python3 -c "import pytest" 2>/dev/null; then
  timeout ${T_TEST:-240} python3 -m pytest -q -s -x -p no:cacheprovider tests/test_checkpoint.py -k cuda 2>&1 \
    | grep -v "Warning\|warnings.warn\|^  " | tail -25 | tee "$OUT/checkpoint_pytest.log"
else
  echo "pytest is not installed here: stage it with ../shared/tools/device-stage pytest" | tee "$OUT/checkpoint_pytest.log"
fi
