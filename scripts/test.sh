#!/usr/bin/env bash
# All tests: the C++ suite through CTest, then the Python suite through pytest. Run scripts/setup.sh
# once first. Both print their counts; the script fails if either fails.
#
#   scripts/test.sh                     everything (CUDA tests skip cleanly without a GPU)
#   ANVIL_BUILD_DIR=build-gpu ...       another build tree
#   ANVIL_CTEST_ARGS="-L cuda" ANVIL_PYTEST_MARK="cuda or build" ...   only the GPU's share (scripts/gpu-test.sh)
#   ANVIL_PYTEST_FROM=build ...         pytest on the build tree's package instead of the installed wheel
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

# shellcheck disable=SC2086
mark=()
[ -n "${ANVIL_PYTEST_MARK:-}" ] && mark=(-m "$ANVIL_PYTEST_MARK")
if [ "${ANVIL_PYTEST_FROM:-wheel}" = wheel ]; then
  # The Python suite runs against the package as pip installs it: the wheel built from this build tree
  # (nothing compiled again) installed into a fresh venv (scripts/wheel-venv.sh), without the build tree on
  # the path. test_install.py checks that the package under test is that one.
  echo "== wheel ($build -> fresh venv)"
  t0=$(date +%s)
  if venv_python=$(ANVIL_PYTHON="$python" scripts/wheel-venv.sh "$build" "$build/wheel-venv" | tail -1); then
    echo "ci: wheel + venv took $(( $(date +%s) - t0 )) s"
    echo "== pytest (the installed wheel, $venv_python)"
    env -u PYTHONPATH ANVIL_EXPECT_INSTALLED=1 "$venv_python" -m pytest tests/python -q -rs "${mark[@]}" || status=1
  else
    echo "test.sh: building or installing the wheel failed" >&2
    status=1
  fi
else
  # ANVIL_PYTEST_FROM=build: the build tree's package (the GPU machine, which has no scikit-build-core).
  echo "== pytest ($build/python)"
  PYTHONPATH="$PWD/$build/python${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pytest tests/python -q -rs "${mark[@]}" || status=1
fi
exit $status
