#!/usr/bin/env python3
"""Expert-parallel dispatch and combine: exactness and bandwidth per GPU (the expert-parallel
issue's benchmark), run under torchrun with one process per GPU.

  torchrun --standalone --nproc_per_node=4 bench/ep_dispatch_bench.py [--json out.json]

Each rank routes T tokens (default 4096 x hidden 2048, bf16, top-8 of 128 experts, uniform
random experts) through ``turbomoe.parallel.dispatch`` and back through ``combine_back`` with
the received rows as the "expert output", once per transport: NCCL all-to-all, then the NVLink
peer exchange (CUDA IPC, ``TURBOMOE_EP_NVLINK_CTAS`` SMs per push). Checked first, on every rank:
the received blocks hold exactly the rows of the tokens routed to this rank (bitwise), and the
round trip returns n_t · x_t for every token t (n_t = the ranks it went to; bitwise against the
float32 product rounded once). Then timed with CUDA events (median of --reps after --warmup):
dispatch, combine, and the references of the same run: the NVLink push alone of the same padded
volume, and of 256 MiB per rank with every SM (the link's practical peak); NCCL's
``all_to_all_single`` of the same volume and of 256 MiB.

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
from turbomoe.parallel.comm import set_transport
from turbomoe.parallel.dispatch import combine_back, dispatch
from turbomoe.parallel.mesh import ExpertShard
from turbomoe.parallel.nvlink import PeerExchange


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

    transports = ["nccl", "nvlink"] if cuda else ["nccl"]
    elem = torch.finfo(dtype).bits // 8
    row: dict[str, object] = {"rank": rank}
    for mode in transports:
        peer = set_transport(dist.group.WORLD, mode)
        name = "gloo" if not cuda else ("nvlink" if peer is not None else "nccl")
        row[f"{name}_sms"] = peer.ctas if peer is not None else "nccl's"
        row |= _measure(name, shard, x, ids, weights, a, device)
        if peer is not None:
            row |= _link_peaks(peer, a, device, elem)
    row |= _nccl_peaks(shard, a, device, dtype, elem)
    rows: list[dict[str, object]] = [{} for _ in range(world)]
    dist.all_gather_object(rows, row)
    ok = all(v for r in rows for k, v in r.items() if k.endswith("_exact"))
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu (gloo: timings meaningless)"
        cap = a.tokens
        print(
            f"EP dispatch/combine, {world} ranks on {name}: {a.tokens} tokens x hidden "
            f"{a.hidden} bf16, top-{a.top_k} of {a.experts} experts; block {cap} rows per peer"
        )
        keys = [k for k in row if k != "rank"]
        for k in keys:
            print(f"{k:>34} " + " ".join(f"{_fmt(r[k]):>10}" for r in rows))
        print("exact: " + ("yes" if ok else "NO"))
        if a.json:
            a.json.write_text(json.dumps({"args": vars(a) | {"json": None}, "ranks": rows}))
    set_transport(dist.group.WORLD, "nccl")  # frees the NVLink buffers collectively
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def _gbs(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def _measure(
    name: str,
    shard: ExpertShard,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    a: argparse.Namespace,
    device: torch.device,
) -> dict[str, object]:
    """Exactness (bitwise, against a reference gather) and times of dispatch and combine over the
    transport now chosen for the group."""
    rank, world = shard.ep_rank, shard.ep_size
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
    back = combine_back(shard, sent.rows, sent.layout)
    counts = torch.tensor([len(rs) for rs in ranks_of], device=device, dtype=torch.float32)
    elem = x.element_size()
    payload_rows = sum(len(gathered[r]) for r in range(world) if r != rank)
    payload = payload_rows * a.hidden * elem
    padded = (world - 1) * cap * a.hidden * elem
    dispatch_ms = median_ms(
        lambda: dispatch(shard, x, ids, weights), device, a.warmup, a.reps, dist.barrier
    )
    combine_ms = median_ms(
        lambda: combine_back(shard, sent.rows, sent.layout), device, a.warmup, a.reps, dist.barrier
    )
    return {
        f"{name}_dispatch_exact": bool(torch.equal(sent.rows, expected)),
        f"{name}_combine_exact": bool(torch.equal(back, (x.float() * counts[:, None]).to(x.dtype))),
        f"{name}_dispatch_ms": dispatch_ms,
        f"{name}_combine_ms": combine_ms,
        f"{name}_dispatch_payload_gbs": _gbs(payload, dispatch_ms),
        f"{name}_dispatch_padded_gbs": _gbs(padded, dispatch_ms),
        f"{name}_combine_payload_gbs": _gbs(payload, combine_ms),
        f"{name}_combine_padded_gbs": _gbs(padded, combine_ms),
    }


def _link_peaks(
    peer: PeerExchange, a: argparse.Namespace, device: torch.device, elem: int
) -> dict[str, object]:
    """The NVLink transfer alone (barrier, push, barrier) of the padded volume at the configured
    SM budget, and of 256 MiB per rank with every SM: the link's practical peak in this run."""
    world = peer.world
    out: dict[str, object] = {}
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for label, rows, ctas in (
        ("volume", world * a.tokens, peer.ctas),
        ("peak", (256 << 20) // (a.hidden * elem) // world * world, sms),
    ):
        block = rows // world
        data = torch.randn((rows, a.hidden), device=device).to(torch.bfloat16)
        ms = median_ms(
            lambda data=data, block=block, ctas=ctas: peer.send(data, block, ctas),
            device,
            a.warmup,
            a.reps,
            dist.barrier,
        )
        out[f"nvlink_push_{label}_{ctas}sm_gbs"] = _gbs((world - 1) * block * a.hidden * elem, ms)
    return out


def _nccl_peaks(
    shard: ExpertShard, a: argparse.Namespace, device: torch.device, dtype: torch.dtype, elem: int
) -> dict[str, object]:
    """``all_to_all_single`` of the padded volume (the NCCL transport's own ceiling) and of 256
    MiB per rank (its practical peak)."""
    world = shard.ep_size
    out: dict[str, object] = {}
    for label, rows in (
        ("volume", world * a.tokens),
        ("peak", (256 << 20) // (a.hidden * elem) // world * world),
    ):
        data = torch.empty((rows, a.hidden), dtype=dtype, device=device)
        data_out = torch.empty_like(data)
        ms = median_ms(
            lambda data=data, data_out=data_out: dist.all_to_all_single(data_out, data),
            device,
            a.warmup,
            a.reps,
            dist.barrier,
        )
        out[f"all_to_all_{label}_gbs"] = _gbs((world - 1) * (rows // world) * a.hidden * elem, ms)
    return out


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
