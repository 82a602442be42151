#!/usr/bin/env bash
# The GPU smoke test as one command on a bare GPU image (Python 3.12 with torch, transformers, triton, pyarrow;
# no network): installs bench/gpu_wheels/ (made by bench/prepare_gpu_wheels.sh where PyPI is reachable) offline
# into a temporary folder, puts it and the repo on PYTHONPATH and runs bench/gpu_smoke.py with these arguments.
# Run: bash bench/gpu_smoke.sh --out smoke.json            (PYTHON=... picks the interpreter, default python3;
#      SCRIPT=bench/gpu_parity.py bash bench/gpu_smoke.sh   SCRIPT=... runs another bench script so)
#      bash bench/gpu_smoke.sh --device cpu --tiny         (the CPU check of the same path)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$REPO/bench/gpu_wheels"
PYTHON="${PYTHON:-python3}"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "gpu_smoke.sh: no wheels in $WHEELS: run bash bench/prepare_gpu_wheels.sh where PyPI is reachable and" \
       "bring the folder along (device tool: carry bench/gpu_wheels)" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "gpu_smoke.sh: $PYTHON is not Python 3.12, which the wheels are built for (megatron-core ships C++);" \
       "set PYTHON=/path/to/python3.12" >&2
  exit 2
fi
TARGET="$(mktemp -d "${TMPDIR:-/tmp}/opd_gpu_deps.XXXXXX")"
trap 'rm -rf "$TARGET"' EXIT
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$TARGET" "${wheels[@]}"
else  # a wheel is a zip laid out for sys.path: without pip, unpacking it is the install
  for wheel in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$wheel" "$TARGET"; done
fi
export PYTHONPATH="$TARGET:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false  # the trainer forks a checkpoint writer; tokenizers' threads and fork() do not mix
"$PYTHON" "$REPO/${SCRIPT:-bench/gpu_smoke.py}" "$@"
