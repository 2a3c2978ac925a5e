#!/usr/bin/env bash
# Expert-parallel A/B runs in one device call: builds the library, then runs `turbomoe bench`
# under torchrun over every GPU once per setting (no profile), printing each run's table.
# Outputs: ab_runs.tar.gz (each run's JSON, table and stderr, and the build log).
#
#   AB_ARGS="--layers 48 --steps 6 --warmup 2 --only turbomoe"   bench flags for every run
#   AB_RUNS="base TURBOMOE_DENSE_OVERLAP=0"   space-separated; "base" is no change, else
#       comma-separated items: --flag=value adds a bench flag, VAR=VALUE sets an environment variable
#   AB_REPEAT=1   rounds over all runs, interleaved (A B A B ...): at 48 layers on 4 GPUs the
#       forward of one launch varied by up to 35% from the next, so one launch per variant
#       cannot rank changes of a few percent
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
BUILD_DIR=${BUILD_DIR:-build/gpu}
AB_ARGS=${AB_ARGS:---layers 48 --steps 6 --warmup 2 --only turbomoe}
AB_RUNS=${AB_RUNS:-base}
AB_REPEAT=${AB_REPEAT:-1}
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTM_REQUIRE_CUDA=ON \
  -DTM_BUILD_TESTS=OFF -DTM_CUDA_ARCHITECTURES=90a-real >"$OUT/ab_build.log" 2>&1
ninja -C "$BUILD_DIR" >>"$OUT/ab_build.log" 2>&1
export PYTHONPATH=$PWD/python TURBOMOE_LIBRARY=$PWD/$BUILD_DIR/libturbomoe.so
read -r -a args <<<"$AB_ARGS"
for round in $(seq 1 "$AB_REPEAT"); do
  for tag in $AB_RUNS; do
    envs=() flags=()
    if [ "$tag" != base ]; then
      IFS=, read -r -a items <<<"$tag"
      for item in "${items[@]}"; do
        if [[ $item == --* ]]; then flags+=("$item"); else envs+=("$item"); fi
      done
    fi
    name=${tag//[^A-Za-z0-9_]/_}_r$round
    echo "== $tag (round $round)"
    env "${envs[@]}" torchrun --standalone --nproc_per_node="$GPUS" -m turbomoe.bench \
      "${args[@]}" "${flags[@]}" --json "$OUT/ab_$name.json" >"$OUT/ab_$name.txt" \
      2>"$OUT/ab_$name.err" || true
    grep -A3 '^run ' "$OUT/ab_$name.txt" || tail -n 20 "$OUT/ab_$name.err"
  done
done
# At most 8 files come back from the device: the runs' outputs travel as one archive.
(cd "$OUT" && tar czf ab_runs.tar.gz ab_*.json ab_*.txt ab_*.err ab_build.log 2>/dev/null &&
  rm -f ab_*.json ab_*.txt ab_*.err ab_build.log)
