#!/usr/bin/env bash
# The libFuzzer harnesses of tests/fuzz (ASan + UBSan, clang++): build them in build-fuzz/ and run each for
# a bounded time on a scratch copy of its seed corpus; fails on any finding (a crash, a sanitizer report, a
# leak, an allocation over -malloc_limit_mb). CI runs it after the tests (.ci/run); a finding leaves
# crash-<sha1> in build-fuzz/findings/<target>/ (reproduce: build-fuzz/bin/<target> that-file).
#
#   scripts/fuzz.sh                 every harness, 60 s each, one per core at a time (ANVIL_FUZZ_JOBS)
#   ANVIL_FUZZ_SECONDS=600 scripts/fuzz.sh fuzz_gguf      one harness, longer (the docs' long runs)
#   ANVIL_FUZZ_BUILD_ONLY=1 scripts/fuzz.sh              build the harnesses, run none (CI builds them beside the tests)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
seconds=${ANVIL_FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_safetensors fuzz_gguf fuzz_tokenizer_json fuzz_tokenizer_model fuzz_chat_template fuzz_config fuzz_hf_configs
                                     fuzz_teacher_cache fuzz_quantized_checkpoint)

t0=$SECONDS
[ -f build-fuzz/CMakeCache.txt ] || cmake --preset fuzz > /dev/null || exit 1
cmake --build build-fuzz --target "${targets[@]}" || exit 1
echo "fuzz: built ${#targets[@]} harnesses in $(( SECONDS - t0 )) s"
[ "${ANVIL_FUZZ_BUILD_ONLY:-0}" = 1 ] && exit 0

# One harness per core at a time (libFuzzer runs one process per harness): 9 harnesses x 60 s take 5 minutes of
# wall time on CI's 2 cores instead of 9, each still fuzzed for its whole budget.
jobs=${ANVIL_FUZZ_JOBS:-$(nproc)}
run_one() {
  local t=$1 name=${1#fuzz_}
  local work=build-fuzz/findings/$t
  rm -rf "$work" && mkdir -p "$work/corpus"
  local args=(-max_total_time="$seconds" -max_len=16384 -malloc_limit_mb=2048 -timeout=20 -print_final_stats=1
              -artifact_prefix="$work/")
  [ -f "tests/fuzz/$name.dict" ] && args+=(-dict="tests/fuzz/$name.dict")
  build-fuzz/bin/"$t" "${args[@]}" "$work/corpus" "tests/fuzz/corpus_$name" > "$work/log.txt" 2>&1
  echo $? > "$work/rc"
}
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ $running -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
done
wait

status=0
for t in "${targets[@]}"; do
  work=build-fuzz/findings/$t
  log=$work/log.txt
  rc=$(cat "$work/rc" 2>/dev/null || echo 1)
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$')
  if [ "$rc" -eq 0 ]; then
    echo "fuzz: $t: ${runs:-?} inputs in ${seconds} s (${rate:-?}/s), no finding"
  else
    echo "fuzz: $t: FINDING (exit $rc) after ${runs:-?} inputs; see $log and $work/" >&2
    grep -E "ERROR|SUMMARY|runtime error|what\(\)" "$log" | head -10 >&2
    status=1
  fi
done
echo "fuzz: ${#targets[@]} harnesses, $jobs at a time, in $(( SECONDS - t0 )) s"
exit $status
