#!/usr/bin/env bash
# The main job on the embedded digits world: set-up, then a full build (DCT tokens for the 10 digit classes, 100 images
# per class, and the plain-prompt baseline on the same seeds), judge evaluation, and the HTML report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
OUT=${OUT:-out/digits}
.venv/bin/synthaug build --dataset digits --per-class 100 --baseline --out "$OUT" "$@"
.venv/bin/synthaug evaluate "$OUT" --judge digits-judge
.venv/bin/synthaug report "$OUT"
echo "report: $OUT/report/index.html"
