#!/usr/bin/env bash
# The fp8 GEMM tuning sweep, on the GPU machine in one call: build with the sweep's candidate
# configurations (-DANVIL_FP8_GEMM_SWEEP=ON, build-sweep/), check every configuration forced through
# ANVIL_FP8_GEMM_CONFIG (and the grouped ones through ANVIL_FP8_GEMM_GROUPED_CONFIG, and the stream-K
# decompositions through ANVIL_FP8_GEMM_SCHED) against the fp32 reference on cheap shapes, then time every
# candidate and scheduler variant on the issue's shapes beside cuBLAS.
#   device run: scripts/fp8-sweep.sh          (carry .gpu-deps)
# Writes to $OUT: fp8-sweep.txt (the log: correctness, then one table per shape, best first),
# fp8_sweep.json (M >= 4096 and grouped) and fp8_sweep_small.json (M <= 128); build logs.
#   FP8_SWEEP_SKIP_TESTS=1   time only;   FP8_SWEEP_MS_LARGE / FP8_SWEEP_MS_SMALL   other M lists
#   FP8_SWEEP_PYTEST=1       also tests/python/test_fp8_gemm.py's CUDA tests on the sweep build at the end
#   FP8_SWEEP_VARIANTS=0     verification: bench/fp8_gemm.py as it is (every M, the heuristic's picks, all
#                            goals in one run; JSON $OUT/fp8_gemm.json) instead of the variant tables
# A tuning round: add candidate files to ANVIL_FP8_GEMM_SWEEP_SOURCES (CMakeLists.txt) and their rows to
# fp8_gemm_heuristic.cpp (weak, under ANVIL_FP8_GEMM_SWEEP), name them in FP8_SWEEP_LARGE etc.
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
build=build-sweep
log="$out/fp8-sweep.txt"
: > "$log"
say() { echo "$@" | tee -a "$log"; }

t0=$SECONDS
cmake --preset gpu -B "$build" -DANVIL_FP8_GEMM_SWEEP=ON -DANVIL_TESTS=OFF \
      -DPython_EXECUTABLE="$(command -v python3)" -DCMAKE_PREFIX_PATH="$deps/usr" \
      -DCMAKE_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu" -DANVIL_CUTLASS_DIR="$deps/cutlass" \
      > "$out/sweep-configure.log" 2>&1 || { tail -30 "$out/sweep-configure.log"; exit 1; }
# Keep going past a candidate that fails to compile, then leave it out (it is declared weak) and link the rest.
if ! cmake --build "$build" -j "$(nproc)" --target anvil_python -- -k 0 > "$out/sweep-build.log" 2>&1; then
  failed=$(grep -E "^FAILED:" "$out/sweep-build.log" | grep -oE "fp8_gemm_sm90_[a-z0-9_]+[.]cu[.]o" \
           | sed -E 's/.*fp8_gemm_sm90_([a-z0-9_]+)[.]cu[.]o/\1/' | sort -u | paste -sd';')
  [ -n "$failed" ] || { grep -E "error|Error" "$out/sweep-build.log" | head -40; exit 1; }
  say "fp8-sweep: leaving out the candidates that failed to compile: $failed"
  grep -E "error" "$out/sweep-build.log" | head -20 | tee -a "$log"
  cmake -B "$build" -DANVIL_FP8_GEMM_SWEEP_EXCLUDE="$failed" >> "$out/sweep-configure.log" 2>&1
  cmake --build "$build" -j "$(nproc)" --target anvil_python >> "$out/sweep-build.log" 2>&1 \
    || { grep -E "error|Error" "$out/sweep-build.log" | tail -40; exit 1; }
fi
say "fp8-sweep: configured and built in $(( SECONDS - t0 )) s"
export PYTHONPATH="$root/$build/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import anvil; print('compiled:', ', '.join(anvil.fp8_gemm_configs()))" 2>&1 | tee -a "$log"

status=0
# What is timed: every configuration the heuristic can pick, under the scheduler settings that mattered in
# the round of 2026-11-23, plus any candidates named in FP8_SWEEP_SMALL / _LARGE / _GROUPED (";"-separated
# "name[@knobs]", appended). Decode / small M: the swapped kernels under each decomposition.
small=""
for c in swapab_128x32 swapab_128x64; do
  for k in "" "mode=dp" "mode=splitk,splits=2" "mode=splitk,splits=4" "mode=streamk,reduce=atomic"; do
    small+="$c${k:+@$k};"
  done
done
small+="streamk_128x128@mode=dp;pingpong_64x128_c1x2${FP8_SWEEP_SMALL:+;$FP8_SWEEP_SMALL}"
# Large M: the workhorse under raster orders and swizzles, the stream-K one under each decomposition.
large="coop_128x128_c1x2;coop_128x128_c1x2@raster=m;coop_128x128_c1x2@raster=n;coop_128x128_c1x2@swizzle=2"
large+=";coop_128x128_c1x2@swizzle=4;coop_128x128_c1x2@raster=m,swizzle=8"
large+=";streamk_128x128_c2x1;streamk_128x128_c2x1@mode=dp;streamk_128x128_c2x1@mode=streamk;streamk_128x128"
large+="${FP8_SWEEP_LARGE:+;$FP8_SWEEP_LARGE}"
grouped="grouped_128x128_c1x2;grouped_128x128_c1x2@raster=n;grouped_128x128_c1x2@swizzle=2"
grouped+=";grouped_128x128_c1x2@swizzle=4${FP8_SWEEP_GROUPED:+;$FP8_SWEEP_GROUPED}"

# Correctness first, every configuration forced under each scheduler setting, each in a process of its
# own; a configuration that fails or faults is left out of the timing.
: > "$out/fp8_sweep_failed.txt"
if [ "${FP8_SWEEP_SKIP_TESTS:-0}" != 1 ]; then
  t0=$SECONDS
  python3 scripts/fp8_sweep_check.py --failed-out "$out/fp8_sweep_failed.txt" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  say "fp8-sweep: correctness in $(( SECONDS - t0 )) s"
fi
drop_failed() {  # a ;-separated variant list without the configurations that failed the check
  local v kept=""
  IFS=';' read -ra vs <<< "$1"
  for v in "${vs[@]}"; do grep -qx "${v%%@*}" "$out/fp8_sweep_failed.txt" || kept+="$v;"; done
  echo "${kept%;}"
}
small=$(drop_failed "$small"); large=$(drop_failed "$large"); grouped=$(drop_failed "$grouped")

t0=$SECONDS
if [ "${FP8_SWEEP_VARIANTS:-1}" = 0 ]; then   # verification: the benchmark as it is, the heuristic's picks only
  say ""
  python3 bench/fp8_gemm.py --json "$out/fp8_gemm.json" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
  say ""
  say "== M >= 4096 and grouped"
  python3 bench/fp8_gemm.py --ms "${FP8_SWEEP_MS_LARGE:-4096,8192}" --variants "$large" --grouped-variants "$grouped" \
    --json "$out/fp8_sweep.json" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  say ""
  say "== M <= 128"
  python3 bench/fp8_gemm.py --ms "${FP8_SWEEP_MS_SMALL:-1,64,128}" --dense-only --variants "$small" \
    --json "$out/fp8_sweep_small.json" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "${FP8_SWEEP_PYTEST:-0}" = 1 ]; then   # the CUDA tests of test_fp8_gemm.py as they are (sweep build)
  python3 -m pytest tests/python/test_fp8_gemm.py -q -m cuda -p no:cacheprovider 2>&1 | tail -5 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
say "fp8-sweep: timed in $(( SECONDS - t0 )) s; status $status"
exit $status
