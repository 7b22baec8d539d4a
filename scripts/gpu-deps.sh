#!/usr/bin/env bash
# On the development machine: gather what the GPU machine lacks (it has torch, nvcc, CMake, ninja,
# but no Debian packages and no network) into .gpu-deps/ (git-ignored), to carry with each call:
#   .gpu-deps/debs/*.deb       sentencepiece, protobuf-lite, nlohmann/json, cxxopts, GoogleTest, PCRE2, utf8proc, gloo (headers)
#   .gpu-deps/cutlass.tar.gz   CUTLASS/CuTe headers from the venv's nvidia-cutlass
#   .gpu-deps/wheels/*.whl     the Python oracles and anchors that machine lacks: compressed-tensors (with loguru),
#                              pydantic (its dependency), torchtune (KD loss baselines),
#                              liger-kernel (bench/patch's anchor)
# scripts/gpu-test.sh unpacks them into a private prefix there (never into /).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-deps/debs
packages=(libsentencepiece-dev libsentencepiece0 libprotobuf-lite32 nlohmann-json3-dev libcxxopts-dev libgtest-dev
          libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2 libgloo-dev)
(cd .gpu-deps/debs && for p in "${packages[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download "$p"; done)
cutlass=$(.venv/bin/python -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))")
if [ ! -f .gpu-deps/cutlass.tar.gz ]; then
  tar czf .gpu-deps/cutlass.tar.gz -C "$cutlass" include tools/util/include
fi
# Python wheels, without their dependencies (torch, triton, transformers are already there). The GPU machine's
# python3 is 3.12 on x86_64: the one compiled wheel (pydantic_core, for compressed-tensors) is fetched for it.
mkdir -p .gpu-deps/wheels
for w in compressed-tensors==0.19.0 loguru==0.7.3 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
         typing-inspection==0.4.5 torchtune==0.6.1 liger-kernel==0.8.5; do
  name=$(echo "${w%%==*}" | tr - _)
  ls .gpu-deps/wheels/"$name"-"${w##*==}"-*.whl >/dev/null 2>&1 ||
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-deps/wheels "$w"
done
du -sh .gpu-deps
