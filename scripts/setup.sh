#!/usr/bin/env bash
# Installs the build and test dependencies of sparsevlm from Debian's packages.
# Idempotent: packages already present are left alone, so a second run is a no-op.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libeigen3-dev libxsimd-dev doctest-dev libbenchmark-dev libdlpack-dev
  nlohmann-json3-dev libcli11-dev
  clang libclang-rt-dev xxd
  python3 python3-venv python3-dev libpng-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages already installed"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
