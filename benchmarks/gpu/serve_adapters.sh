#!/usr/bin/env bash
# On the H200 (issue 18): RQ2's serving measurement on the study's trained LoRA adapters (every task x seed), in
# a lease where not every task's full-FT runs exist yet. Serving reads only the LoRA adapters and the base model
# (serving/build.py study_adapters), so it runs on a results dir holding just the phase-2 LoRA run dirs of the
# shards, with the study's config: its phase4/deployment/ results carry the study's config hash (the hash leaves
# out serving knobs and execution keys) and are what `run --only serve` on the merged dir would write; the merged dir
# takes them (copy phase4/deployment/ in; `run --only serve` then finds them current and skips, but only when they
# measured exactly the complete LoRA runs the merged dir holds: serving.current_result compares the adapter list).
#
#   SHARDS="/tmp/lorastudy/study/shard-sst2 .carryr2/shard-mrpc.tgz .carryr2/shard-rte.tgz" T=380 \
#     bash benchmarks/gpu/serve_adapters.sh        (a shard: its results dir, or its pack)
#   PART=tinyllama T=380 bash benchmarks/gpu/serve_adapters.sh    (the serving phase's other part: serve.archs)
# PART: adapters (default: the study's trained adapters, into phase4/deployment/) or one of the config's
# serve.archs (a random-weight architecture with tasks x seeds synthetic adapters, into phase4/deployment/<arch>/;
# no SHARDS needed). ENGINES: serve.engines (default every engine, vLLM included: source /tmp/vllm/env.sh first).
# It runs from a copy of the checkout under /tmp/lorastudy/code.XXXXXX (safe to start detached with setsid).
# Output: $OUT/serve_<part>.tgz (the part's dir and the log; when the time limit T cut it, the batch sizes it
# finished, which RESUME=that.tgz in a later lease keeps). SERVE_SETS: more --set options (a CPU check).
set -u
export LORASTUDY_CACHE=/tmp/lorastudy/cache
PART=${PART:-adapters}
if [ "${SERVE_CODE:-}" != "$PWD" ]; then
  # Run from a copy of the checkout, .git included: the device tool copies the working tree in again at every
  # call (a detached job importing from it breaks), and the results record the code's commit (without .git only
  # the package version, which would also let a resume accept checkpoints of other code). Carried packs exist only
  # during the call that carries them: copied under /tmp first. Paths the caller gave relative to where it stood
  # are made absolute before the cd.
  mkdir -p /tmp/lorastudy/packs
  keep() { if [ -f "$1" ]; then cp "$1" /tmp/lorastudy/packs/ && echo "/tmp/lorastudy/packs/$(basename "$1")"; else realpath "$1"; fi; }
  shards=""; for s in ${SHARDS:-}; do shards="$shards $(keep "$s")"; done
  [ -n "${RESUME:-}" ] && RESUME=$(keep "$RESUME")
  OUT=$(realpath -m "${OUT:?OUT: where the tgz goes}"); [ -n "${X:-}" ] && X=$(realpath -m "$X")
  [ -n "${LORASTUDY_GLUE_DIR:-}" ] && LORASTUDY_GLUE_DIR=$(realpath -m "$LORASTUDY_GLUE_DIR")
  export OUT X LORASTUDY_GLUE_DIR
  cd "$(dirname "$0")/../.." || exit 2  # the checkout's root, wherever it was started from
  [ -d .git ] || echo "serve_adapters.sh: no .git in $PWD: the results record only the package version" >&2
  C=$(mktemp -d /tmp/lorastudy/code.XXXXXX)
  tar cf - --exclude='./.carry*' --exclude='./.vllm*' . | tar xf - -C "$C"
  cd "$C" && SERVE_CODE=$C SHARDS="$shards" RESUME="${RESUME:-}" PYTHONPATH=$C/src${PYTHONPATH:+:$PYTHONPATH} \
    exec bash benchmarks/gpu/serve_adapters.sh
fi
trap 'rm -rf "$SERVE_CODE"' EXIT  # (the copy this pass ran from: 35 MB each)
X=${X:-/tmp/lorastudy/serve_$PART}
mkdir -p "$X/phase2" "$OUT" /tmp/lorastudy/unpacked
# RESUME: an earlier pass's serve_<part>.tgz: the batch sizes it finished (.../partial/) are kept
[ -n "${RESUME:-}" ] && tar xzf "$RESUME" -C "$X" phase4
if [ "$PART" = adapters ]; then
  for s in ${SHARDS:?SHARDS: shard dirs or packs}; do  # (absolute after the copy above)
    src=$s
    if [ -f "$s" ]; then src=/tmp/lorastudy/unpacked/$(basename "$s" .tgz); mkdir -p "$src"; tar xzf "$s" -C "$src"; fi
    for t in "$src"/phase2/*/; do
      [ -d "$t/lora" ] && mkdir -p "$X/phase2/$(basename "$t")" && cp -r "$t/lora" "$X/phase2/$(basename "$t")/"
    done
  done
  find "$X/phase2" -name adapter -type d | sort
fi
t0=$(date +%s)
timeout -s INT "${T:-380}" python3 -m lorastudy.cli serve-bench "${CFG:-configs/smollm2.yaml}" --only "$PART" \
  --data-dir "$LORASTUDY_GLUE_DIR" --set "output_dir=$X" --set "serve.engines=${ENGINES:-[merged,peft,batched,vllm]}" \
  ${SERVE_SETS:-} 2>&1 | tr '\r' '\n' | grep -v "Loading weights\|^\s*$" > "$X/serve.log"
rc=${PIPESTATUS[0]}
echo "serve-bench $PART rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$X/serve.log"
tail -40 "$X/serve.log"
tar czf "$OUT/serve_$PART.tgz" -C "$X" phase4 serve.log manifest.json config.yaml 2>/dev/null
ls -la "$OUT"
exit "$rc"  # (124: the time limit T cut it; the batch sizes it finished are in the tgz)
