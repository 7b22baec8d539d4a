#!/usr/bin/env bash
# Builds the wheel from an existing build tree (scikit-build-core, no C++/CUDA compiled again) and installs it
# into a fresh venv, so that tests run against the installed package (scripts/test.sh does, by default).
#
#   scripts/wheel-venv.sh [BUILD_DIR [VENV_DIR]]     defaults: build, BUILD_DIR/wheel-venv
#
# The fresh venv gets the pinned dependencies of .venv (torch, transformers, pytest, ...) as links, one per
# top-level entry of .venv's site-packages, never its .pth files (anvil-build.pth puts the build tree on the
# path): copying torch and its CUDA libraries (~4 GB) would cost minutes, and a link puts them where a real
# install would (site-packages/torch), so the wheel's $ORIGIN-relative RPATHs are tested as they will run.
# `pip install --no-index` of the wheel then resolves its torch==2.11.0 requirement against that torch.
# Prints the venv's python on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
venv=${2:-$build/wheel-venv}
python=${ANVIL_PYTHON:-$(command -v python 2>/dev/null || command -v python3)}
[ -f "$build/CMakeCache.txt" ] || { echo "wheel-venv.sh: no build in $build" >&2; exit 2; }
t0=$(date +%s%N)

# The build tree's own settings, so that scikit-build-core's configure changes nothing in its cache (a
# different build type or ANVIL_TESTS would rebuild or drop targets).
cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt"; }
build_type=$(cache CMAKE_BUILD_TYPE)
tests=$(cache ANVIL_TESTS)
wheels="$build/wheel"
rm -rf "$wheels"
"$python" -m pip wheel . -q --no-build-isolation --no-deps -w "$wheels" \
  -Cbuild-dir="$build" -Ccmake.build-type="${build_type:-Release}" -Ccmake.define.ANVIL_TESTS="${tests:-ON}"
wheel=$(ls "$wheels"/anvil-*.whl)
t1=$(date +%s%N)

rm -rf "$venv"
"$python" -m venv --without-pip "$venv"
src=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dst=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for entry in "$src"/*; do
  name=$(basename "$entry")
  case "$name" in
    *.pth|anvil|anvil-*|anvil.*|_anvil*|__editable__*|__pycache__) continue ;;
  esac
  ln -s "$entry" "$dst/$name"
done
# pip of the outer environment installs into the venv (--python): the venv needs no pip of its own.
"$python" -m pip --python "$venv/bin/python" install -q --no-index "$wheel"
t2=$(date +%s%N)
ms() { echo "$(( ($2 - $1) / 1000000 )) ms"; }
echo "wheel-venv: $(basename "$wheel") ($(du -m "$wheel" | cut -f1) MB): wheel $(ms "$t0" "$t1"), venv + install $(ms "$t1" "$t2")" >&2
echo "$venv/bin/python"
