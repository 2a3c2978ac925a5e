#!/usr/bin/env bash
# Hardware counters of the grouped-GEMM kernels, on the GPU machine, in one call:
#
#   run: NCU_PASSES=dw,fwd NCU_ROUTING=model,balanced NCU_VARIANTS=default,split \
#        bash scripts/gemm_ncu.sh
#        (carry .prebuilt from scripts/prebuild_device.sh, or set LIB)
#
# Runs bench/grouped_gemm_bench.py once per (variant, routing) under Nsight Compute, each pass
# launched a few times, and profiles our kernel's launches only (not _grouped_mm's): speed of
# light (SM, tensor pipe, DRAM), memory workload, warp stall reasons. Reports go to
# $OUT/ncu_*.txt. Clocks stay as they are (--clock-control none): the machine's rules forbid
# changing them.
#
# NCU_SOURCE=1 also samples warp stalls per instruction (SourceCounters) and writes, per run,
# $OUT/stalls_*.txt: the SASS instructions with the most stall samples (which wait the consumers
# and the producer spend their time in: full/empty mbarriers, bulk-store waits, WGMMA waits).
set -uo pipefail
OUT=${OUT:-/tmp/ncu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
LIB=${LIB:-.prebuilt/libturbomoe.so}
PASSES=${NCU_PASSES:-dw,fwd}
ROUTING=${NCU_ROUTING:-model,balanced}
VARIANTS=${NCU_VARIANTS:-default}
SHAPES=${NCU_SHAPES:-gate_up}
ROWS=${NCU_ROWS:-32768}
# Our kernels (not _grouped_mm's): the cooperative kernel and the ping-pong one.
KERNELS=${NCU_KERNELS:-regex:grouped_gemm_kernel|pingpong_row_kernel}
# Launches of our kernel to profile per run: the bench checks each pass once, then times it.
LAUNCHES=${NCU_LAUNCHES:-6}
SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats
  --section ComputeWorkloadAnalysis --section LaunchStats --section Occupancy)
if [ "${NCU_SOURCE:-0}" = 1 ]; then SECTIONS+=(--section SourceCounters); fi
IFS=, read -r -a routings <<<"$ROUTING"
IFS=, read -r -a variants <<<"$VARIANTS"
for variant in "${variants[@]}"; do
  for routing in "${routings[@]}"; do
    name="${variant}_${routing}"
    report="$OUT/ncu_${name}.txt"
    save=()
    if [ "${NCU_SOURCE:-0}" = 1 ]; then save=(-f -o "$OUT/ncu_${name}"); fi
    timeout "${NCU_TIMEOUT:-150}" ncu --clock-control none -k "$KERNELS" \
      -c "$LAUNCHES" "${SECTIONS[@]}" "${save[@]}" --print-summary none \
      python3 bench/grouped_gemm_bench.py --impl native --lib "$LIB" --rows "$ROWS" \
      --shapes "$SHAPES" --routing "$routing" --passes "$PASSES" --reps 1 --warmup 0 \
      --rounds 1 --sets 1 --skip-edge --variants "$variant" >"$report" 2>&1
    echo "ncu ${variant} ${routing}: rc $? ($(grep -cE 'grouped_gemm_kernel|pingpong_row_kernel' "$report") reports)"
    if [ "${NCU_SOURCE:-0}" = 1 ] && [ -f "$OUT/ncu_${name}.ncu-rep" ]; then
      # With -o the sections go to the report file: print them too, then the stall table.
      ncu -i "$OUT/ncu_${name}.ncu-rep" --print-summary none >>"$report" 2>&1
      ncu -i "$OUT/ncu_${name}.ncu-rep" --page source --csv --print-source sass \
        >"$OUT/sass_${name}.csv" 2>"$OUT/sass_${name}.err"
      python3 scripts/ncu_stalls.py "$OUT/sass_${name}.csv" >"$OUT/stalls_${name}.txt" 2>&1
      head -25 "$OUT/stalls_${name}.txt"
    fi
  done
done
