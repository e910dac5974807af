#!/usr/bin/env bash
# Times one LLaVA-1.5-7B-shaped SparseVLM pruning step with this library's CLI and
# with the authors' PyTorch pipeline (bench/pytorch_step.py) on the same case folder,
# one thread each, and prints both medians and their ratio. Run from the repo root:
#
#   bash bench/compare_pytorch.sh
#
# Environment:
#   BUILD_DIR               cmake build folder (default build-torch)
#   SPARSEVLM_TORCH_PYTHON  a python that already has torch and numpy (e.g. Debian's
#                           /usr/bin/python3 with python3-torch); skips the venv
#   TORCH_VENV              venv folder (default build-torch-venv)
#   REPEAT                  timed repetitions for both (default 30)
#   JOBS                    build parallelism (default 1)
set -euo pipefail

cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-torch}
TORCH_VENV=${TORCH_VENV:-build-torch-venv}
REPEAT=${REPEAT:-30}
JOBS=${JOBS:-1}
CASE_DIR="$BUILD_DIR/demo_case"

# (a) a python with torch
if [[ -n "${SPARSEVLM_TORCH_PYTHON:-}" ]]; then
  PY=$SPARSEVLM_TORCH_PYTHON
  "$PY" -c 'import torch, numpy' || { echo "compare_pytorch: $PY lacks torch or numpy" >&2; exit 2; }
else
  PY=$TORCH_VENV/bin/python
  if ! [[ -x $PY ]] || ! "$PY" -c 'import torch, numpy' 2>/dev/null; then
    echo "== making $TORCH_VENV with torch (CPU) and numpy" >&2
    python3 -m venv "$TORCH_VENV"
    "$PY" -m pip install -q --upgrade pip
    # The CPU-only wheel index is much smaller; PyPI's default Linux wheel brings CUDA
    # libraries along (several GB) but runs on the CPU all the same.
    if ! "$PY" -m pip install -q --timeout 30 --retries 1 torch \
        --index-url https://download.pytorch.org/whl/cpu; then
      echo "== the CPU wheel index is unreachable; installing torch from PyPI" >&2
      "$PY" -m pip install -q torch
    fi
    "$PY" -m pip install -q numpy
  fi
fi

# (b) our CLI and demo
CLI=$BUILD_DIR/examples/sparsevlm
DEMO=$BUILD_DIR/examples/sparsevlm_demo
if ! [[ -x $CLI && -x $DEMO ]]; then
  echo "== building sparsevlm_cli and sparsevlm_demo in $BUILD_DIR" >&2
  cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DSPARSEVLM_BUILD_TESTS=OFF >/dev/null
  cmake --build "$BUILD_DIR" --target sparsevlm_cli sparsevlm_demo -j"$JOBS"
fi

# (c) the demo's synthetic step as a case folder, with our library's result as its
# expected/ (pytorch_step.py checks its rank, keep count and keep set against it)
"$DEMO" "$CASE_DIR" >/dev/null
"$CLI" run "$CASE_DIR" "$CASE_DIR/expected"

# (d) both, one thread
echo "== sparsevlm bench $CASE_DIR --repeat $REPEAT" >&2
OURS_OUT=$("$CLI" bench "$CASE_DIR" --repeat "$REPEAT")
echo "== bench/pytorch_step.py $CASE_DIR --threads 1 --repeat $REPEAT" >&2
TORCH_OUT=$("$PY" bench/pytorch_step.py "$CASE_DIR" --threads 1 --repeat "$REPEAT")

OURS_OUT=$OURS_OUT TORCH_OUT=$TORCH_OUT "$PY" - <<'EOF'
import json, os, re

ours_raw, torch_raw = os.environ["OURS_OUT"], os.environ["TORCH_OUT"]


def number(v):
    """A stage entry: a number, or an object holding the milliseconds among other figures."""
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        for k in ("median_ms", "ms", "time_ms", "median"):
            if isinstance(v.get(k), (int, float)):
                return float(v[k])
    return None


def ours_total(raw):
    # The CLI prints one JSON object whose "median_ms" holds "total" and the stages.
    for line in raw.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            j = json.loads(line)
        except ValueError:
            continue
        for holder in (j.get("median_ms"), j.get("stages"), j):
            if isinstance(holder, dict):
                for key in ("total", "step"):
                    if key in holder and number(holder[key]) is not None:
                        return number(holder[key])
        if isinstance(j.get("median_ms"), (int, float)):
            return float(j["median_ms"])
    # A text table: the line starting with "total" or "step", first number on it.
    for line in raw.splitlines():
        s = line.strip()
        if s.startswith(("total", "step")):
            m = re.search(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", re.sub(r"^\w+", "", s))
            if m:
                return float(m.group())
    return None


t = json.loads(torch_raw.strip().splitlines()[-1])
o = ours_total(ours_raw)
print(f"case: {t['case']}  shapes: {t['shapes']}  rank {t['rank']}, keep {t['keep_count']}")
print(f"PyTorch {t['torch_version']}, {t['threads']} thread: median {t['median_ms']:.2f} ms")
print("  stages (median ms): " + ", ".join(f"{k} {v:.3f}" for k, v in t["stages_ms"].items()))
if "check" in t:
    print(f"  agrees with expected/result.json: {t['check']['agree']}")
if o is None:
    print("sparsevlm bench: could not find the total median; raw output:")
    print(ours_raw)
else:
    print(f"sparsevlm (this library), 1 thread: median {o:.2f} ms")
    try:
        stages = json.loads(ours_raw.strip().splitlines()[-1])["median_ms"]
        print("  stages (median ms): " + ", ".join(
            f"{k} {number(v):.3f}" for k, v in stages.items() if k != "total" and number(v) is not None))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass
    print(f"PyTorch / sparsevlm: {t['median_ms'] / o:.2f}x")
EOF
