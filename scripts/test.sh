#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian/Ubuntu machine, builds libturbomoe (CUDA
# kernels too whenever nvcc is present), installs the Python package, and runs every CPU test:
# GoogleTest through CTest, then pytest. Exits non-zero on any failure or if a suite ran no test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

echo "== system packages"
need=()
for pkg in cmake ninja-build g++ libgtest-dev clang-format; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

echo "== python packages"
python3 -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
python3 -c 'import torch' 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q "transformers==5.17.0" safetensors numpy tqdm PyYAML matplotlib \
  peft pytest ruff "scikit-build-core>=0.10"

echo "== build + install (libturbomoe, C++ tests, Python package)"
require_cuda=OFF
if [ "${TM_REQUIRE_CUDA:-}" = 1 ] || command -v nvcc >/dev/null 2>&1; then require_cuda=ON; fi
# Two architectures keep CI's compile time down; the default build adds nothing else either.
python3 -m pip install -q --no-build-isolation --no-deps \
  -Ccmake.define.TM_REQUIRE_CUDA="$require_cuda" .

echo "== lint"
ruff check python tests
ruff format --check python tests
find csrc include -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' |
  xargs clang-format --dry-run -Werror

echo "== C++ tests"
ctest --test-dir build/py --output-on-failure --no-tests=error -j2

echo "== Python tests"
# Run against the installed package, not the source tree, from a directory outside the repo.
repo=$(pwd)
(cd /tmp && python3 -m pytest -q -p no:cacheprovider "$repo/tests/python")
echo "== all tests passed"
