#!/usr/bin/env bash
# Set up (or refresh) the project venv in .venv: torch first (these machines serve torch 2.14.1 from local disk; a
# pip constraint caps it there), then synthaug with its test extras. Idempotent: re-installs only when pyproject.toml
# changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.synthaug-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
