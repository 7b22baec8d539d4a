#!/usr/bin/env bash
# On the GPU machine: build if needed, then profile one case with Nsight Compute and keep the report
# text under $OUT. Clocks are left alone (--clock-control none, as the device notes ask).
#   scripts/gpu-profile.sh NAME 'KERNEL_REGEX' COMMAND...      e.g.
#   scripts/gpu-profile.sh gate-v3 'moe_gate_kernel' python3 bench/profile/moe_cases.py v3
cd "$(dirname "$0")/.."
source scripts/gpu-env.sh
[ -f build-gpu/build.ninja ] || anvil_gpu_build || exit 1
name=$1 regex=$2
shift 2
PYTHONPATH=$PWD/build-gpu/python ncu --clock-control none --kernel-name "regex:$regex" --launch-skip 1 \
  --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
  --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
  --section InstructionStats "$@" > "$out/ncu-$name.txt" 2>&1
echo "gpu-profile: $name rc=$? ($(wc -l < "$out/ncu-$name.txt") lines in ncu-$name.txt)"
