#!/usr/bin/env bash
# One command for a GPU machine: generation and token-update rates of the SD-scale random world, before and after the
# fast path (channels-last, compiled UNet), printed as one table (scripts/bench/gpu.py says what each row is). At most
# 8 minutes on one H100: rows past gpu.py's --budget (420 s) print as skipped, and `timeout` stops it at 480 s.
#
# Runs from a plain copy of the repository, without installing synthaug (PYTHONPATH is set here). It needs torch,
# transformers, safetensors, pyarrow, pillow and pyyaml (a machine with torch and transformers has them) plus
# diffusers, webdataset and braceexpand. Where those are missing, bring their wheels, fetched on a machine with
# network (pure-Python wheels, so any platform fetches them):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#       -d wheels diffusers==0.42.1 webdataset braceexpand importlib_metadata
#
# and put the folder at the repository root as wheels/ (or name it with SYNTHAUG_WHEELS): they are installed with
# `pip install --no-deps --no-index --target` into a folder of their own (SYNTHAUG_GPU_DEPS, default
# ${TMPDIR:-/tmp}/synthaug-gpu-deps), which nothing else uses.
#
# Usage:
#   scripts/bench/gpu.sh              # the table (CUDA)
#   scripts/bench/gpu.sh --tiny       # every row on the tiny world on the CPU: the code paths run, no numbers
#   scripts/bench/gpu.sh --check      # only say whether the packages are there (or installable from the wheels)
# Other arguments go to scripts/bench/gpu.py. PYTHON picks the interpreter (default .venv/bin/python where there is
# one, else python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
wheels=${SYNTHAUG_WHEELS:-$repo/wheels}
deps=${SYNTHAUG_GPU_DEPS:-${TMPDIR:-/tmp}/synthaug-gpu-deps}
export PYTHONPATH="$repo:$deps${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1

missing() {  # the modules the benchmark imports that this interpreter cannot find
  "$PYTHON" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "safetensors", "pyarrow", "PIL", "yaml", "diffusers", "webdataset", "braceexpand"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
}

lacking=$(missing)
if [ -n "$lacking" ] && compgen -G "$wheels/*.whl" > /dev/null; then
  echo "gpu.sh: installing $(ls "$wheels"/*.whl | wc -l) wheel(s) from $wheels into $deps for: $lacking" >&2
  "$PYTHON" -m pip install -q --no-deps --no-index --target "$deps" "$wheels"/*.whl >&2
  lacking=$(missing)
fi
if [ -n "$lacking" ]; then
  echo "gpu.sh: $PYTHON lacks $lacking: bring their wheels as $wheels (the pip download command is at the top of" \
       "scripts/bench/gpu.sh), or pick another interpreter with PYTHON=." >&2
  exit 2
fi
if [ "${1:-}" = "--check" ]; then
  echo "gpu.sh: ready: $PYTHON with every package the benchmark needs (PYTHONPATH=$PYTHONPATH)"
  exit 0
fi
exec timeout --signal=INT 480 "$PYTHON" "$repo/scripts/bench/gpu.py" "$@"
