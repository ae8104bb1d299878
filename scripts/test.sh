#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (slow and ray tests included).
# Pass pytest arguments to narrow it, e.g. `scripts/test.sh -m "not slow and not ray"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q --timeout=900 "$@"
