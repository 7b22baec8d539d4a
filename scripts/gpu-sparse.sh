#!/usr/bin/env bash
# On the GPU machine: build (as gpu-test.sh does), then only the sparse-attention checks: the CUDA tests of
# tests/python/test_sparse_attention.py and the C++ Sparse* suites, the self-check rows, and bench/attention
# (--quick unless ANVIL_SPARSE_BENCH=full). Logs and bench JSON go to $OUT.
#   device run: scripts/gpu-sparse.sh            (carry .gpu-deps)
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
[ -x build-gpu/bin/anvil_tests ] || anvil_gpu_build || exit 1
export PYTHONPATH="$root/build-gpu/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
build-gpu/bin/anvil selfcheck 2>&1 | grep -E "sparse|select_blocks" | tee "$out/sparse-selfcheck.txt"
build-gpu/bin/anvil_tests --gtest_filter='Sparse*' > "$out/sparse-gtest.txt" 2>&1 || status=1
tail -25 "$out/sparse-gtest.txt"
python3 -m pytest tests/python/test_sparse_attention.py -q -rs -x --durations=8 > "$out/sparse-pytest.txt" 2>&1 || status=1
tail -40 "$out/sparse-pytest.txt"
bench_args=(--json "$out/attention.json")
[ "${ANVIL_SPARSE_BENCH:-quick}" = full ] || bench_args+=(--quick)
python3 bench/attention.py "${bench_args[@]}" 2>&1 | tee "$out/sparse-bench.txt" || status=1
exit $status
