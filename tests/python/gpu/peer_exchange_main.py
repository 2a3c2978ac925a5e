"""One rank of the NVLink peer-exchange checks (run by test_gpu_peer.py under torchrun).

usage: torchrun --nproc_per_node=N peer_exchange_main.py {exact,timeout} OUT.json

exact: the NVLink exchange against NCCL's ``all_to_all_single`` on the same inputs, bitwise:
  several dtypes and block sizes in an order that grows the buffer twice and shrinks back, the
  gradient through ``exchange_blocks`` against the NCCL path's, and a CUDA graph of exchanges
  replayed on fresh inputs (the barrier counts on the device, so replays must stay in step).
  Rank 0 writes every rank's verdicts to OUT.json.
timeout: after one good exchange, every rank but 0 stops taking part; rank 0's next exchange must
  fail within TURBOMOE_EP_PEER_TIMEOUT_S instead of hanging. Rank 0 prints PEER-TIMEOUT-RAISED
  with the error it got and exits 3.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import turbomoe.parallel as tp
from turbomoe.parallel.comm import exchange_blocks, set_transport


def reference(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out


def exact(out_path: Path) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    peer = set_transport(dist.group.WORLD, "nvlink")
    assert peer is not None
    gen = torch.Generator(device=device).manual_seed(99 + rank)
    verdicts: dict[str, bool] = {}
    cases = [
        ("bf16_small", torch.bfloat16, 8, 64),
        ("bf16_large", torch.bfloat16, 1024, 2048),  # grows the buffer
        ("fp32_meta", torch.float32, 1024, 16),
        ("fp32_larger", torch.float32, 2048, 2048),  # grows again
        ("bf16_small_again", torch.bfloat16, 8, 64),
        ("int32_rows", torch.int32, 33, 4),
    ]
    for name, dtype, block, width in cases:
        if dtype == torch.int32:
            x = torch.randint(-(2**30), 2**30, (world * block, width), device=device, generator=gen)
            x = x.to(dtype)
        else:
            x = torch.randn(world * block, width, device=device, generator=gen).to(dtype)
        x.view(-1)[0] = float("nan") if dtype.is_floating_point else 7  # NaNs travel bitwise
        got = peer.exchange(x, block)
        want = reference(x)
        verdicts[name] = bool(torch.equal(got.view(torch.uint8), want.view(torch.uint8)))

    # The gradient: the exchange's backward is the reverse exchange.
    x = torch.randn(world * 512, 256, device=device, generator=gen, requires_grad=True)
    w = torch.randn(world * 512, 256, device=device, generator=gen)
    (exchange_blocks(x, 512, dist.group.WORLD) * w).sum().backward()
    grad_nvlink = x.grad.clone()
    x.grad = None
    set_transport(dist.group.WORLD, "nccl")
    (exchange_blocks(x, 512, dist.group.WORLD) * w).sum().backward()
    verdicts["grad"] = bool(torch.equal(grad_nvlink, x.grad))
    peer = set_transport(dist.group.WORLD, "nvlink")
    assert peer is not None

    # A captured graph of three exchanges, replayed on fresh inputs.
    static = torch.randn(world * 256, 512, device=device, generator=gen).to(torch.bfloat16)
    peer.exchange(static, 256)  # sizes the buffer before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        first = peer.exchange(static, 256)
        second = peer.exchange(first * 2, 256)
        third = peer.exchange(second + 1, 256)
    replays_ok = True
    for _ in range(3):
        static.copy_(torch.randn(static.shape, device=device, generator=gen).to(static.dtype))
        graph.replay()
        want1 = reference(static)
        want3 = reference(reference(want1 * 2) + 1)
        replays_ok &= bool(torch.equal(first, want1) and torch.equal(third, want3))
    verdicts["graph_replays"] = replays_ok
    # Eager exchanges still pair up after the replays.
    x = torch.randn(world * 64, 128, device=device, generator=gen).to(torch.bfloat16)
    verdicts["eager_after_graph"] = bool(torch.equal(peer.exchange(x, 64), reference(x)))

    everyone: list[dict[str, bool]] = [{} for _ in range(world)]
    dist.all_gather_object(everyone, verdicts)
    if rank == 0:
        out_path.write_text(json.dumps({"world": world, "ctas": peer.ctas, "ranks": everyone}))
    set_transport(dist.group.WORLD, "nccl")
    return 0


def timeout() -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    peer = set_transport(dist.group.WORLD, "nvlink")
    assert peer is not None
    x = torch.ones(world * 16, 64, device=device, dtype=torch.bfloat16)
    peer.exchange(x, 16)
    torch.cuda.synchronize()
    dist.barrier()
    if rank != 0:
        time.sleep(60)  # gone from the exchange; torchrun ends this rank when rank 0 fails
        os._exit(0)
    start = time.monotonic()
    try:
        peer.exchange(x, 16)
        torch.cuda.synchronize()
    except RuntimeError as e:
        took = time.monotonic() - start
        print(f"PEER-TIMEOUT-RAISED after {took:.1f} s: {e}", flush=True)
        os._exit(3)  # the CUDA context is gone: skip every destructor
    print("PEER-TIMEOUT-MISSING: the exchange completed without its peers", flush=True)
    os._exit(4)


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    tp.init_distributed(timeout_s=120)
    if mode == "exact":
        code = exact(out)
        dist.barrier()
        dist.destroy_process_group()
        return code
    if mode == "timeout":
        return timeout()
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
