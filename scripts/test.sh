#!/usr/bin/env bash
# All tests: the C++ suite through CTest, then the Python suite through pytest. Run scripts/setup.sh
# once first. Both print their counts; the script fails if either fails.
#
#   scripts/test.sh                     everything (CUDA tests skip cleanly without a GPU)
#   ANVIL_BUILD_DIR=build-gpu ...       another build tree
#   ANVIL_CTEST_ARGS="-L cuda" ANVIL_PYTEST_MARK="cuda or build" ...   only the GPU's share (scripts/gpu-test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${ANVIL_BUILD_DIR:-build}
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
python=${ANVIL_PYTHON:-$(command -v python 2>/dev/null || command -v python3)}

[ -f "$build/CMakeCache.txt" ] || { echo "test.sh: no build in $build; run scripts/setup.sh first" >&2; exit 2; }
cmake --build "$build"

status=0
echo "== ctest ($build)"
# shellcheck disable=SC2086
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" ${ANVIL_CTEST_ARGS:-} || status=1

echo "== pytest"
# shellcheck disable=SC2086
mark=()
[ -n "${ANVIL_PYTEST_MARK:-}" ] && mark=(-m "$ANVIL_PYTEST_MARK")
PYTHONPATH="$PWD/$build/python${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pytest tests/python -q -rs "${mark[@]}" || status=1
exit $status
