#!/usr/bin/env bash
# On the development machine: gather what the GPU machine lacks (it has torch, nvcc, CMake, ninja,
# but no Debian packages and no network) into .gpu-deps/ (git-ignored), to carry with each call:
#   .gpu-deps/debs/*.deb       sentencepiece, protobuf-lite, nlohmann/json, cxxopts, GoogleTest, PCRE2, utf8proc
#   .gpu-deps/cutlass.tar.gz   CUTLASS/CuTe headers from the venv's nvidia-cutlass
# scripts/gpu-test.sh unpacks them into a private prefix there (never into /).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-deps/debs
packages=(libsentencepiece-dev libsentencepiece0 libprotobuf-lite32 nlohmann-json3-dev libcxxopts-dev libgtest-dev
          libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2)
(cd .gpu-deps/debs && for p in "${packages[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download "$p"; done)
cutlass=$(.venv/bin/python -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))")
if [ ! -f .gpu-deps/cutlass.tar.gz ]; then
  tar czf .gpu-deps/cutlass.tar.gz -C "$cutlass" include tools/util/include
fi
du -sh .gpu-deps
