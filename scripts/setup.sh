#!/usr/bin/env bash
# Set up (or refresh) the project venv in .venv: torch first (these machines serve torch 2.14.1 from local disk; a
# pip constraint caps it there), then synthaug with its test extras. Idempotent: re-installs only when pyproject.toml
# changed since the last successful install.
#
# Installs with uv (from PyPI) where it can be had: the same packages as pip resolves here, ~75 s instead of ~150 s on
# a fresh machine (BENCHMARKS.md "README demo wall time"). uv does not read pip's configuration, so the index URLs,
# find-links and constraint files pip is configured with (`pip config list`) are passed on to it. Like pip, it
# compiles the bytecode at install: where PYTHONDONTWRITEBYTECODE is set, nothing else would, and every process
# (each Ray actor, each test's subprocess) would compile its imports again. Without uv: pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.synthaug-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
[ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || exit 0

uv_args=(--python .venv/bin/python --index-strategy unsafe-best-match --compile-bytecode -q)
while IFS= read -r line; do  # e.g. global.extra-index-url='file:///a/simple file:///b/simple'
  key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
  case $key in
    index-url) for v in $value; do uv_args+=(--index-url "$v"); done ;;
    extra-index-url) for v in $value; do uv_args+=(--extra-index-url "$v"); done ;;
    find-links) for v in $value; do uv_args+=(--find-links "$v"); done ;;
    constraint) for v in $value; do uv_args+=(--constraint "$v"); done ;;
  esac
done < <(.venv/bin/python -m pip config list 2>/dev/null || true)

install() {
  if [ -x .venv/bin/uv ] && .venv/bin/uv pip install "${uv_args[@]}" "$@"; then
    return 0
  fi
  .venv/bin/python -m pip install -q "$@"
}
.venv/bin/python -m pip install -q uv 2>/dev/null || echo "setup: uv could not be installed; installing with pip" >&2
install "torch==2.14.1" "torchvision==0.29.1"
install -e ".[test]"
echo "$want" > "$stamp"
