#!/usr/bin/env bash
# When the working tree plus .carry0 or .carry1 passes the device tool's 64 MiB per call (the committed study and
# results grew the tree to ~16 MB in 2026-11), re-split what ../shared/tools/device-stage made into four smaller
# git-ignored carries and stage them in four calls instead of two. Run on the CPU machine, project root, after
# device-stage:   bash benchmarks/gpu/split_stage.sh
# Then, back to back on the GPU machine (each call carrying the one folder named):
#   1 .carry0a:  mkdir -p /tmp/lorastudy/stage && cp .carry0a/p00 /tmp/lorastudy/stage/p00
#   2 .carry0b:  cat /tmp/lorastudy/stage/p00 .carry0b/p01 > /tmp/lorastudy/stage/smollm2.gguf.part00 && rm /tmp/lorastudy/stage/p00
#   3 .carry1a:  cp .carry1a/smollm2.gguf.part01 /tmp/lorastudy/stage/part01
#   4 .carry1b:  mkdir -p .carry1 && cp -r .carry1b/. .carry1/ && cp /tmp/lorastudy/stage/part01 .carry1/smollm2.gguf.part01 \
#                && source .carry1/device-env.sh > /tmp/carry1.log 2>&1
# Later calls: source /tmp/lorastudy/env.sh (as after the usual two calls).
set -euo pipefail
[ -f .carry0/smollm2.gguf.part00 ] && [ -f .carry1/smollm2.gguf.part01 ] || {
  echo "split_stage: run ../shared/tools/device-stage first (.carry0, .carry1 missing)" >&2; exit 2; }
for d in .carry0a .carry0b .carry1a .carry1b; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  rm -rf "$d" && mkdir -p "$d"
done
half=$(( ($(stat -c %s .carry0/smollm2.gguf.part00) + 1) / 2 ))
split -b "$half" -d .carry0/smollm2.gguf.part00 .carry0a/p
mv .carry0a/p01 .carry0b/p01
cp .carry1/smollm2.gguf.part01 .carry1a/
cp -r .carry1/glue .carry1/wheels .carry1/smollm2.gguf.sha256 .carry1/device-env.sh .carry1b/
du -sh .carry0a .carry0b .carry1a .carry1b
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "tracked files: $(( tree / 1048576 )) MiB; each call carries that plus one folder (limit 64 MiB)"
