#!/usr/bin/env bash
# Expert-parallel A/B probe for a multi-GPU device call: builds the library, then runs
# `turbomoe bench` under torchrun over every GPU once per A/B setting (and per round).
# With PROBE_PROFILE=1 (default) each run also takes a one-step profile with per-rank Chrome
# traces, and ranks 0 and 1 are summarised with bench/trace_summary.py; PROBE_PROFILE=0 only
# times (for 48-layer comparisons, where profiling costs too much).
# Everything lands in ${OUT:-out}: probe_<tag>_r<round>.txt (bench table + trace summaries),
# probe_runs.tar.gz (each run's JSON, stderr, profile and the build log) and, when profiling,
# rank 0's traces packed into traces.tar (the device returns at most 8 files, 16 MiB each).
#
#   PROBE_ARGS="--layers 12 --only turbomoe"   bench flags for every run
#   PROBE_AB="base --ep-dense=replicated,TURBOMOE_EP_PADDED_MAX_EP=4"  space-separated runs;
#       "base" is no change, else comma-separated items: --flag=value adds a bench flag,
#       VAR=VALUE sets an environment variable for that run
#   PROBE_LIBRARY=path/libturbomoe.so   use this library (e.g. one built here and carried) and
#       skip the build
#   PROBE_REPEAT=1   rounds over all runs, interleaved (A B A B ...): at 48 layers on 4 GPUs the
#       forward of one launch varied by up to 35% from the next, so one launch per variant
#       cannot rank changes of a few percent
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD_DIR=${BUILD_DIR:-build/gpu}
PROBE_ARGS=${PROBE_ARGS:---layers 12 --only turbomoe --steps 4 --warmup 2}
PROBE_AB=${PROBE_AB:-base}
PROBE_PROFILE=${PROBE_PROFILE:-1}
PROBE_REPEAT=${PROBE_REPEAT:-1}
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ -n "${PROBE_LIBRARY:-}" ]; then
  LIBRARY=$(realpath "$PROBE_LIBRARY")
  echo "library $LIBRARY (not rebuilt)" >"$OUT/probe_build.log"
else
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTM_REQUIRE_CUDA=ON \
    -DTM_BUILD_TESTS=OFF -DTM_CUDA_ARCHITECTURES=90a-real >"$OUT/probe_build.log" 2>&1
  ninja -C "$BUILD_DIR" >>"$OUT/probe_build.log" 2>&1
  LIBRARY=$PWD/$BUILD_DIR/libturbomoe.so
fi
export PYTHONPATH=$PWD/python TURBOMOE_LIBRARY=$LIBRARY
read -r -a args <<<"$PROBE_ARGS"
for round in $(seq 1 "$PROBE_REPEAT"); do
  for tag in $PROBE_AB; do
    envs=() flags=()
    if [ "$tag" != base ]; then
      IFS=, read -r -a items <<<"$tag"
      for item in "${items[@]}"; do
        if [[ $item == --* ]]; then flags+=("$item"); else envs+=("$item"); fi
      done
    fi
    name=${tag//[^A-Za-z0-9_]/_}_r$round
    profile=()
    if [ "$PROBE_PROFILE" = 1 ]; then
      mkdir -p "$OUT/tr_$name"
      profile=(--profile --profile-steps 1 --profile-top 30 --profile-out "$OUT/profile_$name.md"
        --trace-dir "$OUT/tr_$name")
    fi
    echo "== $tag (round $round)"
    env "${envs[@]}" torchrun --standalone --nproc_per_node="$GPUS" -m turbomoe.bench \
      "${args[@]}" "${flags[@]}" "${profile[@]}" --json "$OUT/probe_$name.json" \
      >"$OUT/probe_$name.txt" 2>"$OUT/probe_$name.err" || true
    grep -A3 '^run ' "$OUT/probe_$name.txt" || tail -n 20 "$OUT/probe_$name.err"
    for f in "$OUT/tr_$name"/*rank0* "$OUT/tr_$name"/*rank1*; do
      [ -f "$f" ] && python3 bench/trace_summary.py --steps 1 --gaps 12 "$f" | tee -a "$OUT/probe_$name.txt"
    done
  done
done
cd "$OUT"
tar czf probe_runs.tar.gz probe_*.json probe_*.err probe_build.log ./profile_*.md 2>/dev/null || true
rm -f probe_*.json probe_*.err probe_build.log ./profile_*.md
traces=(tr_*/*rank0*)
if [ -e "${traces[0]}" ]; then tar cf traces.tar "${traces[@]}"; fi
rm -rf tr_*
