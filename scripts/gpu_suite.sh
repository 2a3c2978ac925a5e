#!/usr/bin/env bash
# The GPU suite: the one script to run on the GPU machine. Everything it writes goes under
# ${OUT:-out}: one log per stage, gpu_pytest.xml, bench.json / bench.png / bench.txt, env.txt.
#
# Stages: build (cmake + ninja, CUDA required, sm_90a) -> ctest -> the grouped GEMM through the
# library (bench/grouped_gemm_bench.py: edge cases, then each pass on the Qwen3-30B-A3B expert
# shapes checked and timed against torch._grouped_mm; then bench/l2_bandwidth.cu's L2 and DRAM
# ceilings, printed beside it) -> compute-sanitizer memcheck on
# a subset of the GPU op tests -> the GPU pytest suite -> the 12-layer benchmark, the AdamW
# step benchmark (bench/optim_bench.py) and a kernel boundary's cost with and without
# programmatic dependent launch (bench/launch_gap_bench.py) -> `turbomoe
# finetune` with a model path on one GPU and under torchrun (scripts/finetune_device.sh). Each
# stage's
# exit status is recorded and a failing stage does not stop the later ones (except that nothing
# runs without a library); the summary table is printed last, and the script exits non-zero if
# any stage failed. The logs end up in one logs.tar.gz (the device tool brings back at most 8
# files): what comes back is logs.tar.gz, gpu_pytest.xml, bench.json/.png/.txt, profile.md and
# summary.txt (the summary table).
#
# The whole suite on one GPU takes more than one 10-minute device call (H100, nineteenth
# session: pytest 567 s, of which the fp32 tests 209 s; sanitizer 150-320 s, bench + finetune
# ~200 s); split it over calls on the same warm machine (the build is kept between calls):
#   SKIP_SANITIZER=1 SKIP_BENCH=1 SKIP_FINETUNE=1 SKIP_MULTIGPU=1 PYTEST_K=fp32
#     PYTEST_TIMEOUT=420 SUITE_BUDGET=585
#   SKIP_CTEST=1 SKIP_GEMM=1 SKIP_SANITIZER=1 SKIP_BENCH=1 SKIP_FINETUNE=1 SKIP_MULTIGPU=1
#     PYTEST_K="not fp32" PYTEST_TIMEOUT=570 SUITE_BUDGET=585
#   SKIP_CTEST=1 SKIP_GEMM=1 SKIP_PYTEST=1 SUITE_BUDGET=585
# Not yet tried on the device (twentieth session): the whole pytest in one call with
# PYTEST_WORKERS=4 (pytest-xdist is on the device image; its time is mostly CPU-side references
# on 16 cores), e.g. SKIP_SANITIZER=1 SKIP_BENCH=1 SKIP_FINETUNE=1 SKIP_MULTIGPU=1
# PYTEST_WORKERS=4 PYTEST_TIMEOUT=480 SUITE_BUDGET=585.
#
# Knobs (environment):
#   OUT=out                 output folder
#   SKIP_TESTS=1            skip ctest, sanitizer and pytest (the build still runs)
#   SKIP_CTEST=1 / SKIP_SANITIZER=1 / SKIP_PYTEST=1   skip that stage only
#   SKIP_GEMM=1             skip the grouped-GEMM stage; GEMM_ARGS="..." replaces its bench flags
#   SKIP_BENCH=1            skip the benchmark
#   SKIP_FINETUNE=1         skip the finetune runs
#   SKIP_MULTIGPU=1         skip the multi-GPU stage (with 2+ GPUs: bench/ep_dispatch_bench.py,
#                           then `torchrun -m turbomoe.bench` over every GPU; MULTI_BENCH_ARGS;
#                           MULTI_BENCH_ARGS2, when set, a second torchrun bench after it)
#   BENCH_ARGS="..."        extra `python -m turbomoe.bench` flags (word-split; later flags win,
#                           e.g. BENCH_ARGS="--layers 4 --profile --record")
#   SANITIZER_K="..."       pytest -k expression for the memcheck subset of test_gpu_ops.py
#   SANITIZER_MIN_FREE_GIB=24  a fresh memcheck process once a test leaves less free memory
#   PYTEST_ARGS="..."       extra pytest flags for the GPU suite (word-split)
#   PYTEST_K="..."          a pytest -k expression for the GPU suite (one argument, spaces kept)
#   PYTEST_WORKERS=0        N > 0: the GPU pytest in N pytest-xdist processes sharing the GPU
#                           (most of its time is CPU-side references; the device has 16 cores)
#   JOBS=16  BUILD_DIR=build/gpu  CUDA_ARCHS=90a-real  PYTHON=python3
#   PREBUILT_LIB=path       use this libturbomoe.so (built here for 90a, brought with `carry`)
#                           instead of building, if it loads; a turbomoe_tests binary beside it
#                           is run as the ctest stage (scripts/prebuild_device.sh makes both)
#   *_TIMEOUT               per-stage limits in seconds (BUILD, CTEST, SANITIZER, PYTEST, BENCH)
#   SUITE_BUDGET=560        seconds for all stages together: a stage is cut to what is left, so
#                           the summary always prints within ~9.5 minutes
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD_DIR=${BUILD_DIR:-build/gpu}
JOBS=${JOBS:-16}
CUDA_ARCHS=${CUDA_ARCHS:-90a-real}
PYTHON=${PYTHON:-python3}
SKIP_TESTS=${SKIP_TESTS:-0}
SKIP_SANITIZER=${SKIP_SANITIZER:-0}
SKIP_CTEST=${SKIP_CTEST:-0}
SKIP_PYTEST=${SKIP_PYTEST:-0}
SKIP_GEMM=${SKIP_GEMM:-0}
# 32k routed rows (the 12-layer bench's), the model's skewed routing and balanced; timed beside
# ours: the grad-weight schedule before the ranked one (nobalance) and the opt-in SwiGLU epilogue
# instead of the gate/up GEMM followed by the activation kernel (gated).
GEMM_ARGS=${GEMM_ARGS:---rows 32768 --routing model,balanced --passes fwd,fwd_gated,dx,dw --variants default,nobalance,gated --reps 20 --rounds 2}
SKIP_BENCH=${SKIP_BENCH:-0}
SKIP_FINETUNE=${SKIP_FINETUNE:-0}
SKIP_MULTIGPU=${SKIP_MULTIGPU:-0}
MULTI_BENCH_ARGS=${MULTI_BENCH_ARGS:---layers 12}
MULTI_BENCH_ARGS2=${MULTI_BENCH_ARGS2:-}
export MULTI_BENCH_ARGS2
BENCH_ARGS=${BENCH_ARGS:-}
PYTEST_ARGS=${PYTEST_ARGS:-}
# bf16 cases without the largest shapes: memcheck slows every kernel (torch's included) 10-100x.
SANITIZER_K=${SANITIZER_K:-bf16 and not 4096 and not 151936 and not 131072}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-300}
CTEST_TIMEOUT=${CTEST_TIMEOUT:-120}
GEMM_TIMEOUT=${GEMM_TIMEOUT:-150}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-240}
SANITIZER_MIN_FREE_GIB=${SANITIZER_MIN_FREE_GIB:-24}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
FINETUNE_TIMEOUT=${FINETUNE_TIMEOUT:-260}
MULTIGPU_TIMEOUT=${MULTIGPU_TIMEOUT:-240}
# Whole-suite budget: a stage gets at most what is left of it, so the summary is always printed
# before an outer limit (10 minutes per command on the device) kills the script.
SUITE_BUDGET=${SUITE_BUDGET:-560}

