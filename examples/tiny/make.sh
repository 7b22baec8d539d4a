#!/usr/bin/env bash
# Regenerates the embedded demo's committed ingredients (examples/tiny/data/*.jsonl and
# examples/tiny/tokenizer/) from Debian packages that scripts/setup.sh installs (fortunes,
# fortunes-min, dict-foldoc), with the .venv's sentencepiece. Deterministic: a re-run on the same
# packages gives the same bytes (git diff shows nothing). The base model (examples/tiny/base) is not
# made here but by `anvil train --config examples/tiny/pretrain.json` (examples/tiny/README.md).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
for f in /usr/share/games/fortunes/fortunes /usr/share/games/fortunes/computers /usr/share/dictd/foldoc.index; do
  [[ -e "$f" ]] || { echo "make.sh: $f is missing: run scripts/setup.sh (it installs fortunes, fortunes-min, dict-foldoc)" >&2; exit 1; }
done
"$python" -c "import sentencepiece" 2>/dev/null || { echo "make.sh: $python has no sentencepiece (run scripts/setup.sh)" >&2; exit 1; }
"$python" "$here/make_data.py" --out "$here" "$@"
