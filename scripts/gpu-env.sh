# Sourced by gpu-test.sh and gpu-bench.sh on the GPU machine: unpack .gpu-deps into a private prefix
# and configure + build build-gpu/ for sm_90a against that machine's own torch (python3).
set -uo pipefail
root=$(pwd)
out=${OUT:-$root/out}
mkdir -p "$out"
deps=/tmp/anvil-deps
if [ ! -d .gpu-deps/debs ]; then
  echo "gpu: .gpu-deps is missing: run scripts/gpu-deps.sh on the dev machine and carry .gpu-deps" >&2
  exit 2
fi
if [ ! -d "$deps/usr" ]; then
  mkdir -p "$deps/cutlass"
  for d in .gpu-deps/debs/*.deb; do dpkg -x "$d" "$deps"; done
  tar xzf .gpu-deps/cutlass.tar.gz -C "$deps/cutlass"
fi
# The image's default compiler (CXX=/opt/gcc/bin/g++) links libstdc++ statically into shared libraries:
# libanvil_ops.so then carries a second copy of the iostream machinery, and the first error message it
# formats in a process that already uses the system libstdc++ crashes. Build with the system g++.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
# The carried wheels go into a private site folder on PYTHONPATH (no pip install into the machine's Python).
if [ -d .gpu-deps/wheels ] && [ ! -d "$deps/site" ]; then
  python3 -m pip install -q --no-deps --target "$deps/site.part" .gpu-deps/wheels/*.whl > "$out/pip.log" 2>&1 &&
    mv "$deps/site.part" "$deps/site" || echo "gpu: installing .gpu-deps/wheels failed: see $out/pip.log" >&2
fi
[ -d "$deps/site" ] && export PYTHONPATH="$deps/site${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c "import torch; print('gpu: torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$out/device.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv >> "$out/device.txt" 2>&1

anvil_gpu_build() {
  local t0=$SECONDS
  cmake --preset gpu -DPython_EXECUTABLE="$(command -v python3)" -DCMAKE_PREFIX_PATH="$deps/usr" \
        -DCMAKE_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu" -DANVIL_CUTLASS_DIR="$deps/cutlass" \
        > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; return 1; }
  cmake --build --preset gpu -j "$(nproc)" > "$out/build.log" 2>&1 || { grep -E "error|Error" "$out/build.log" | head -40; return 1; }
  echo "gpu: configured and built in $(( SECONDS - t0 )) s"
}