LIB=$ROOT/$BUILD_DIR/libturbomoe.so
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
# The package is used from the source tree, with the library just built.
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
export TURBOMOE_LIBRARY=$LIB

declare -A STATUS DETAIL
ORDER=(build ctest gemm sanitizer pytest bench finetune multigpu)
for s in "${ORDER[@]}"; do STATUS[$s]=skipped; DETAIL[$s]=""; done

# run_stage NAME TIMEOUT_S CMD... : runs CMD with its output in $OUT/NAME.log; sets RC.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS left=$((SUITE_BUDGET - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    echo "== $name: not run, the suite budget (${SUITE_BUDGET} s) is spent"
    echo "not run: suite budget spent" >"$OUT/$name.log"
    RC=124
    return
  fi
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  echo "== $name (limit ${limit} s): $*"
  if timeout --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1; then RC=0; else RC=$?; fi
  local took=$((SECONDS - start))
  if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
    echo "   $name: TIMED OUT after ${limit} s (rc $RC)"
  else
    echo "   $name: rc $RC (${took} s)"
  fi
  if [ "$RC" -ne 0 ]; then
    echo "   --- last lines of $OUT/$name.log ---"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
  fi
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1 || true
} >"$OUT/env.txt"

# ---- build -------------------------------------------------------------------------------
configure() {
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTM_REQUIRE_CUDA=ON \
    -DTM_CUDA_ARCHITECTURES="$CUDA_ARCHS" "$@"
}
build() {
  set -euo pipefail
  local tests=ON
  if ! configure -DTM_BUILD_TESTS=ON; then
    # The C++ tests need GoogleTest; without it build the library alone and say so.
    echo "configure with tests failed; retrying without the GoogleTest suite"
    configure -DTM_BUILD_TESTS=OFF
    tests=OFF
  fi
  echo "TM_BUILD_TESTS=$tests"
  cmake --build "$BUILD_DIR" -j "$JOBS"
}
# `timeout` runs programs, not shell functions: hand the functions to a child bash.
export -f configure build
export ROOT BUILD_DIR CUDA_ARCHS JOBS
# PREBUILT_LIB: a libturbomoe.so built elsewhere for sm_90a (it links neither Python nor torch and
# carries its CUDA runtime), brought along with the device tool's `carry`; the build stage is
# skipped when it loads here (it saves the build's minutes of a 10-minute call), else it builds.
if [ -n "${PREBUILT_LIB:-}" ] && [ -f "$PREBUILT_LIB" ] &&
  "$PYTHON" -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$PREBUILT_LIB" >"$OUT/build.log" 2>&1; then
  LIB=$(cd "$(dirname "$PREBUILT_LIB")" && pwd)/$(basename "$PREBUILT_LIB")
  export TURBOMOE_LIBRARY=$LIB
  echo "TM_BUILD_TESTS=OFF (prebuilt library $LIB)" >>"$OUT/build.log"
  echo "== build: using the prebuilt $LIB"
  RC=0
  USED_PREBUILT=1
