#!/usr/bin/env bash
# On the H200: the fused groups' optimizer pass, torch.optim.AdamW (the reference) against fused_adamw's one-pass
# kernel, side by side in one run (issue 15). Outputs to $OUT. Stage as benchmarks/gpu/fused.sh says (with
# benchmarks/gpu/split_stage.sh where the tree has grown), then: source /tmp/lorastudy/env.sh && this.
#   PART=test   the GPU tests: the kernel against torch.optim.AdamW on CUDA, graph replay against the static code
#   PART=full   full FT at batch 2 x 24, N = 1, 8, 32, both optimizers, profile at N=32; 8 lone runs on streams
#   PART=lora   the same for LoRA, the trainer's own loop at N=32 on real SST-2 batches, and both trajectories
#               (a fused run, kernel on, vs the same run alone over 200 real SST-2 steps; full FT's in a second run)
# About 3 + 4 minutes for full and lora; test about 1.
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
export LORASTUDY_TEST_GLUE_DIR=${LORASTUDY_GLUE_DIR:-}
mkdir -p "$OUT"
common=(--fused-batch-sizes 2 --fused-lengths sst2 --fused-extra-bs --fused-dropout-n --worker-seconds 3
        --steps ${STEPS:-30} --warmup 5 --fused-optimizers torch triton)
case "${PART:-full}" in
  test)
    timeout ${T_TEST:-240} python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_adamw.py tests/test_fused.py \
      -k "cuda or kernel or resolve" 2>&1 | tail -15 | tee "$OUT/fused_adamw_pytest.log" ;;
  full)
    timeout ${T_BENCH:-420} python3 benchmarks/train_step.py --parts fused --methods full --fused-n ${NS:-1 8 32} \
      "${common[@]}" --fused-group-n --fused-streams ${STREAMS:-8} --fused-trajectory-steps 0 \
      --out "$OUT/fused_adamw_full_h200.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/fused_adamw_full.log" ;;
  lora)
    timeout ${T_BENCH:-300} python3 benchmarks/train_step.py --parts fused --methods lora --fused-n ${NS:-1 8 32} \
      "${common[@]}" --fused-group-n ${GROUP_N:-32} --fused-streams ${STREAMS:-8} \
      --fused-trajectory-steps ${TRAJ:-200} --out "$OUT/fused_adamw_lora_h200.json" 2>&1 \
      | grep -v "Loading weights" | tee "$OUT/fused_adamw_lora.log"
    # full FT's trajectory (its points are PART=full's): the fused run with the kernel vs the same run alone
    timeout ${T_TRAJ:-200} python3 benchmarks/train_step.py --parts fused --methods full --fused-n \
      --fused-batch-sizes 2 --fused-lengths sst2 --fused-extra-bs --fused-dropout-n --fused-group-n \
      --fused-streams 0 --fused-trajectory-steps ${TRAJ:-200} --steps 5 --warmup 2 \
      --out "$OUT/fused_adamw_traj_full_h200.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/fused_adamw_traj_full.log" ;;
esac
