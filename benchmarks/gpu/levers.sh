#!/usr/bin/env bash
# On the H200 (after the two device-stage calls; later calls: source /tmp/lorastudy/env.sh): the step levers of
# issue 20, each alone and cumulatively, SmolLM2-135M at the SST-2 protocol shapes (full FT batch 2, LoRA batch 1,
# 24 tokens), then 200 real SST-2 steps with all levers against eager. Prints the table last; JSON, log and the
# Inductor cache (as a tarball, to carry into a later call) go to $OUT.
#
# Optional carried paths (run's `carry`):
#   .whl/liger_kernel-0.8.5-py3-none-any.whl   lever fused_kernels (made here with: python3 -m pip download
#       --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5; it needs only torch and
#       triton, which the H200 image has). Without it the fused_kernels points are left out.
#   .inductor_cache.tgz   a cache written by an earlier call ($OUT/inductor_cache.tgz): compile time drops to
#       graph tracing.
#   .levers_prev.json     an earlier call's JSON ($OUT/train_step_levers_h200.json): its points are kept.
# Knobs: T (python's time limit, s, default 240), BUDGET (no new point after this many s, default 200),
# MODE (Inductor mode: default | max-autotune-no-cudagraphs), STEPS (timed steps per point, default 100), EXTRA
# (more arguments; a CPU dry run of this script: EXTRA="--smoke --compile-backend aot_eager --methods lora").
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
mkdir -p "$OUT"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/lorastudy/liger .whl/liger_kernel-*.whl \
    && export PYTHONPATH=/tmp/lorastudy/liger:${PYTHONPATH:-}
fi
CACHE=/tmp/lorastudy/inductor
mkdir -p "$CACHE"
[ -f .inductor_cache.tgz ] && tar -xzf .inductor_cache.tgz -C "$CACHE"
export TRITON_CACHE_DIR=$CACHE/triton
RESUME=""
[ -f .levers_prev.json ] && RESUME="--resume .levers_prev.json"
python3 -c "from lorastudy import modeling as M; M.resolve_source('smollm2-135m')" 2>&1 | tail -1  # GGUF -> dir once
timeout -k 10 ${T:-240} python3 benchmarks/train_step.py --parts levers --budget-s ${BUDGET:-200} \
  --lever-steps ${STEPS:-100} --compile-mode ${MODE:-default} --compile-cache "$CACHE" $RESUME \
  --glue "$LORASTUDY_GLUE_DIR" --out "$OUT/train_step_levers_h200.json" ${EXTRA:-} 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/levers.log"
tar -czf "$OUT/inductor_cache.tgz" -C "$CACHE" . 2>/dev/null
[ "$(stat -c %s "$OUT/inductor_cache.tgz")" -gt 16000000 ] && rm -f "$OUT/inductor_cache.tgz"  # over the 16 MiB limit
[ -f "$OUT/train_step_levers_h200.json" ] && python3 benchmarks/train_step.py --table "$OUT/train_step_levers_h200.json"
