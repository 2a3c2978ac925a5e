#!/usr/bin/env bash
# `turbomoe finetune` with a model path on the GPU machine: on one GPU, then under torchrun with
# one process per GPU and expert parallelism over all of them (when there are two or more).
#
# The model directory is made here: a random-init Qwen3-MoE wider than the embedded default
# (hidden 1024, 8 layers, 64 experts, top-8) with the embedded byte tokenizer, written with
# save_pretrained, as a user's local checkpoint would be. Training data is the bundled
# instruction set. Output: $OUT/finetune_1gpu.log, $OUT/finetune_torchrun.log, the runs'
# metrics under /tmp (not brought back: only the summaries matter).
#
# With FT_GRAPH=1 (default) the one-GPU run is repeated with --train.cuda_graph=true.
#
#   run: bash scripts/finetune_device.sh        knobs: FT_STEPS=40  FT_TIMEOUT=150  FT_GRAPH=1
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-out}
mkdir -p "$OUT"
STEPS=${FT_STEPS:-40}
LIMIT=${FT_TIMEOUT:-150}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export TURBOMOE_LIBRARY=${TURBOMOE_LIBRARY:-$PWD/build/gpu/libturbomoe.so} PYTHONUNBUFFERED=1
MODEL=/tmp/turbomoe_ft_model
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')

python3 - "$MODEL" <<'PY' || exit 1
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from turbomoe.default.tokenizer import build_tokenizer

tok = build_tokenizer()
config = AutoConfig.for_model(
    "qwen3_moe", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
    eos_token_id=tok.eos_token_id, hidden_size=1024, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
    num_experts_per_tok=8, moe_intermediate_size=512, intermediate_size=2048,
    norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
print(f"model dir {sys.argv[1]}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")
PY

COMMON=(--model.path="$MODEL" --train.max_steps="$STEPS" --train.batch_size=16
  --data.max_length=1024 --data.packing=true --progress=lines --log.plots=true
  --checkpoint.every_steps=20 --train.peak_tflops=989)

echo "== one GPU"
timeout -k 10 "$LIMIT" python3 -m turbomoe.cli finetune "${COMMON[@]}" \
  --train.output_dir=/tmp/ft_1gpu >"$OUT/finetune_1gpu.log" 2>&1
echo "exit $?"
tail -n 14 "$OUT/finetune_1gpu.log"

if [ "${FT_GRAPH:-1}" = 1 ]; then
  echo "== one GPU, steps replayed from a CUDA graph (train.cuda_graph)"
  timeout -k 10 "$LIMIT" python3 -m turbomoe.cli finetune "${COMMON[@]}" --train.cuda_graph=true \
    --train.output_dir=/tmp/ft_1gpu_graph >"$OUT/finetune_1gpu_graph.log" 2>&1
  echo "exit $?"
  tail -n 14 "$OUT/finetune_1gpu_graph.log"
fi

if [ "$GPUS" -ge 2 ]; then
  echo "== torchrun, $GPUS processes, ep_size $GPUS"
  timeout -k 10 "$LIMIT" torchrun --standalone --nproc_per_node="$GPUS" -m turbomoe.cli finetune \
    "${COMMON[@]}" --train.ep_size="$GPUS" --train.output_dir=/tmp/ft_torchrun \
    >"$OUT/finetune_torchrun.log" 2>&1
  echo "exit $?"
  tail -n 14 "$OUT/finetune_torchrun.log"
fi
