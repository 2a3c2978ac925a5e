#!/usr/bin/env bash
# One-GPU A/B of environment switches on turbomoe's benchmark run, for a device call:
#
#   run(carry=[".prebuilt"], command="AB='base TURBOMOE_GATHER_IN_GEMM=1' bash scripts/ab_one_gpu.sh")
#
#   AB="base VAR=1 VAR=1,OTHER=0"   space-separated runs; "base" changes nothing, otherwise
#                                   comma-separated VAR=VALUE items set for that run
#   AB_ARGS="--layers 12 --only turbomoe --steps 6 --warmup 2"   bench flags of every run
#   AB_REPEAT=1                     rounds over all runs, interleaved (A B A B ...), so that a
#                                   drift of the clock or of the machine favours no variant
#   LIB=.prebuilt/libturbomoe.so    the library (scripts/prebuild_device.sh builds it here)
#
# Each run's JSON and log land in a scratch folder and are packed into ${OUT:-out}/ab.tar.gz at
# the end (a device call brings back at most 8 files from $OUT: loose per-run files crowded out
# the profile of the same call once); the last lines printed are one row per run: TPS/GPU, peak
# GiB, forward and backward ms, first-step loss.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUNS=$(mktemp -d)
# Packed on any exit, a call's time limit (SIGTERM) included.
trap 'tar -czf "$OUT/ab.tar.gz" -C "$RUNS" . && rm -rf "$RUNS"' EXIT
trap 'exit 143' TERM
LIB=${LIB:-.prebuilt/libturbomoe.so}
export PYTHONPATH=$PWD/python TURBOMOE_LIBRARY
TURBOMOE_LIBRARY=$(realpath "$LIB")
AB=${AB:-base}
AB_ARGS=${AB_ARGS:---layers 12 --only turbomoe --steps 6 --warmup 2}
AB_REPEAT=${AB_REPEAT:-1}
read -r -a args <<<"$AB_ARGS"
# row TAG JSON: one summary line of a finished run.
row() {
  python3 - "$1" "$2" <<'PY'
import json
import sys

tag, path = sys.argv[1], sys.argv[2]
run = json.load(open(path))["runs"]["turbomoe"]


def fmt(key: str, spec: str, width: int) -> str:
    value = run.get(key)
    return format(value, spec).rjust(width) if value is not None else "-".rjust(width)


print(
    f"{tag[:60]:60s} {fmt('tps_per_gpu', ',.0f', 10)} {fmt('peak_gib', '.2f', 9)} "
    f"{fmt('fwd_ms_mean', '.1f', 8)} {fmt('bwd_ms_mean', '.1f', 8)} {fmt('first_loss', '.5f', 9)}"
)
PY
}
header() {
  printf '%-60s %10s %9s %8s %8s %9s\n' run TPS/GPU "peak GiB" "fwd ms" "bwd ms" "loss@1"
}
results=()
for round in $(seq 1 "$AB_REPEAT"); do
  for tag in $AB; do
    envs=()
    if [ "$tag" != base ]; then IFS=, read -r -a envs <<<"$tag"; fi
    name=${tag//[^A-Za-z0-9_]/_}_r$round
    json=$RUNS/ab_$name.json
    echo "== $tag (round $round)"
    if ! env "${envs[@]}" python3 -m turbomoe.bench "${args[@]}" --json "$json" \
      >"$RUNS/ab_$name.log" 2>&1; then
      echo "   failed: tail of ab_$name.log"
      tail -n 5 "$RUNS/ab_$name.log"
      continue
    fi
    # Printed as each run ends, so that a call cut short still shows the runs it finished.
    row "$tag" "$json"
    results+=("$tag|$json")
  done
done
echo
header
for item in "${results[@]}"; do
  row "${item%%|*}" "${item#*|}"
done
