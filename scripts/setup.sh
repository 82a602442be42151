#!/usr/bin/env bash
# Creates .venv/ at the repo root with the pinned stack (Python 3.12, torch 2.14.1, megatron-core 0.19.2,
# sglang 0.5.23, transformers 5.19) and installs this project into it, editable.
# Idempotent: does nothing when .venv already matches requirements/lock.txt and setup.py.
# Run: bash scripts/setup.sh        (PYTHON=/path/to/python3.12 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1)
    if [ -n "$version" ]; then echo "$(pyenv root)/versions/$version/bin/python3.12"; return; fi
  fi
  echo "setup.sh: no Python 3.12 found (megatron-core >= 0.17 needs it); set PYTHON=/path/to/python3.12" >&2
  exit 1
}

# Two stamps: a changed lock rebuilds the venv; a changed setup.py only reinstalls this project.
lock_stamp=.venv/.opd-lock-stamp project_stamp=.venv/.opd-project-stamp
want_lock=$(sha256sum requirements/lock.txt | cut -d' ' -f1)
want_project=$(sha256sum setup.py | cut -d' ' -f1)

if ! { [ -x .venv/bin/python ] && [ "$(cat "$lock_stamp" 2>/dev/null)" = "$want_lock" ]; }; then
  python=$(find_python)
  echo "setup.sh: building .venv with $python ($("$python" --version))"
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --no-deps -r requirements/lock.txt
  echo "$want_lock" > "$lock_stamp"
fi
if [ "$(cat "$project_stamp" 2>/dev/null)" != "$want_project" ]; then
  if ! log=$(.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1); then
    echo "$log" >&2; exit 1
  fi
  .venv/bin/python -c "import megatron.core, torch, transformers; print('setup.sh: torch', torch.__version__, \
'| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)" 2>/dev/null
  echo "$want_project" > "$project_stamp"
fi
