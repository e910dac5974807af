#!/usr/bin/env bash
# Builds and runs every test of sparsevlm:
#   1. the suite (unit tests, every spec case through the CLI, the CLI's bad-input
#      contract, the find_package consumer, random cases checked against the
#      independent NumPy reference in tools/crosscheck), Release build, benchmarks
#      compiled; then the Python package (pip install . into build/venv) and its
#      pytest suite (tests/python: the package, Hugging Face generate(), tensor parallel);
#   2. the vLLM plugin (sparsevlm.vllm) on vLLM 0.32's CPU build: build/venv-vllm
#      (./scripts/vllm-env.sh, about 6 GB) and tests/vllm, checked against the Hugging
#      Face drop-in in build/venv;
#   3. the same suite built with AddressSanitizer + UndefinedBehaviorSanitizer;
#   4. a one-minute libFuzzer run (20 s per target) from the committed corpus.
# `--quick` stops after 1. Run ./scripts/setup.sh first (the README does).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
quick=0
[ "${1:-}" = "--quick" ] && quick=1

echo "== 1/4 release build and suite, then the Python package's tests"
# build/venv: the Python package (pip install .) with NumPy, PyTorch and
# transformers from PyPI; its NumPy also runs the crosscheck test.
./scripts/python-env.sh
venv=build/venv
# The build also compiles the extension module itself (with its CUDA path where nvcc
# is found) and checks that it imports: python.module_imports.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPARSEVLM_BUILD_BENCH=ON \
  -DSPARSEVLM_PYTHON="$PWD/$venv/bin/python" \
  -DSPARSEVLM_BUILD_PYTHON=ON -DPython_EXECUTABLE="$PWD/$venv/bin/python"
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"
# The package against the CLI and the cases, Hugging Face generate() with pruning, and the
# two-process tensor-parallel demo.
SPARSEVLM_CLI="$PWD/build/examples/sparsevlm" "$venv/bin/python" -m pytest -q tests/python
[ "$quick" = 1 ] && exit 0

echo "== 2/4 the vLLM plugin on vLLM's CPU build"
./scripts/vllm-env.sh
build/venv-vllm/bin/python -m pytest -q tests/vllm

echo "== 3/4 AddressSanitizer + UBSan build and suite"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSPARSEVLM_SANITIZE=ON
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs"

echo "== 4/4 libFuzzer, 20 s per target"
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
