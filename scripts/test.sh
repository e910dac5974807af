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
# Stage 1's venv installs during its build, stage 2's during stage 1's tests, and
# stage 3's build compiles during stage 2's tests (logs in build/logs/); each stage
# prints when it starts.
# `--quick` stops after 1. Run ./scripts/setup.sh first (the README does).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
quick=0
[ "${1:-}" = "--quick" ] && quick=1
# Each stage's wall time, so a slow CI run says where its time went.
stage() { echo "== $1 (at ${SECONDS} s)"; }
# Work that needs little CPU (pip's downloads, the vLLM tests' mostly single-threaded
# engines) runs beside work that needs both cores (the builds): in the background,
# in a session of its own (so that an exit, or Ctrl-C, stops all of it), its output
# in a log that is shown when it is waited for.
declare -A bg_pid=()
scratch=""
cleanup() {
  for p in "${bg_pid[@]}"; do kill -- "-$p" 2>/dev/null || true; done
  [ -n "$scratch" ] && rm -rf "$scratch"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
start_bg() {  # NAME LOG COMMAND...
  local name=$1 log=$2
  shift 2
  mkdir -p "$(dirname "$log")"
  setsid "$@" >"$log" 2>&1 &
  bg_pid[$name]=$!
}
wait_bg() {  # NAME LOG: its status; its log (the tail when it worked)
  local name=$1 log=$2 rc=0
  wait "${bg_pid[$name]}" || rc=$?
  unset "bg_pid[$name]"
  if [ "$rc" -ne 0 ]; then
    echo "$name failed (exit $rc); the end of $log:" >&2
    tail -n 80 "$log" >&2
    return "$rc"
  fi
  tail -n 3 "$log"
}

stage "1/4 release build and suite, then the Python package's tests"
# build/venv: the Python package (pip install .) with NumPy, PyTorch and
# transformers from PyPI; its NumPy also runs the crosscheck test. Its build tools
# come first (configuring the extension module needs nanobind); the rest installs
# while the build runs (pip's downloads need little CPU).
venv=build/venv
./scripts/python-env.sh --build-tools
start_bg python-env build/logs/python-env.log ./scripts/python-env.sh
# The build also compiles the extension module itself (with its CUDA path where nvcc
# is found) and checks that it imports: python.module_imports.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPARSEVLM_BUILD_BENCH=ON \
  -DSPARSEVLM_PYTHON="$PWD/$venv/bin/python" \
  -DSPARSEVLM_BUILD_PYTHON=ON -DPython_EXECUTABLE="$PWD/$venv/bin/python"
cmake --build build -j"$jobs"
wait_bg python-env build/logs/python-env.log
# The vLLM venv (stage 2) installs while the tests run: it needs build/venv.
[ "$quick" = 1 ] || start_bg vllm-env build/logs/vllm-env.log ./scripts/vllm-env.sh
ctest --test-dir build --output-on-failure -j"$jobs"
# The package against the CLI and the cases, Hugging Face generate() with pruning, and the
# two-process tensor-parallel demo.
SPARSEVLM_CLI="$PWD/build/examples/sparsevlm" "$venv/bin/python" -m pytest -q tests/python
[ "$quick" = 1 ] && exit 0

stage "2/4 the vLLM plugin on vLLM's CPU build"
wait_bg vllm-env build/logs/vllm-env.log
# Stage 3's build compiles while the vLLM tests run (their engines keep about one
# core busy). Line tables only (-g1): a report still names each frame's file and line,
# and the build compiles about a tenth faster than with full debug information.
start_bg asan-build build/logs/asan-build.log bash -c \
  "cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-g1 \
     -DSPARSEVLM_SANITIZE=ON &&
   cmake --build build-asan -j$jobs"
build/venv-vllm/bin/python -m pytest -q tests/vllm

stage "3/4 AddressSanitizer + UBSan build and suite"
wait_bg asan-build build/logs/asan-build.log
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs"

stage "4/4 libFuzzer, 20 s per target"
cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DSPARSEVLM_FUZZ=ON \
  -DSPARSEVLM_BUILD_TESTS=OFF -DSPARSEVLM_BUILD_EXAMPLES=OFF
cmake --build build-fuzz -j"$jobs"
scratch=$(mktemp -d)
for t in npy case step; do
  mkdir -p "$scratch/$t"
  ./build-fuzz/tests/fuzz/fuzz_$t -max_total_time=20 -print_final_stats=1 \
    -artifact_prefix="$scratch/" "$scratch/$t" tests/fuzz/corpus/$t 2>&1 | tail -n 3
done
echo "all tests passed (${SECONDS} s)"