else
  if [ -n "${PREBUILT_LIB:-}" ]; then echo "== build: PREBUILT_LIB=$PREBUILT_LIB does not load here"; fi
  run_stage build "$BUILD_TIMEOUT" bash -c build
fi
if [ "$RC" -eq 0 ] && [ -f "$LIB" ]; then
  STATUS[build]=ok
  DETAIL[build]="$BUILD_DIR ($CUDA_ARCHS)"
  if [ "${USED_PREBUILT:-0}" = 1 ]; then
    DETAIL[build]="prebuilt $PREBUILT_LIB"
  elif grep -q "TM_BUILD_TESTS=OFF" "$OUT/build.log"; then
    DETAIL[build]+="; no GoogleTest: C++ tests not built"
  fi
else
  STATUS[build]=FAILED
  DETAIL[build]="rc $RC; see build.log"
fi

# ---- tests -------------------------------------------------------------------------------
if [ "${STATUS[build]}" != ok ]; then
  for s in ctest gemm sanitizer pytest bench finetune multigpu; do DETAIL[$s]="no library"; done
elif [ "$SKIP_TESTS" = 1 ]; then
  for s in ctest gemm sanitizer pytest; do DETAIL[$s]="SKIP_TESTS=1"; done
else
  # ctest
  prebuilt_tests=$(dirname "${PREBUILT_LIB:-.}")/turbomoe_tests
  if [ "$SKIP_CTEST" = 1 ]; then
    DETAIL[ctest]="SKIP_CTEST=1"
  elif [ "${USED_PREBUILT:-0}" = 1 ] && [ -x "$prebuilt_tests" ]; then
    # The GoogleTest binary built beside the prebuilt library (it links that library and the
    # system's libstdc++), run directly: there is no CTest tree here.
    run_stage ctest "$CTEST_TIMEOUT" env LD_LIBRARY_PATH="$(dirname "$LIB")" "$prebuilt_tests" \
      --gtest_brief=1
    passed=$(grep -Eo "\[  PASSED  \] [0-9]+" "$OUT/ctest.log" | grep -Eo "[0-9]+" || echo 0)
    failed=$(grep -Eo "\[  FAILED  \] [0-9]+ tests?" "$OUT/ctest.log" | grep -Eo "[0-9]+" || echo 0)
    DETAIL[ctest]="$passed/$((passed + failed)) passed (prebuilt turbomoe_tests)"
    if [ "$RC" -eq 0 ]; then STATUS[ctest]=ok; else STATUS[ctest]=FAILED; fi
  elif grep -q "TM_BUILD_TESTS=OFF" "$OUT/build.log"; then
    DETAIL[ctest]="GoogleTest missing"
  else
    run_stage ctest "$CTEST_TIMEOUT" ctest --test-dir "$BUILD_DIR" --output-on-failure -j 8 --timeout 100
    # "100% tests passed out of 233" or "97% tests passed, 7 tests failed out of 233"
    line=$(grep -E "% tests passed.* out of [0-9]+" "$OUT/ctest.log" | tail -n 1 || true)
    if [[ $line =~ out\ of\ ([0-9]+) ]]; then
      total=${BASH_REMATCH[1]} failed=0
      if [[ $line =~ ([0-9]+)\ tests?\ failed ]]; then failed=${BASH_REMATCH[1]}; fi
      DETAIL[ctest]="$((total - failed))/$total passed"
    else
      DETAIL[ctest]="no result line (rc $RC)"
    fi
    if [ "$RC" -eq 0 ]; then STATUS[ctest]=ok; else STATUS[ctest]=FAILED; fi
  fi

  # The grouped GEMM through the library's C ABI: correctness of every pass and variant first
  # (a wrong result fails the stage), then the timings against torch._grouped_mm (gemm.txt).
  if [ "$SKIP_GEMM" = 1 ]; then
    DETAIL[gemm]="SKIP_GEMM=1"
  else
    read -r -a gemm_args <<<"$GEMM_ARGS"
    # shellcheck disable=SC2016 # $1 and $@ belong to the inner shell
    run_stage gemm "$GEMM_TIMEOUT" bash -c '
      out=$1; shift
      "$@" >"$out/gemm.txt"' _ "$OUT" \
      "$PYTHON" bench/grouped_gemm_bench.py --impl native --lib "$LIB" --json "$OUT/gemm.json" \
      "${gemm_args[@]}"
    DETAIL[gemm]=$("$PYTHON" - "$OUT/gemm.json" <<'PY' 2>/dev/null || echo "no gemm.json (rc $RC)"
import json
import sys

p = json.load(open(sys.argv[1]))
edge_ok = all(r.get("ok", r.get("status") == "declined") for r in p["edge"])
rows = [r for r in p["rows"] if "speedup" in r]
wrong = [r for r in p["rows"] if not r.get("ok", False)]
slowest = min(rows, key=lambda r: r["speedup"]) if rows else None
parts = [f"edge cases {'ok' if edge_ok else 'WRONG'}", f"{len(p['rows']) - len(wrong)}/{len(p['rows'])} passes correct"]
if slowest is not None:
    parts.append(
        f"slowest vs _grouped_mm {slowest['speedup']:.2f}x ({slowest['shape']} {slowest['routing']} "
        f"{slowest['pass']})"
    )
print("; ".join(parts))
PY
    )
    if [ "$RC" -eq 0 ]; then STATUS[gemm]=ok; else STATUS[gemm]=FAILED; fi
    # The TMA unit's L2 and DRAM ceilings in the GEMM's stages (bench/l2_bandwidth.cu, seconds):
    # printed beside gemm.txt, informational (it fails no stage).
    if command -v nvcc >/dev/null 2>&1; then
      mkdir -p "$BUILD_DIR"
      { nvcc -std=c++20 -O3 -arch=sm_90a -I csrc -I include -o "$BUILD_DIR/l2_bandwidth" \
          bench/l2_bandwidth.cu && timeout 60 "$BUILD_DIR/l2_bandwidth"; } \
        >"$OUT/l2_bandwidth.txt" 2>&1 || echo "l2_bandwidth: rc $?" >>"$OUT/l2_bandwidth.txt"
    fi
  fi

  # compute-sanitizer memcheck on a subset of the GPU op tests. Without the caching allocator
  # every torch tensor is its own cudaMalloc, so memcheck sees the true bounds of each buffer.
  ops_tests=tests/python/gpu/test_gpu_ops.py
  if [ "$SKIP_SANITIZER" = 1 ]; then
    DETAIL[sanitizer]="SKIP_SANITIZER=1"
  elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    DETAIL[sanitizer]="compute-sanitizer not found"
    STATUS[sanitizer]=FAILED
  elif [ ! -f "$ops_tests" ]; then
    DETAIL[sanitizer]="$ops_tests missing"
  else
    san_opts=(--tool memcheck --error-exitcode 86)
    san_help=$(compute-sanitizer --help 2>&1 || true)
    # Only memory errors count: torch makes CUDA API calls that fail on purpose (probing), and
    # pytest's children (if any) are checked too. Options the installed version lacks are left out.
    for opt in "--report-api-errors no" "--leak-check no" "--target-processes all"; do
      if grep -q -- "${opt% *}" <<<"$san_help"; then read -r -a kv <<<"$opt"; san_opts+=("${kv[@]}"); fi
    done
    # In rounds of fresh processes (scripts/memcheck_rounds.py): under memcheck the memory of
    # freed tensors did not come back within a process, and the subset outgrew the device.
    run_stage sanitizer "$SANITIZER_TIMEOUT" env TURBOMOE_GPU_TESTS=1 \
      TURBOMOE_TEST_MEMORY_LOG="$OUT/sanitizer_memory.log" \
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$PYTHON" scripts/memcheck_rounds.py \
      --min-free-gib "$SANITIZER_MIN_FREE_GIB" --launcher "compute-sanitizer ${san_opts[*]}" \
      -- "$ops_tests" -k "$SANITIZER_K"
    errors=$(grep -Eo "ERROR SUMMARY: [0-9]+" "$OUT/sanitizer.log" | tail -n 1 | grep -Eo "[0-9]+" || true)
    summary=$(grep -E "^[0-9]+ passed, .* rounds$|no tests ran" "$OUT/sanitizer.log" | tail -n 1 || true)
    case $RC in
      0) STATUS[sanitizer]=ok; DETAIL[sanitizer]="clean; ${summary:-?}" ;;
      86) STATUS[sanitizer]=FAILED; DETAIL[sanitizer]="memcheck found ${errors:-some} error(s)" ;;
      5) STATUS[sanitizer]=FAILED; DETAIL[sanitizer]="no test matched -k '$SANITIZER_K'" ;;
      124 | 137) STATUS[sanitizer]=FAILED; DETAIL[sanitizer]="timed out after ${SANITIZER_TIMEOUT} s" ;;
      *)
        STATUS[sanitizer]=FAILED
        DETAIL[sanitizer]="tests failed under memcheck (rc $RC, ${errors:-?} memcheck errors); ${summary:-?}"
        ;;
    esac
  fi

  # The GPU pytest suite (marker gpu; the conftest runs it only with TURBOMOE_GPU_TESTS=1).
  read -r -a pytest_extra <<<"$PYTEST_ARGS"
  if [ -n "${PYTEST_K:-}" ]; then pytest_extra+=(-k "$PYTEST_K"); fi
  if [ "${PYTEST_WORKERS:-0}" -gt 0 ]; then pytest_extra+=(-n "$PYTEST_WORKERS"); fi
  if [ "$SKIP_PYTEST" = 1 ]; then
    DETAIL[pytest]="SKIP_PYTEST=1"
  elif [ "${PYTEST_WORKERS:-0}" -gt 0 ] && ! "$PYTHON" -c "import xdist" 2>/dev/null; then
    STATUS[pytest]=FAILED
    DETAIL[pytest]="PYTEST_WORKERS=$PYTEST_WORKERS but pytest-xdist is not installed"
  else
  # Workers share the cores: each one's CPU-side references get their share of the threads.
  threads=()
  if [ "${PYTEST_WORKERS:-0}" -gt 0 ]; then
    threads=(OMP_NUM_THREADS=$(($(nproc) / PYTEST_WORKERS > 0 ? $(nproc) / PYTEST_WORKERS : 1)))
  fi
  run_stage pytest "$PYTEST_TIMEOUT" env TURBOMOE_GPU_TESTS=1 "${threads[@]}" \
    "$PYTHON" -m pytest tests/python/gpu -q -rfE -p no:cacheprovider \
    --junitxml="$OUT/gpu_pytest.xml" "${pytest_extra[@]}"
  DETAIL[pytest]=$("$PYTHON" - "$OUT/gpu_pytest.xml" <<'PY' 2>/dev/null || echo "no junit report (rc $RC)"
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped, "
      f"{n['tests']} total")
