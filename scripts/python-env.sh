#!/usr/bin/env bash
# Makes build/venv: a virtual environment holding the sparsevlm Python package
# built from this checkout (`pip install .`: scikit-build-core + nanobind, the same
# headers) and what the Python tests and examples need from PyPI: NumPy, PyTorch,
# transformers, pytest, and nanobind (for CMake builds of the extension, such
# as the test build's CUDA-enabled one). Run ./scripts/setup.sh first (compiler, CMake, the Debian
# -dev packages the build reads). A second run keeps what is installed and
# rebuilds the package (incrementally, in build-python/).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/venv
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p build
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import numpy, torch, transformers, pytest, nanobind" 2>/dev/null; then
  echo "python-env: installing numpy torch transformers pytest nanobind from PyPI into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check numpy torch transformers pytest nanobind
fi
echo "python-env: pip install . (the sparsevlm package)"
"$venv/bin/pip" install -q --disable-pip-version-check .
"$venv/bin/python" -c "import sparsevlm; print('python-env: sparsevlm', sparsevlm.__version__, 'kernels:', sparsevlm.isa())"
