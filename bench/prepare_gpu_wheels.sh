#!/usr/bin/env bash
# Wheels of what the trainer imports that a bare GPU image (torch, transformers, triton, pyarrow and their own
# dependencies) lacks, for CPython 3.12 on x86-64 Linux, pinned to requirements/lock.txt, into bench/gpu_wheels/
# (git-ignored; the device tool carries it) for bench/gpu_smoke.sh. Needs PyPI; fails above 60 MiB.
# The list came from import-testing bench/gpu_smoke.py in a venv holding only those four (bench/README.md).
# Run: bash bench/prepare_gpu_wheels.sh        (PYTHON=... picks the pip to use, default .venv/bin/python)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/bench/gpu_wheels"
LOCK="$REPO/requirements/lock.txt"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
LIMIT_MIB=60
# megatron-core, and psutil for its dist_checkpointing save; hydra-core and omegaconf for the config; requests
# (the SGLang client, imported with the config) and its urllib3 and charset-normalizer, which transformers >= 5
# no longer brings (idna and certifi still come with its httpx).
BINARY=(megatron-core psutil hydra-core omegaconf requests urllib3 charset-normalizer)
# omegaconf 2.3 pins antlr4-python3-runtime 4.9.*, published only as a source archive: built here (pure Python).
SOURCE_ONLY=(antlr4-python3-runtime)

pinned() {  # NAME -> NAME==VERSION from the lock, names compared as PEP 503 normalises them
  local want line
  want="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
  line="$(awk -F'==' -v want="$want" '{ name = tolower($1); gsub(/[-_.]+/, "-", name) } name == want' "$LOCK")"
  if [ -z "$line" ]; then echo "prepare_gpu_wheels.sh: $1 is not pinned in $LOCK" >&2; exit 1; fi
  echo "$line"
}

binary_pins=() source_pins=()
for name in "${BINARY[@]}"; do binary_pins+=("$(pinned "$name")"); done
for name in "${SOURCE_ONLY[@]}"; do source_pins+=("$(pinned "$name")"); done
rm -rf "$OUT"
mkdir -p "$OUT"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$OUT" "${binary_pins[@]}"
"$PYTHON" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$OUT" "${source_pins[@]}"

cd "$OUT"
stat -c '%s %n' *.whl | awk -v limit="$LIMIT_MIB" -v out="$OUT" '
  { total += $1; printf "%8.2f MiB  %s\n", $1 / 1048576, $2 }
  END { printf "%8.2f MiB  total in %s (limit %d MiB)\n", total / 1048576, out, limit
        if (total > limit * 1048576) { print "prepare_gpu_wheels.sh: over the limit" > "/dev/stderr"; exit 1 } }'
