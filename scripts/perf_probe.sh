#!/usr/bin/env bash
# Performance probe on the GPU machine in one call: build the library, time the SDPA backends on
# the benchmark's attention shape, run the 12-layer side-by-side benchmark with a per-kernel
# profile, then turbomoe-only A/B runs of the knobs listed in PROBE_AB (VAR=value, space
# separated; each run is one line of ab.txt). Everything lands in $OUT in at most 8 files (the
# device tool brings back no more): probe.log, attention.txt, bench.txt, bench.json,
# profile.md, ab.txt.
#
#   run: bash scripts/perf_probe.sh
#   knobs: LAYERS=12  PROBE_AB="TURBOMOE_DISABLE_HOPPER_GEMM=1"  BENCH_ARGS="..."
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-out}
mkdir -p "$OUT"
LAYERS=${LAYERS:-12}
PROBE_AB=${PROBE_AB:-}
BENCH_ARGS=${BENCH_ARGS:-}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export TURBOMOE_LIBRARY=$PWD/build/gpu/libturbomoe.so PYTHONUNBUFFERED=1
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
T0=$SECONDS
stamp() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$OUT/probe.log"; }

stamp "build"
{
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTM_REQUIRE_CUDA=ON \
    -DTM_BUILD_TESTS=OFF -DTM_CUDA_ARCHITECTURES=90a-real &&
    cmake --build build/gpu -j 16
} >>"$OUT/probe.log" 2>&1 || { stamp "build FAILED"; tail -30 "$OUT/probe.log"; exit 1; }

stamp "attention backends"
timeout -k 5 120 python3 bench/attention_bench.py --json "$OUT/attention.json" \
  >"$OUT/attention.txt" 2>>"$OUT/probe.log"
cat "$OUT/attention.json" >>"$OUT/attention.txt" 2>/dev/null && rm -f "$OUT/attention.json"

stamp "side-by-side bench, $LAYERS layers, with profile"
read -r -a extra <<<"$BENCH_ARGS"
timeout -k 5 240 python3 -m turbomoe.bench --layers "$LAYERS" --profile --profile-top 45 \
  --profile-out "$OUT/profile.md" --json "$OUT/bench.json" "${extra[@]}" \
  >"$OUT/bench.txt" 2>>"$OUT/probe.log"
stamp "bench exit $?"

for knob in $PROBE_AB; do
  stamp "turbomoe only with $knob"
  echo "== $knob" >>"$OUT/ab.txt"
  env "$knob" timeout -k 5 120 python3 -m turbomoe.bench --layers "$LAYERS" --only turbomoe \
    "${extra[@]}" 2>>"$OUT/probe.log" | grep -E "^turbomoe|^run" >>"$OUT/ab.txt"
done
stamp "done"
grep -v "^{" "$OUT/attention.txt" | head -12
cat "$OUT/bench.txt"
cat "$OUT/ab.txt" 2>/dev/null
