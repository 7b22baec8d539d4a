#!/usr/bin/env bash
# On the GPU machine, in one call: unpack the carried dependencies, build for sm_90a, run the
# self-check and the CUDA tests (ctest label "cuda", pytest markers "cuda" and "build"); logs go to $OUT.
#   device run: scripts/gpu-test.sh            (carry .gpu-deps)
#   ANVIL_GPU_ALL=1 scripts/gpu-test.sh        every test, the CPU ones too
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
anvil_gpu_build || exit 1
build-gpu/bin/anvil selfcheck 2>&1 | tee "$out/selfcheck.txt"
selfcheck=${PIPESTATUS[0]}
if [ "${ANVIL_GPU_ALL:-0}" = 1 ]; then
  export ANVIL_CTEST_ARGS="" ANVIL_PYTEST_MARK=""
else
  export ANVIL_CTEST_ARGS="-L cuda" ANVIL_PYTEST_MARK="cuda or build"
fi
# No scikit-build-core there (no network): pytest runs on the build tree, not on an installed wheel.
ANVIL_BUILD_DIR=build-gpu ANVIL_PYTHON=python3 ANVIL_PYTEST_FROM=build scripts/test.sh > "$out/test.log" 2>&1
tests=$?
grep -E "tests passed|tests failed|passed|failed|Failed|FAILED|Error" "$out/test.log" | tail -25
echo "gpu-test: selfcheck rc=$selfcheck tests rc=$tests"
[ "$selfcheck" = 0 ] && [ "$tests" = 0 ]