PY
  )
  if [ "$RC" -eq 0 ]; then STATUS[pytest]=ok; else
    STATUS[pytest]=FAILED
    DETAIL[pytest]+=" (pytest rc $RC)"
  fi
  fi
fi

# ---- bench -------------------------------------------------------------------------------
if [ "${STATUS[build]}" = ok ] && [ "$SKIP_BENCH" = 1 ]; then
  DETAIL[bench]="SKIP_BENCH=1"
elif [ "${STATUS[build]}" = ok ]; then
  read -r -a bench_extra <<<"$BENCH_ARGS"
  rm -f "$OUT/bench.json"
  # The table goes to bench.txt, progress and errors to bench.log.
  # shellcheck disable=SC2016 # $1 and $@ belong to the inner shell
  run_stage bench "$BENCH_TIMEOUT" bash -c '
    out=$1; shift
    "$@" >"$out/bench.txt"' _ "$OUT" \
    "$PYTHON" -m turbomoe.bench --layers 12 --json "$OUT/bench.json" --png "$OUT/bench.png" \
    --profile-out "$OUT/profile.md" "${bench_extra[@]}"
  DETAIL[bench]=$("$PYTHON" - "$OUT/bench.json" <<'PY' 2>/dev/null || echo "no bench.json (rc $RC)"
import json
import sys

p = json.load(open(sys.argv[1]))
runs, ratios = p["runs"], p.get("ratios") or {}
def run(name):
    r = runs.get(name)
    if r is None:
        return None
    if r["error"]:
        return f"{name} FAILED ({r['error'][:60]})"
    gib = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    return f"{name} {r['tps_per_gpu']:,.0f} TPS {gib} GiB"
parts = [s for s in (run("hf"), run("turbomoe")) if s]
if ratios.get("speedup"):
    check = ratios["loss_check"]
    mem = "n/a" if ratios["peak_mem"] is None else f"{ratios['peak_mem']:.2f}x"
    parts.append(f"speedup {ratios['speedup']:.2f}x, memory {mem}, "
                 f"loss rel diff {check['rel_diff']:.1e} {'ok' if check['ok'] else 'MISMATCH'}")
print(f"{p['config']['layers']} layers: " + "; ".join(parts))
PY
  )
  bench_rc=$RC
  # The optimizer step, which the bench's TPS excludes and `turbomoe finetune` pays every step.
  run_stage optim 90 "$PYTHON" bench/optim_bench.py --json "$OUT/optim.json"
  optim_rc=$RC
  DETAIL[bench]+=$("$PYTHON" - "$OUT/optim.json" <<'PY' 2>/dev/null || echo "; no optim.json (rc $optim_rc)"
import json
import sys

runs = json.load(open(sys.argv[1]))["runs"]
ms = {name.split(" (")[0]: r["ms"] for name, r in runs.items()}
print(f"; AdamW step of one layer: fused {ms['turbomoe fused']:.2f} ms, tensor ops "
      f"{ms['turbomoe tensor-ops']:.2f}, torch fused bf16 {ms['torch fused']:.2f}")
PY
  )
  # The lean experts' activation backward: one pass against the four it replaced.
  run_stage act_backward 60 "$PYTHON" bench/act_backward_bench.py --json "$OUT/act_backward.json"
  DETAIL[bench]+=$("$PYTHON" - "$OUT/act_backward.json" <<'PY' 2>/dev/null || echo "; no act_backward.json"
import json
import sys

r = json.load(open(sys.argv[1]))
print(f"; activation backward: one pass {r['fused_ms']:.3f} ms, four passes "
      f"{r['four_passes_ms']:.3f}, floor {r['floor_ms']:.3f}, same values {r['same_values']}")
PY
  )
  # A kernel boundary inside a CUDA graph, with and without programmatic dependent launch.
  run_stage launch_gap 60 "$PYTHON" bench/launch_gap_bench.py --json "$OUT/launch_gap.json"
  DETAIL[bench]+=$("$PYTHON" - "$OUT/launch_gap.json" <<'PY' 2>/dev/null || echo "; no launch_gap.json"
import json
import sys

rows = json.load(open(sys.argv[1]))["rows"]
print("; µs a chained RMSNorm in a graph without / with TURBOMOE_PDL: " + ", ".join(
    f"{n} rows {r['no_pdl_us']:.2f}/{r['pdl_us']:.2f}" for n, r in rows.items()))
PY
  )
  if [ "$bench_rc" -eq 0 ] && [ "$optim_rc" -eq 0 ]; then STATUS[bench]=ok; else
    STATUS[bench]=FAILED
    DETAIL[bench]+=" (bench rc $bench_rc, optim bench rc $optim_rc)"
  fi
