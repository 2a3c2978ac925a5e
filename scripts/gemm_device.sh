#!/usr/bin/env bash
# Grouped GEMM on the GPU machine in one call: build, check, time, short table last.
#
#   run: bash scripts/gemm_device.sh            (with carry: build-hopper-so)
#
# 1. libhopper_selftest.so (bench/hopper_selftest.cu + csrc/grouped_gemm/hopper_*.cu): the carried
#    prebuilt one when it loads, else built here with nvcc.
# 2. libturbomoe with cmake + ninja in the background (logged; a failure there does not stop the
#    benchmark: other families may be mid-edit). Skip with GEMM_BUILD_LIB=0. Once built, the
#    checks and a 32k-row timing run again through the C ABI (--impl native).
# 3. bench/grouped_gemm_bench.py: edge-case correctness, then every shape / rows / routing / pass
#    checked against a float32 reference and timed against torch._grouped_mm. On a correctness
#    failure the first edge case is re-run under compute-sanitizer.
# Logs go to $OUT (at most 8 files come back). Extra arguments go to the benchmark.
set -uo pipefail
OUT=${OUT:-/tmp/gemm_out}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv >"$OUT/env.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' >>"$OUT/env.txt" 2>&1
nvcc --version | tail -1 >>"$OUT/env.txt" 2>&1

LIB_PID=""
if [ "${GEMM_BUILD_LIB:-1}" != "0" ]; then
  (
    cmake -S . -B build-device -G Ninja -DTM_BUILD_TESTS=OFF \
      -DTM_CUDA_ARCHITECTURES='90a-real;80-virtual' &&
      ninja -C build-device -j 12
  ) >"$OUT/lib_build.log" 2>&1 &
  LIB_PID=$!
fi

SO=build-hopper-so/libhopper_selftest.so
if ! python3 -c "import ctypes,sys; ctypes.CDLL(sys.argv[1])" "$SO" 2>/dev/null; then
  stamp "building $SO with nvcc"
  mkdir -p build-hopper-so
  nvcc -std=c++20 -O3 -shared -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a \
    -I include -I csrc --expt-relaxed-constexpr -lineinfo \
    bench/hopper_selftest.cu csrc/grouped_gemm/hopper_gemm.cu -o "$SO" >"$OUT/so_build.log" 2>&1 ||
    { stamp "selftest build FAILED"; tail -30 "$OUT/so_build.log"; exit 1; }
fi

stamp "edge cases + benchmark"
timeout -k 5 "${GEMM_BENCH_TIMEOUT:-240}" python3 bench/grouped_gemm_bench.py --impl hopper \
  --lib "$SO" --json "$OUT/bench.json" "$@" >"$OUT/bench.log" 2>&1
RC=$?
stamp "benchmark exit $RC"
if [ $RC -ne 0 ] && command -v compute-sanitizer >/dev/null; then
  stamp "compute-sanitizer on the edge cases"
  timeout -k 5 90 compute-sanitizer --tool memcheck python3 bench/grouped_gemm_bench.py \
    --impl hopper --lib "$SO" --rows 1024 --shapes down --routing skewed --reps 1 --warmup 0 \
    --sets 1 >"$OUT/sanitizer.log" 2>&1
  grep -m 20 -E "ERROR|Invalid|error" "$OUT/sanitizer.log"
fi

# dw with float32 output (the fragment-store epilogue), one configuration.
timeout -k 5 60 python3 bench/grouped_gemm_bench.py --impl hopper --lib "$SO" --skip-edge \
  --rows 32768 --routing balanced --passes dw --dw-dtype fp32 --rounds 1 >"$OUT/dw_fp32.log" 2>&1

NATIVE="not run"
if [ -n "$LIB_PID" ]; then
  # Give the library build at most 90 s more: device time is scarce.
  for _ in $(seq 90); do kill -0 "$LIB_PID" 2>/dev/null || break; sleep 1; done
  if kill -0 "$LIB_PID" 2>/dev/null; then
    kill "$LIB_PID"; stamp "libturbomoe build: still running, stopped"
  elif wait "$LIB_PID"; then
    stamp "libturbomoe build: ok"
    # The same checks through the C ABI (tm_grouped_gemm_*: validation + dispatch + kernel).
    timeout -k 5 90 python3 bench/grouped_gemm_bench.py --impl native \
      --lib build-device/libturbomoe.so --rows 32768 --routing skewed --rounds 1 --reps 10 \
      --json "$OUT/native.json" >"$OUT/native.log" 2>&1 && NATIVE=PASS || NATIVE="FAIL ($?)"
    stamp "C ABI path: $NATIVE"
  else
    stamp "libturbomoe build: FAILED"; grep -m 10 -E "error|FAILED" "$OUT/lib_build.log"
  fi
fi

cat "$OUT/env.txt"
grep -E "FAIL|declined|Error|error" "$OUT/bench.log" | head -20
echo "dw with float32 output:"; sed -n '/^shape/,$p' "$OUT/dw_fp32.log"
[ -f "$OUT/native.log" ] && { echo "C ABI path (native):"; sed -n '/^shape/,$p' "$OUT/native.log"; }
# The short table is the end of the benchmark's log.
sed -n '/^dense peak/,$p' "$OUT/bench.log"
[ $RC -eq 0 ] || tail -25 "$OUT/bench.log"
exit $RC
