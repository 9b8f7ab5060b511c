#!/usr/bin/env bash
# On the H200 (after `source /tmp/lorastudy/env.sh`): the read-token rule (#14.3) on the CUDA-graph path with
# pad = eos inputs that end in eos; prints one JSON object (see benchmarks/read_token_gpu.py). Outputs to $OUT.
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
mkdir -p "$OUT"
timeout ${T:-300} python3 benchmarks/read_token_gpu.py 2>&1 | grep -v "Loading weights" | tee "$OUT/read_token_h200.log"
