#!/usr/bin/env bash
# On the GPU machine (issue 18): configs/smollm2.yaml's protocol as task shards (README, "A study across machines"),
# one queue of shards per GPU, every phase with the time budget left before DEADLINE, resumable across leases.
#
# Start it detached after staging (the device's commands stop at 10 minutes; the machine keeps /tmp while warm):
#   source .carry1/device-env.sh && DEADLINE=$(( $(date +%s) + 1260 )) Q0="mrpc" Q1="rte sst2" \
#     setsid bash benchmarks/gpu/study.sh run > /tmp/lorastudy/study.log 2>&1 < /dev/null &
# Poll with later calls:      sleep 280; source /tmp/lorastudy/env.sh && bash benchmarks/gpu/study.sh status
#   (one after the other, with no pause between them: a machine idle for 30 s is given back, /tmp and the detached
#   study with it; and carry in the same call whatever that call reads: carried paths do not stay for later calls)
# Two GPUs: EARLY_GPU=0 serves the trained adapters on GPU 0 as soon as the LoRA groups are done (a full-FT group still
# training on GPU 1), TRAJ=1 then checks LEVERS' fused trajectory there; the merged dir takes that serving result.
# Bring results back:         bash benchmarks/gpu/study.sh pack     (one .tgz per shard, the export of the merged
#                             dir (`lorastudy export`: what studies/ holds) and the logs, to $OUT; each < 16 MiB)
# A later lease continues a shard from its pack: carry it as .carryr/shard-<tasks>.tgz (or .carryr2/); `run` unpacks
# it first. A finished shard (drift done) only joins the merge: queue it too (e.g. Q1="mrpc rte").
#
# Qi: the shards GPU i runs one after the other (a shard = tasks joined by ','; shards separated by spaces; a shard
# written TASKS@PHASE stops after PHASE, e.g. sst2@tune: its tuning now, its training in a later lease).
# A shard runs phases sanity .. drift with `lorastudy run --only P --time-budget S`. As soon as every shard that runs
# up to drift has ended, those whose drift is done are merged (merge-shards --allow-partial) into $R/merged, which
# gets serving (GPU 0, when 5 minutes are left), the report and an export. Phase wall times: each shard's
# run_summary.json, and $R/phases.tsv (one line per phase pass).
# The packs hold each shard's small artifacts (no full-FT weights or checkpoints, no representations): what
# merge-shards and the report read, and LoRA checkpoints, so that a paused LoRA run goes on in the next lease.
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
R=$(realpath -m "${R:-/tmp/lorastudy/study}")  # (absolute: `run` continues from a copy of the checkout)
CFG=${CFG:-configs/smollm2.yaml}
# Execution knobs (config.EXECUTION_KEYS: not in the config hash, and shards may differ in them; each run's
# metrics.json records what it ran with).
# Eight fused slots per method: a full-FT group's step grows ~3.5 ms per slot (optimizer-bound), so wide groups
# would stretch the longest trials (batch 1, 4 epochs: 13,204 steps) past the lease (docs/PROTOCOL.md).
KNOBS=(--set "train.fuse_max_runs=${SLOTS:-8}")
# LEVERS: step levers for the phases run here (e.g. fused_kernels; execution keys, not in the config hash, so a
# shard whose phase 1 ran without them continues with them). GPUS/WORKERS: a queue whose shard trains on several
# GPUs (CUDA_VISIBLE_DEVICES=GPUS, --workers WORKERS: phase 2 deals its fused groups, longest first, one process
# per GPU; GPUS applies to every queue, so give it with one queue that trains, beside queues of finished shards
# only). PHASES: the phases a queue runs (default all; a carried shard whose phase 1 is done: train extract drift).
[ -n "${LEVERS:-}" ] && KNOBS+=(--set "train.step_levers=[${LEVERS}]")
SERVE=(--set "serve.engines=[merged,peft,batched]")  # vLLM needs its own staging (benchmarks/gpu/vllm.sh)
mkdir -p "$R"

left() { echo $(( ${DEADLINE:?DEADLINE: epoch seconds by which every phase must have stopped} - $(date +%s) )); }

phase() {  # phase GPU RESULTS_DIR TASKS P   (TASKS empty: the recorded config's tasks, as for the merged dir)
  local gpu=$1 dir=$2 tasks=$3 p=$4 t0 rc budget
  local only=()
  [ -n "$tasks" ] && only=(--set "tasks=[$tasks]")
  budget=$(( $(left) - 60 ))
  if [ "$budget" -lt 30 ]; then echo "$(date +%T) $tasks $p: no time left" ; return 3; fi
  t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=${GPUS:-$gpu} python3 -m lorastudy.cli run "$CFG" --data-dir "$LORASTUDY_GLUE_DIR" "${KNOBS[@]}" \
    "${SERVE[@]}" "${only[@]}" --set "output_dir=$dir" --only "$p" --time-budget "$budget" --workers "${WORKERS:-1}" \
    >> "$dir.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "${tasks:-merged}" "$p" "$rc" "$(( $(date +%s) - t0 ))" "$(date +%T)" | tee -a "$R/phases.tsv"
  return $rc
}

