#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (slow and ray tests included).
# Pass pytest arguments to narrow it, e.g. `scripts/test.sh -m "not slow and not ray"`.
# On a fresh Debian/Ubuntu machine, as root, it installs headless Chromium first (quietly; a failure only means the
# report's browser test skips), so the suite renders the HTML report as a browser does.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "scripts/test.sh: installing chromium for the report's browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "scripts/test.sh: chromium could not be installed; the browser test will skip" >&2
fi
scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q --timeout=900 "$@"
