#!/usr/bin/env bash
# Builds and runs every test of sparsevlm:
#   1. the suite (unit tests, every spec case through the CLI, the CLI's bad-input
#      contract, the find_package consumer, random cases checked against the
#      independent NumPy reference in tools/crosscheck), Release build, benchmarks
#      compiled;
#   2. the same suite built with AddressSanitizer + UndefinedBehaviorSanitizer;
#   3. a one-minute libFuzzer run (20 s per target) from the committed corpus.
# `--quick` stops after 1. Run ./scripts/setup.sh first (the README does).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
quick=0
[ "${1:-}" = "--quick" ] && quick=1

echo "== 1/3 release build and suite"
# A venv with NumPy for the cross-check (PyPI); without one that test is skipped.
venv=build/venv
if ! "$venv/bin/python" -c "import numpy" 2>/dev/null; then
  mkdir -p build
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q numpy; }; then
    echo "WARNING: could not make a NumPy venv: the crosscheck test will not run"
  fi
fi
pyarg=()
if "$venv/bin/python" -c "import numpy" 2>/dev/null; then
  pyarg=(-DSPARSEVLM_PYTHON="$PWD/$venv/bin/python")
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPARSEVLM_BUILD_BENCH=ON "${pyarg[@]}"
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"
[ "$quick" = 1 ] && exit 0

echo "== 2/3 AddressSanitizer + UBSan build and suite"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSPARSEVLM_SANITIZE=ON
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs"

echo "== 3/3 libFuzzer, 20 s per target"
cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DSPARSEVLM_FUZZ=ON \
  -DSPARSEVLM_BUILD_TESTS=OFF -DSPARSEVLM_BUILD_EXAMPLES=OFF
cmake --build build-fuzz -j"$jobs"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in npy case step; do
  mkdir -p "$scratch/$t"
  ./build-fuzz/tests/fuzz/fuzz_$t -max_total_time=20 -print_final_stats=1 \
    -artifact_prefix="$scratch/" "$scratch/$t" tests/fuzz/corpus/$t 2>&1 | tail -n 3
done
echo "all tests passed"
