#!/usr/bin/env bash
# A before/after comparison on the GPU machine: an earlier commit's `anvil`, built beside ours, so that a
# benchmark times both in one call (bench/lora.py --baseline BIN).
#   here:        scripts/gpu-baseline.sh pack COMMIT     writes .gpu-deps/baseline.tar.gz (git archive of COMMIT)
#   GPU machine: scripts/gpu-baseline.sh build           builds it in build-baseline/ (git-ignored, so it
#                                                        stays between calls on a warm machine; target anvil, sm_90a,
#                                                        `nproc / 2` jobs, so it can run beside gpu-test.sh);
#                                                        the binary is build-baseline/build-gpu/bin/anvil
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  pack)
    commit=${2:?usage: scripts/gpu-baseline.sh pack COMMIT}
    mkdir -p .gpu-deps
    git archive --format=tar.gz -o .gpu-deps/baseline.tar.gz "$commit" || exit 1
    git rev-parse "$commit" > .gpu-deps/baseline.commit
    echo "baseline $(cat .gpu-deps/baseline.commit): .gpu-deps/baseline.tar.gz ($(du -h .gpu-deps/baseline.tar.gz | cut -f1))"
    ;;
  build)
    [ -f .gpu-deps/baseline.tar.gz ] || { echo "gpu-baseline: no .gpu-deps/baseline.tar.gz: run 'pack COMMIT' here first" >&2; exit 2; }
    dir=$(pwd)/build-baseline
    rm -rf "$dir" && mkdir -p "$dir" && tar xzf .gpu-deps/baseline.tar.gz -C "$dir" || exit 1
    cp -r .gpu-deps "$dir/"
    cd "$dir"
    # The baseline's own gpu-env.sh, with its logs kept out of $OUT (ours go there).
    OUT="$dir/out" source scripts/gpu-env.sh > /dev/null
    t0=$SECONDS
    cmake --preset gpu -DPython_EXECUTABLE="$(command -v python3)" -DCMAKE_PREFIX_PATH="$deps/usr" \
          -DCMAKE_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu" -DANVIL_CUTLASS_DIR="$deps/cutlass" \
          -DANVIL_TESTS=OFF > "$dir/configure.log" 2>&1 || { tail -30 "$dir/configure.log"; exit 1; }
    cmake --build --preset gpu -j "$(( $(nproc) / 2 ))" --target anvil > "$dir/build.log" 2>&1 ||
      { grep -E "error|Error" "$dir/build.log" | head -40; exit 1; }
    echo "gpu-baseline: $(cat .gpu-deps/baseline.commit 2>/dev/null) built in $(( SECONDS - t0 )) s: $dir/build-gpu/bin/anvil"
    ;;
  *) echo "usage: scripts/gpu-baseline.sh pack COMMIT | build" >&2; exit 2 ;;
esac
