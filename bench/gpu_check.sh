#!/usr/bin/env bash
# The GPU check of the CUDA backend, one command on a machine with an NVIDIA GPU,
# within about 10 minutes, writing one log (default build-gpu/gpu_check.log):
#
#   bash bench/gpu_check.sh            # from the repository root
#
#  1. builds the CUDA targets for sm_$ARCH (default 90) in $BUILD (default build-gpu;
#     reused, so a rerun only rebuilds what changed), no Python module;
#  2. runs the GPU CTests (cuda.unit, cuda.example_quickstart: they must pass, not skip);
#  3. runs compute-sanitizer's memcheck, racecheck, synccheck and initcheck over the
#     GPU test (when compute-sanitizer is on PATH or in $CUDA_HOME/bin);
#  4. prints the launch plan of a LLaVA-1.5-7B step (sparsevlm cuda-plan) and the
#     performance model's prediction next to what is measured;
#  5. runs the CUDA benchmarks (CUDA events) per stage and per step at the LLaVA-1.5-7B,
#     LLaVA-NeXT (N 2880) and video (N 4608, 9216) shapes;
#  6. times the authors' PyTorch way of the same step on the same GPU
#     (bench/pytorch_step.py --device cuda) and a Llama-7B decoder layer's bf16 prefill
#     at L = 671 (bench/llama_layer.py), when $PY (default python3) has torch with CUDA.
#
# Each part's status is logged; the script ends with a summary and exits non-zero if
# a test or a sanitizer failed. Environment: BUILD, ARCH, LOG, PY, JOBS, CUDA_HOME.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-gpu}
ARCH=${ARCH:-90}
JOBS=${JOBS:-$(nproc)}
PY=${PY:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
mkdir -p "$BUILD"
LOG=${LOG:-$BUILD/gpu_check.log}
: > "$LOG"
failed=()
log() { echo "== $*" | tee -a "$LOG"; }
run() {  # run NAME TIMEOUT CMD...: logs the command's output and its status
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  log "$name: exit $rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
  return $rc
}

if ! nvidia-smi -L >> "$LOG" 2>&1; then
  log "no NVIDIA GPU here (nvidia-smi -L failed): run this on a GPU machine"
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$LOG" 2>&1
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"

# 1. build
run configure 300 cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DSPARSEVLM_BUILD_BENCH=ON \
  -DSPARSEVLM_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" || { log "configure failed"; exit 1; }
run build 600 cmake --build "$BUILD" -j "$JOBS" --target sparsevlm_cuda_tests \
  sparsevlm_cuda_quickstart sparsevlm_bench_cuda sparsevlm_cli sparsevlm_demo ||
  { log "build failed"; exit 1; }

# 2. GPU tests (a skip here is a failure: there is a GPU)
run ctest 300 ctest --test-dir "$BUILD" -R '^cuda\.(unit|example_quickstart|ptx_flags)$' \
  --output-on-failure --no-tests=error --output-junit "$PWD/$BUILD/gpu_ctest.xml"
if grep -q 'status="notrun"\|status="skipped"\|<skipped' "$BUILD/gpu_ctest.xml" 2>/dev/null; then
  failed+=("a GPU test was skipped on a GPU machine")
fi

# 3. sanitizers
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [[ -x $SAN ]]; then
  for tool in memcheck racecheck synccheck initcheck; do
    run "sanitizer-$tool" 300 "$SAN" --tool "$tool" --error-exitcode 1 \
      "$BUILD/tests/sparsevlm_cuda_tests"
  done
else
  log "compute-sanitizer not found: sanitizers not run"
  failed+=("sanitizers not run (no compute-sanitizer)")
fi

# 4. the launch plan and the model
run cuda-plan 30 "$BUILD/examples/sparsevlm" cuda-plan --model llava-1.5-7b
run cuda-model 30 "$PY" bench/cuda_model.py --cli "$BUILD/examples/sparsevlm" --model llava-1.5-7b

# 5. CUDA benchmarks (CUDA events as manual time)
run bench-cuda 600 "$BUILD/bench/sparsevlm_bench_cuda" \
  --benchmark_filter='BM_cuda_(step|step_separate|batch32|stage|qk)/(7b|13b|anyres|video8|video16)' \
  --benchmark_min_time=0.2 --benchmark_counters_tabular=true

# 6. PyTorch on the same GPU
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  CASE="$BUILD/demo_case"
  [[ -d $CASE ]] || run demo-case 60 "$BUILD/examples/sparsevlm_demo" "$CASE"
  run pytorch-step 300 "$PY" bench/pytorch_step.py "$CASE" --device cuda --repeat 30
  run llama-layer 120 "$PY" bench/llama_layer.py --length 671 --repeat 50
else
  log "$PY has no torch with CUDA: the PyTorch comparison and the Llama layer were not run"
fi

log "summary"
if [[ ${#failed[@]} -eq 0 ]]; then
  log "every part passed; figures above (log: $LOG)"
  exit 0
fi
for f in "${failed[@]}"; do log "FAILED: $f"; done
exit 1