fi

# ---- finetune ---------------------------------------------------------------------------
if [ "${STATUS[build]}" = ok ] && [ "$SKIP_FINETUNE" = 1 ]; then
  DETAIL[finetune]="SKIP_FINETUNE=1"
elif [ "${STATUS[build]}" = ok ]; then
  run_stage finetune "$FINETUNE_TIMEOUT" env OUT="$OUT" FT_TIMEOUT=$((FINETUNE_TIMEOUT / 3 - 10)) \
    bash scripts/finetune_device.sh
  # "exit N" per run, then each run's throughput line.
  runs=$(grep -c "^exit 0" "$OUT/finetune.log" || true)
  total=$(grep -c "^exit " "$OUT/finetune.log" || true)
  # Named in order: a glob's order depends on the locale (finetune_1gpu_graph.log sorted before
  # finetune_1gpu.log on the device, which swapped the first two figures).
  tps=$(for run in 1gpu 1gpu_graph torchrun; do
    grep -h "^throughput" "$OUT/finetune_$run.log" 2>/dev/null | awk '{print $2}'
  done | paste -sd/ - || true)
  DETAIL[finetune]="${runs}/${total} runs ok; tokens/s ${tps:-?} (1 GPU / 1 GPU CUDA graph / torchrun)"
  if [ "$RC" -eq 0 ] && [ "$total" -gt 0 ] && [ "$runs" = "$total" ]; then
    STATUS[finetune]=ok
  else
    STATUS[finetune]=FAILED
  fi
