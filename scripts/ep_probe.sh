#!/usr/bin/env bash
# Expert-parallel timeline probe for a multi-GPU device call: builds the library, then runs
# `turbomoe bench` under torchrun over every GPU with a one-step profile and per-rank Chrome
# traces, once per A/B setting, and summarises ranks 0 and 1 of each with bench/trace_summary.py.
# Everything lands in ${OUT:-out}: probe_<tag>.txt (bench table + trace summaries), the traces
# rank 0's traces packed into traces.tar.
#
#   PROBE_ARGS="--layers 12 --only turbomoe"   bench flags for every run
#   PROBE_AB="base --ep-dense=replicated,TURBOMOE_EP_PADDED_MAX_EP=4"  space-separated runs;
#       "base" is no change, else comma-separated items: --flag=value adds a bench flag,
#       VAR=VALUE sets an environment variable for that run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD_DIR=${BUILD_DIR:-build/gpu}
PROBE_ARGS=${PROBE_ARGS:---layers 12 --only turbomoe --steps 4 --warmup 2}
PROBE_AB=${PROBE_AB:-base}
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTM_REQUIRE_CUDA=ON \
  -DTM_BUILD_TESTS=OFF -DTM_CUDA_ARCHITECTURES=90a-real >"$OUT/probe_build.log" 2>&1
ninja -C "$BUILD_DIR" >>"$OUT/probe_build.log" 2>&1
export PYTHONPATH=$PWD/python TURBOMOE_LIBRARY=$PWD/$BUILD_DIR/libturbomoe.so
read -r -a args <<<"$PROBE_ARGS"
for tag in $PROBE_AB; do
  envs=() flags=()
  if [ "$tag" != base ]; then
    IFS=, read -r -a items <<<"$tag"
    for item in "${items[@]}"; do
      if [[ $item == --* ]]; then flags+=("$item"); else envs+=("$item"); fi
    done
  fi
  name=${tag//[^A-Za-z0-9_]/_}
  mkdir -p "$OUT/tr_$name"
  echo "== $tag"
  env "${envs[@]}" torchrun --standalone --nproc_per_node="$GPUS" -m turbomoe.bench "${args[@]}" "${flags[@]}" \
    --profile --profile-steps 1 --profile-top 30 --profile-out "$OUT/profile_$name.md" \
    --trace-dir "$OUT/tr_$name" >"$OUT/probe_$name.txt" 2>"$OUT/probe_$name.err" || true
  grep -A3 '^run ' "$OUT/probe_$name.txt" || tail -n 20 "$OUT/probe_$name.err"
  for f in "$OUT/tr_$name"/*rank0* "$OUT/tr_$name"/*rank1*; do
    [ -f "$f" ] && python3 bench/trace_summary.py --steps 1 --gaps 12 "$f" | tee -a "$OUT/probe_$name.txt"
  done
done
# Rank 0's traces come back (the device returns at most 16 MiB a file).
(cd "$OUT" && tar cf traces.tar tr_*/*rank0* && rm -rf tr_*)
