#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite. Extra arguments go to pytest.
# Run: bash scripts/test.sh            (e.g. bash scripts/test.sh -k loss -x)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest --durations=15 "$@"
