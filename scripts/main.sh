#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the main job on the embedded default (CPU, no download).
# Run: bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m megatron_opd.demo.opd_demo "$@"
