#!/usr/bin/env bash
# On the GPU machine: build (as gpu-test.sh does) and run the benchmarks in bench/, each printing ours
# beside the anchor and the ratio, and writing JSON to $OUT (copy it to bench/results/ afterwards).
#   device run: scripts/gpu-bench.sh [bench names...]     (default: all; carry .gpu-deps)
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
[ -x build-gpu/bin/anvil ] || anvil_gpu_build || exit 1
export PYTHONPATH="$root/build-gpu/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=($(cd bench && ls *.py | sed 's/\.py$//' | grep -v '^common$'))
status=0
for b in "${benches[@]}"; do
  echo "== bench/$b"
  python3 "bench/$b.py" --json "$out/$b.json" || status=1
done
exit $status
