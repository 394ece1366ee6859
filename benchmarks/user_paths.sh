#!/usr/bin/env bash
# The paths users take, on one GPU: `asyncbatch run` from a cold start (empty compile cache), the same command again
# (warm compile cache, a new process), and the benchmark script on the same work, for the CLI-vs-script comparison.
# Usage: benchmarks/user_paths.sh OUTDIR [NEW_TOKENS]    (results.json of each CLI run, bench JSON, logs)
set -u
out=${1:?usage: user_paths.sh OUTDIR [NEW_TOKENS]}
new=${2:-512}
mkdir -p "$out"
cache=$(mktemp -d)  # a compile cache nobody has filled: the cold start
for phase in cold warm; do
  /usr/bin/time -f "%e s wall (process)" python -m asyncbatch run configs/llama3-8b.yaml --no-progress \
    --set workload.output_len.value="$new" --set engine.startup.compile_cache="$cache" \
    --out "$out/cli-$phase" 2>&1 | grep -v "^\[asyncbatch\] \(engine\|attention\|built\)" | tee "$out/cli-$phase.log"
done
python benchmarks/engine_bench.py --out "$out/bench.json" --engines double/three/mixed --new "$new" --batches "" \
  --max-tokens 4096 2>&1 | tail -12 | tee "$out/bench.log"
