#!/usr/bin/env bash
# Makes build/venv: a virtual environment holding the sparsevlm Python package
# built from this checkout (`pip install .`: scikit-build-core + nanobind, the same
# headers) and what the Python tests and examples need from PyPI: NumPy, PyTorch,
# transformers, pytest, and the build tools nanobind and scikit-build-core (the
# package is built without an isolated build environment, and the test build
# compiles the extension again, with its CUDA path). Run ./scripts/setup.sh first
# (compiler, CMake, the Debian -dev packages the build reads). A second run keeps what is installed and
# rebuilds the package (incrementally, in build-python/).
#   --build-tools  only the venv and the build tools (nanobind, scikit-build-core: a few
#                  seconds), what configuring the extension module needs; test.sh
#                  configures with them while the rest installs.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/venv
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p build
  python3 -m venv "$venv"
fi
tools=(nanobind==3.1.0 scikit-build-core==1.1.2)
if [ "${1:-}" = "--build-tools" ]; then
  if ! "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m
assert m.version("nanobind") == "3.1.0" and m.version("scikit-build-core") == "1.1.2"
PY
  then
    echo "python-env: installing ${tools[*]} from PyPI into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${tools[@]}"
  fi
  exit 0
fi
# Pinned: the versions the tests and examples were written against (the Hugging Face
# example relies on transformers 5.x internals; docs/integration.md lists them).
pins=(numpy torch==2.15.0 transformers==5.24.0 pytest "${tools[@]}")
if ! "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m
want = {"torch": "2.15.0", "transformers": "5.24.0", "nanobind": "3.1.0", "scikit-build-core": "1.1.2"}
assert all(m.version(k).split("+")[0] == v for k, v in want.items())
import numpy, pytest  # noqa: F401
PY
then
  echo "python-env: installing ${pins[*]} from PyPI into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi
echo "python-env: pip install . (the sparsevlm package)"
# The build tools are in the venv (pinned above): no isolated build environment.
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation .
"$venv/bin/python" -c "import sparsevlm; print('python-env: sparsevlm', sparsevlm.__version__, 'kernels:', sparsevlm.isa())"
