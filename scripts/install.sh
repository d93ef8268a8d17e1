#!/usr/bin/env bash
# Install megatron-dsv3 into ./.venv (Python 3.12) from nothing: megatron-core, torch, the package
# with its start-up hook, and the test tools.  Safe to run again.  Used by the README and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidates=("${PYTHON:-}" python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
  fi
  candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      echo "$py"; return 0
    fi
  done
  echo "error: megatron-core >= 0.17 needs Python 3.12 and none was found." \
       "Fix: install Python 3.12, or point PYTHON=/path/to/python3.12 at it." >&2
  return 1
}

PY=$(find_python)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# A regular (non-editable) install: it also puts megatron-dsv3.pth, the start-up hook, into
# site-packages.  constraints.txt pins the versions this release is tested with.
.venv/bin/python -m pip install --quiet --constraint constraints.txt ".[test]"
# Read the whole status before matching (grep -q would close the pipe at the first match).
hook_status=$(.venv/bin/megatron-dsv3 hook status)
grep -q "installed: True" <<<"$hook_status"
echo "megatron-dsv3 installed in $(pwd)/.venv ($(.venv/bin/python --version))"
