#!/usr/bin/env python3
"""How the benchmark's random-initialised model routes its tokens, layer by layer (CPU).

`turbomoe bench` trains a randomly initialised Qwen3-30B-A3B shape with its real router. The
expert GEMMs' speed depends on how many rows each expert gets, so this prints, for one batch of
the bench's random tokens, each layer's rows per expert: the largest over the mean, how many
experts get none, how many 128-row tiles the forward needs against an even split, and, for expert
parallelism over R ranks, the busiest rank's rows over the mean (the rank every other one waits
for) with contiguous expert blocks ("blocks") and with a placement by load planned from the same
counts ("placed", turbomoe.parallel.placement).

The layers run one at a time in float32 on the CPU (a 48-layer model never has to fit), with the
bench's init scheme (turbomoe.bench.models.init_weights_, seeded by parameter name). Its CPU
generator draws other numbers than the GPU run's CUDA generator, so the counts are the same
distribution, not the same values.

    python bench/routing_stats.py --layers 12          # ~1 minute a layer on 2 cores
"""

from __future__ import annotations

import argparse

import torch

from turbomoe.bench.models import init_weights_, qwen3_30b_a3b_config
from turbomoe.bench.routing import summarise
from turbomoe.parallel.routing_counts import RoutingRecorder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ep", default="4,8", help="expert-parallel sizes to report (comma list)")
    args = ap.parse_args()

    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    config = qwen3_30b_a3b_config(args.layers)
    config._attn_implementation = "sdpa"
    config._experts_implementation = "eager"
    std = float(config.initializer_range)
    top_k = config.num_experts_per_tok

    # The bench's first batch (turbomoe.bench.runner.make_batches, rank 0).
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=gen)
    embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
    init_weights_(embed, args.seed, prefix="model.embed_tokens.", std=std)
    with torch.no_grad():
        hidden = embed(ids)
    del embed
    positions = torch.arange(args.seq)[None]
    cos_sin = qwen3.Qwen3MoeRotaryEmbedding(config)(hidden, positions)

    eps = tuple(int(v) for v in args.ep.split(",") if v)
    ep_head = "".join(f" {f'ep{r} blocks':>10s} {f'ep{r} placed':>10s}" for r in eps)
    head = f"{'layer':>5s} {'max/mean':>8s} {'max':>5s} {'empty':>5s} {'tiles128':>8s} {'even':>5s}"
    print(head + ep_head)
    for index in range(args.layers):
        layer = qwen3.Qwen3MoeDecoderLayer(config, index)
        init_weights_(layer, args.seed, prefix=f"model.layers.{index}.", std=std)
        recorder = RoutingRecorder(layer)
        recorder.active = True
        with torch.no_grad():
            out = layer(hidden, position_ids=positions, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
        recorder.close()
        table = recorder.counts()
        assert table is not None and table.shape == (1, config.num_experts)
        counts = table[0]
        row = summarise(table, eps)
        tiles = int(torch.ceil(counts / 128).sum())
        even = -(-args.seq * top_k // 128)
        ranks = "".join(
            f" {row['ep_busiest_over_mean'][str(r)][0]:10.2f}"
            f" {row['ep_placed_busiest_over_mean'][str(r)][0]:10.2f}"
            for r in eps
            if str(r) in row["ep_busiest_over_mean"]
        )
        print(
            f"{index:5d} {row['largest_over_mean'][0]:8.2f} {int(counts.max()):5d} "
            f"{row['empty_experts'][0]:5d} {tiles:8d} {even:5d}{ranks}",
            flush=True,
        )
        del layer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