fi

# ---- multi-GPU: dispatch/combine bandwidth, then the side-by-side bench over every GPU ------
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${STATUS[build]}" != ok ]; then
  :
elif [ "$SKIP_MULTIGPU" = 1 ]; then
  DETAIL[multigpu]="SKIP_MULTIGPU=1"
elif [ "$GPUS" -lt 2 ]; then
  DETAIL[multigpu]="not run: $GPUS GPU(s) on this machine"
else
  read -r -a multi_extra <<<"$MULTI_BENCH_ARGS"
  # shellcheck disable=SC2016 # $1 and $@ belong to the inner shell
  run_stage multigpu "$MULTIGPU_TIMEOUT" bash -c '
    out=$1; gpus=$2; shift 2
    torchrun --standalone --nproc_per_node="$gpus" bench/ep_dispatch_bench.py \
      --json "$out/ep_dispatch.json" >"$out/ep_dispatch.txt" || exit 1
    torchrun --standalone --nproc_per_node="$gpus" -m turbomoe.bench "$@" \
      --json "$out/bench_multi.json" >"$out/bench_multi.txt" || exit 1
    if [ -n "$MULTI_BENCH_ARGS2" ]; then
      read -r -a second <<<"$MULTI_BENCH_ARGS2"
      torchrun --standalone --nproc_per_node="$gpus" -m turbomoe.bench "${second[@]}" \
        --json "$out/bench_multi2.json" >"$out/bench_multi2.txt"
    fi' _ "$OUT" "$GPUS" "${multi_extra[@]}"
  DETAIL[multigpu]=$("$PYTHON" - "$OUT" <<'PY' 2>/dev/null || echo "no results (rc $RC)"
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
parts = []
ep = out / "ep_dispatch.json"
if ep.exists():
    ranks = json.loads(ep.read_text())["ranks"]
    exact = all(v for r in ranks for k, v in r.items() if k.endswith("_exact"))
    mean = lambda k: sum(r[k] for r in ranks) / len(ranks)  # noqa: E731
    peak = next((k for k in ranks[0] if k.startswith("nvlink_push_peak")), None)
    for t in ("nvlink", "nccl"):
        if f"{t}_dispatch_ms" in ranks[0]:
            parts.append(
                f"{t}: dispatch {mean(f'{t}_dispatch_padded_gbs'):.0f} / combine "
                f"{mean(f'{t}_combine_padded_gbs'):.0f} GB/s per GPU"
            )
    parts.append(
        f"{len(ranks)} GPUs; peaks: NVLink push {mean(peak) if peak else 0:.0f}, all-to-all "
        f"{mean('all_to_all_peak_gbs'):.0f} GB/s; exact {'yes' if exact else 'NO'}"
    )
bench = out / "bench_multi.json"
if bench.exists():
    p = json.loads(bench.read_text())
    r = p.get("ratios") or {}
    hf, tm = p["runs"].get("hf", {}), p["runs"].get("turbomoe", {})
    parts.append(
        f"bench {p['config']['layers']} layers: stock {hf.get('tps_per_gpu', 0):,.0f} / "
        f"turbomoe {tm.get('tps_per_gpu', 0):,.0f} TPS/GPU, speedup {r.get('speedup') or 0:.2f}x, "
        f"memory {r.get('peak_mem') or 0:.2f}x"
    )
print("; ".join(parts) or "no results")
PY
  )
  if [ "$RC" -eq 0 ]; then STATUS[multigpu]=ok; else STATUS[multigpu]=FAILED; fi
