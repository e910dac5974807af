#!/bin/sh
# Regenerate the random spec cases and check the CLI against them.
#   tools/crosscheck/run_all.sh [OUT=/tmp/xc/cases] [COUNT=600] [SEED=2024]
set -e
PY=${PY:-python3}  # a Python with NumPy
HERE=$(dirname "$0")
OUT=${1:-/tmp/xc/cases}; COUNT=${2:-600}; SEED=${3:-2024}
rm -rf "$OUT"
"$PY" "$HERE/generate.py" "$OUT" --count "$COUNT" --seed "$SEED" > "$OUT.gen.log" 2>&1
"$PY" "$HERE/coverage.py" "$OUT"
"$PY" "$HERE/run_checks.py" "$OUT"