queue() {  # queue GPU SHARD...
  local gpu=$1; shift
  for spec in "$@"; do
    local tasks=${spec%@*} last=drift
    [ "$spec" != "$tasks" ] && last=${spec#*@}
    local dir="$R/shard-${tasks//,/-}"
    mkdir -p "$dir"
    if [ "$last" = drift ] && [ -f "$dir/phase4/drift/hypothesis_test_results.json" ]; then
      # a finished shard carried from an earlier lease: its pack has no full-FT weights or representations, so a
      # phase pass here would retrain and re-extract; it only joins the merge
      echo "$(date +%T) $tasks: finished in an earlier lease"; touch "$dir.done"; continue
    fi
    for p in ${PHASES:-sanity baselines tune train extract drift}; do
      phase "$gpu" "$dir" "$tasks" "$p" || { echo "$(date +%T) $tasks: stopped at $p"; break; }
      # (--only P never marks its phase budget_stopped: a pass that ran into the deadline may have left work)
      [ "$(left)" -le 90 ] && { echo "$(date +%T) $tasks: deadline after $p"; break; }
      [ "$p" = "$last" ] && break
    done
    pack_one "$dir"
    touch "$dir.done"
  done
}

early() {  # EARLY_GPU: serving (RQ2) on the GPU that the LoRA groups free, while a full-FT group still trains
  # (serving reads only the LoRA adapters: serve_adapters.sh); the merged dir takes its phase4/deployment/ and its
  # own serve pass then finds it current. TRAJ=1: then the 200-step fused trajectory check of LEVERS on that GPU.
  local want=${EARLY_RUNS:-9} have
  while [ "$(left)" -gt 400 ]; do
    # (a LoRA run that failed in this pass counts as done: serving measures the complete ones; a FAILED.json
    # carried from an earlier lease does not, since train retries that run)
    have=$(( $(ls -d "$R"/shard-*/phase2/*/lora/seed*[0-9]/COMPLETE 2>/dev/null | wc -l) + \
      $(find "$R"/shard-*/phase2/*/lora -maxdepth 1 -name 'seed*.FAILED.json' -newer "$R/gpu.txt" 2>/dev/null | wc -l) ))
    [ "$have" -ge "$want" ] && break
    sleep 15
  done
  [ "$(left)" -le 400 ] && { echo "$(date +%T) early serving: not started (LoRA runs $have of $want)"; return; }
  local t0; t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$EARLY_GPU X="$R/serve_early" OUT="$R/serve_early_out" T=$(( $(left) - 360 )) \
    SHARDS="$(ls -d "$R"/shard-*/ | tr '\n' ' ')" bash benchmarks/gpu/serve_adapters.sh > "$R/serve_early.log" 2>&1
  printf 'early\tserve-bench\t%s\t%s\t%s\n' "$?" "$(( $(date +%s) - t0 ))" "$(date +%T)" | tee -a "$R/phases.tsv"
  if [ "${TRAJ:-0}" = 1 ] && [ -n "${LEVERS:-}" ] && [ "$(left)" -gt 300 ]; then
    t0=$(date +%s)
    CUDA_VISIBLE_DEVICES=$EARLY_GPU timeout $(( $(left) - 240 )) python3 benchmarks/train_step.py --parts fused \
      --methods lora full --fused-n 1 --fused-batch-sizes 2 --fused-dropout-n --fused-group-n --fused-streams 0 \
      --fused-trajectory-steps 200 --fused-trajectory-levers ${LEVERS//,/ } --glue "$LORASTUDY_GLUE_DIR" \
      --out "$R/fused_levers_trajectory.json" > "$R/fused_levers_trajectory.log" 2>&1
    printf 'early\ttrajectory\t%s\t%s\t%s\n' "$?" "$(( $(date +%s) - t0 ))" "$(date +%T)" | tee -a "$R/phases.tsv"
  fi
}

pack_one() {  # the small artifacts of a shard dir, as $R/<name>.tgz
  local dir=$1
  # (LoRA checkpoints travel: a few MB each, so a LoRA run can go on in the next lease; full-FT ones cannot)
  tar czf "$R/$(basename "$dir").tgz" -C "$dir" --exclude='*/representations.safetensors' \
    --exclude='./phase2/*/full/*.ckpt' --exclude='./phase2/*/full/*/model/model.safetensors' . 2>/dev/null
}

case "${1:-status}" in
  run)
    : "${DEADLINE:?DEADLINE: epoch seconds by which every phase must have stopped}"
    if [ "${STUDY_CODE:-}" != "$PWD" ]; then
      # Run from a copy of the checkout: the device tool copies the working tree in again at every call, and a
      # detached study importing from it failed mid-run (ModuleNotFoundError). Carried packs are unpacked first:
      # carried paths exist only during the call that carries them.
      for c in .carryr .carryr2; do
        for f in "$c"/shard-*.tgz; do
          d="$R/$(basename "$f" .tgz)"
          [ -f "$f" ] && [ ! -d "$d" ] && mkdir -p "$d" && tar xzf "$f" -C "$d"
        done
      done
      mkdir -p /tmp/lorastudy
      C=$(mktemp -d /tmp/lorastudy/code.XXXXXX)  # (its own: a study still running from an earlier copy keeps it)
      tar cf - --exclude='./.carry*' . | tar xf - -C "$C"
      cd "$C" && STUDY_CODE=$C PYTHONPATH=$C/src${PYTHONPATH:+:$PYTHONPATH} exec bash benchmarks/gpu/study.sh run
    fi
    rm -f "$R"/*.done  # markers of an earlier pass on this machine
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | tee "$R/gpu.txt"
    (while command -v nvidia-smi > /dev/null; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used \
      --format=csv,noheader | sed "s/^/$(date +%T), /" >> "$R/gpu_util.txt"; sleep 20; done) &
    mon=$!
    [ -n "${EARLY_GPU:-}" ] && { early & }
    python3 -c "from lorastudy import modeling as M; print(M.resolve_source('smollm2-135m'))"  # GGUF once
    queue 0 ${Q0:-mrpc,rte} &
    pids=($!)
    if [ -n "${Q1:-}" ]; then queue 1 $Q1 & pids+=($!); fi
    # merge as soon as every shard that runs up to drift has ended (tune-only shards may still be running)
    for spec in ${Q0:-mrpc,rte} ${Q1:-}; do
      [ "$spec" != "${spec%@*}" ] && continue
      t=${spec//,/-}
      while [ ! -f "$R/shard-$t.done" ] && [ "$(left)" -gt 0 ]; do sleep 10; done
    done
    shards=()
    for d in "$R"/shard-*/; do [ -f "$d/phase4/drift/hypothesis_test_results.json" ] && shards+=("${d%/}"); done
    if [ ${#shards[@]} -gt 0 ]; then
      t0=$(date +%s)
      python3 -m lorastudy.cli merge-shards "$CFG" "${shards[@]}" --out "$R/merged" --allow-partial \
        --data-dir "$LORASTUDY_GLUE_DIR" "${KNOBS[@]}" >> "$R/merged.log" 2>&1
      printf 'merged\tmerge-shards\t%s\t%s\t%s\n' "$?" "$(( $(date +%s) - t0 ))" "$(date +%T)" | tee -a "$R/phases.tsv"
      if [ -d "$R/serve_early/phase4/deployment" ] && [ ! -d "$R/merged/phase4/deployment" ]; then
        mkdir -p "$R/merged/phase4" && cp -r "$R/serve_early/phase4/deployment" "$R/merged/phase4/"
      fi
      if [ "$(left)" -gt 300 ]; then  # (on a GPU the first shard's queue has ended: GPU 0 is free)
        GPUS=0 WORKERS=1 phase 0 "$R/merged" "" serve
      fi
      python3 -m lorastudy.cli report "$R/merged" >> "$R/merged.log" 2>&1
      python3 -m lorastudy.cli report "$R/merged" --check >> "$R/merged.log" 2>&1
      echo "report --check rc=$?" | tee -a "$R/phases.tsv"
      python3 -m lorastudy.cli export "$R/merged" --out "$R/export" >> "$R/merged.log" 2>&1 \
        && tar czf "$R/export.tgz" -C "$R/export" .
      echo "export rc=$?" | tee -a "$R/phases.tsv"
    fi
    wait "${pids[@]}"
    kill $mon 2>/dev/null
    echo "study.sh: done $(date +%T)" | tee -a "$R/phases.tsv"
    ;;
  status)
    date +%T; cat "$R/phases.tsv" 2>/dev/null; tail -3 "$R/gpu_util.txt" 2>/dev/null
    for f in "$R"/*.log; do echo "== $f"; grep -v "Warning\|warn(" "$f" | tail -6; done
    ;;
  pack)
    mkdir -p "$OUT"
    for d in "$R"/shard-*/; do [ -d "$d" ] && pack_one "${d%/}"; done
    [ -d "$R/export" ] && tar czf "$R/export.tgz" -C "$R/export" .
    tar czf "$OUT/logs.tgz" -C "$R" --exclude='*.tgz' --exclude='shard-*' --exclude='merged' --exclude='serve_early' \
      --exclude='export' . 2>/dev/null
    cp "$R"/*.tgz "$OUT/" 2>/dev/null
    ls -la "$OUT"
    ;;
esac