fi

# ---- summary (printed last) ----------------------------------------------------------------
if [ -s "$OUT/bench.txt" ]; then
  echo
  cat "$OUT/bench.txt"
fi
if [ -s "$OUT/finetune.log" ]; then
  echo
  cat "$OUT/finetune.log"
fi
if [ -s "$OUT/gemm.txt" ]; then
  echo
  sed -n '/^dense peak/,$p' "$OUT/gemm.txt"
fi
if [ -s "$OUT/l2_bandwidth.txt" ]; then
  echo
  cat "$OUT/l2_bandwidth.txt"
fi
for f in ep_dispatch.txt bench_multi.txt bench_multi2.txt; do
  if [ -s "$OUT/$f" ]; then
    echo
    cat "$OUT/$f"
  fi
done
# At most 8 files come back from the device: the logs travel as one archive.
(cd "$OUT" && tar czf logs.tar.gz ./*.log ./*.txt $(ls optim.json launch_gap.json 2>/dev/null) \
  2>/dev/null &&
  rm -f ./*.log env.txt gemm.txt l2_bandwidth.txt ep_dispatch.txt bench_multi.txt bench_multi2.txt \
    optim.json launch_gap.json)
# The summary table also goes to $OUT/summary.txt (written after the archive, so that a caller
# who sent this script's output into $OUT, where the archive step deletes *.log, still has it).
failed=()
for s in "${ORDER[@]}"; do
  if [ "${STATUS[$s]}" = FAILED ]; then failed+=("$s"); fi
done
{
  echo
  echo "=============== turbomoe GPU suite: $(git rev-parse --short HEAD 2>/dev/null || echo '?') ==============="
  printf '%-10s %-8s %s\n' stage status detail
  for s in "${ORDER[@]}"; do
    printf '%-10s %-8s %s\n' "$s" "${STATUS[$s]}" "${DETAIL[$s]}"
  done
  if [ "${#failed[@]}" -gt 0 ]; then
    echo "overall: FAILED (${failed[*]}); logs in $OUT"
  else
    echo "overall: ok; logs in $OUT"
  fi
} | tee "$OUT/summary.txt"
[ "${#failed[@]}" -eq 0 ]
