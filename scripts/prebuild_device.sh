#!/usr/bin/env bash
# Builds libturbomoe and its GoogleTest binary here for the GPU machine (sm_90a, CUDA required)
# and copies both into .prebuilt/ (in .gitignore), so that a device call can
# bring them with `carry` and skip the build (minutes of a 10-minute call):
#   scripts/prebuild_device.sh
#   run(carry=[".prebuilt"], command="PREBUILT_LIB=.prebuilt/libturbomoe.so ... scripts/gpu_suite.sh")
# The library links neither Python nor torch and carries its CUDA runtime; the suite falls back
# to building on the device if it does not load there.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build/device}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTM_REQUIRE_CUDA=ON \
  -DTM_CUDA_ARCHITECTURES=90a-real -DTM_BUILD_TESTS=ON >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
mkdir -p .prebuilt
cp "$BUILD_DIR/libturbomoe.so" "$BUILD_DIR/turbomoe_tests" .prebuilt/
ls -l .prebuilt/
