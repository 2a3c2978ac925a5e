#!/usr/bin/env python3
"""Expert-parallel dispatch and combine: exactness and bandwidth per GPU (the expert-parallel
issue's benchmark), run under torchrun with one process per GPU.

  torchrun --standalone --nproc_per_node=4 bench/ep_dispatch_bench.py [--json out.json]

Each rank routes T tokens (default 4096 x hidden 2048, bf16, top-8 of 128 experts, uniform
random experts) through ``turbomoe.parallel.dispatch`` and back through ``combine_back`` with
the received rows as the "expert output". Checked first, on every rank: the received blocks hold
exactly the rows of the tokens routed to this rank (bitwise), and the round trip returns
n_t · x_t for every token t (n_t = the ranks it went to; bitwise against the float32 product
rounded once). Then timed with CUDA events (median of --reps after --warmup): dispatch, combine,
and an equal-split ``all_to_all_single`` moving the same padded volume (the transport's own
ceiling in this run) and a large one (256 MiB per rank: the link's practical peak).

Bandwidth per GPU counts the bytes a rank sends to other ranks: "payload" only the rows of
routed tokens, "padded" every row of the fixed blocks (what crosses the wire).
On CPU (gloo) the same script checks the logic with small sizes; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import turbomoe.parallel as tp
from turbomoe.bench.timing import median_ms
from turbomoe.parallel.dispatch import combine_back, dispatch
from turbomoe.parallel.mesh import ExpertShard


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    tp.init_distributed(timeout_s=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    device = device or torch.device("cpu")
    dtype = torch.bfloat16
    if a.experts % world:
        raise SystemExit(f"--experts {a.experts} must be a multiple of the world size {world}")
    shard = ExpertShard(dist.group.WORLD, world, rank, a.experts, world)
    shard.capacity.value = a.tokens  # every rank has the same token count

    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(a.tokens, a.hidden, generator=gen).to(device, dtype)
    picks = [torch.randperm(a.experts, generator=gen)[: a.top_k] for _ in range(a.tokens)]
    ids = torch.stack(picks).to(device)
    weights = torch.rand(a.tokens, a.top_k, generator=gen).to(device)

    # ---- exactness
    sent = dispatch(shard, x, ids, weights)
    assert sent is not None
    owners = ids // shard.num_local  # [T, K]
    ranks_of = [torch.unique(owners[t]).tolist() for t in range(a.tokens)]
    gathered: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for t, rs in enumerate(ranks_of):
        for r in rs:
            gathered[r].append(x[t])
    cap = sent.layout.capacity
    mine = []  # what each peer should find in its block from this rank
    for r in range(world):
        rows = torch.stack(gathered[r]) if gathered[r] else x.new_zeros((0, a.hidden))
        block = x.new_zeros((cap, a.hidden))
        block[: rows.shape[0]] = rows
        mine.append(block)
    expected = torch.empty_like(sent.rows)
    dist.all_to_all_single(expected, torch.cat(mine))
    dispatch_exact = bool(torch.equal(sent.rows, expected))
    back = combine_back(shard, sent.rows, sent.layout)
    counts = torch.tensor([len(rs) for rs in ranks_of], device=device, dtype=torch.float32)
    combine_exact = bool(torch.equal(back, (x.float() * counts[:, None]).to(dtype)))

    # ---- bandwidth
    elem = torch.finfo(dtype).bits // 8
    payload_rows = sum(len(gathered[r]) for r in range(world) if r != rank)
    payload = payload_rows * a.hidden * elem
    padded = (world - 1) * cap * a.hidden * elem
    dispatch_ms = median_ms(
        lambda: dispatch(shard, x, ids, weights), device, a.warmup, a.reps, dist.barrier
    )
    combine_ms = median_ms(
        lambda: combine_back(shard, sent.rows, sent.layout), device, a.warmup, a.reps, dist.barrier
    )
    volume = torch.empty((world * cap, a.hidden), dtype=dtype, device=device)
    volume_out = torch.empty_like(volume)
    same_ms = median_ms(
        lambda: dist.all_to_all_single(volume_out, volume), device, a.warmup, a.reps, dist.barrier
    )
    big_rows = (256 << 20) // (a.hidden * elem) // world * world
    big = torch.empty((big_rows, a.hidden), dtype=dtype, device=device)
    big_out = torch.empty_like(big)
    big_ms = median_ms(
        lambda: dist.all_to_all_single(big_out, big), device, a.warmup, a.reps, dist.barrier
    )
    big_sent = (world - 1) * (big_rows // world) * a.hidden * elem

    def gbs(nbytes: float, ms: float) -> float:
        return nbytes / ms / 1e6

    row = {
        "rank": rank,
        "dispatch_exact": dispatch_exact,
        "combine_exact": combine_exact,
        "dispatch_ms": dispatch_ms,
        "combine_ms": combine_ms,
        "dispatch_payload_gbs": gbs(payload, dispatch_ms),
        "dispatch_padded_gbs": gbs(padded, dispatch_ms),
        "combine_payload_gbs": gbs(payload, combine_ms),
        "combine_padded_gbs": gbs(padded, combine_ms),
        "same_volume_all_to_all_gbs": gbs(padded, same_ms),
        "peak_all_to_all_gbs": gbs(big_sent, big_ms),
    }
    rows: list[dict[str, object]] = [{} for _ in range(world)]
    dist.all_gather_object(rows, row)
    ok = all(r["dispatch_exact"] and r["combine_exact"] for r in rows)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu (gloo: timings meaningless)"
        print(
            f"EP dispatch/combine, {world} ranks on {name}: {a.tokens} tokens x hidden "
            f"{a.hidden} bf16, top-{a.top_k} of {a.experts} experts; block {cap} rows per peer"
        )
        keys = [k for k in row if k != "rank"]
        print("rank " + " ".join(f"{k:>26}" for k in keys))
        for r in rows:
            print(f"{r['rank']:>4} " + " ".join(f"{_fmt(r[k]):>26}" for k in keys))
        print("exact: " + ("yes" if ok else "NO"))
        if a.json:
            a.json.write_text(json.dumps({"args": vars(a) | {"json": None}, "ranks": rows}))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
