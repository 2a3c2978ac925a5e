"""One rank of the GPU expert-parallel parity check (run by test_gpu_parallel.py under torchrun).

Every rank builds the same tiny model on its GPU, trains one step of its own batch with the
experts sharded over all ranks (NCCL), and rank 0 compares the summed loss, the gradient norm and
every (gathered) gradient with one GPU running the concatenated batch. Rank 0 writes the
comparison to the JSON path given as the last argument.

usage: torchrun --nproc_per_node=N ep_parity_main.py FAMILY DTYPE OUT.json
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/python: parallel_worker

from parallel_worker import (
    build,
    concat,
    finish_main,
    make_batch,
    parity_worker,
    rel_err,
)

import turbomoe
import turbomoe.parallel as tp
from turbomoe import _native

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> int:
    family, dtype_name, out_path = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dtype = DTYPES[dtype_name]
    turbomoe.patch()
    tp.init_distributed(timeout_s=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    # On a machine without CUDA (checking this script itself) the ranks run on CPU over gloo.
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    device = device or torch.device("cpu")
    base = build(family, seed=3).to(device=device, dtype=dtype)
    batches = [
        {k: v.to(device) for k, v in make_batch(seed=r, pad=r % 3).items()} for r in range(world)
    ]
    # TM_TEST_PLACEMENT=balanced|random: the experts placed on ranks by load or at random.
    placement = os.environ.get("TM_TEST_PLACEMENT") or None
    result = parity_worker(rank, world, base, batches, world, None, "auto", False, placement)
    if rank == 0:
        model = copy.deepcopy(base)
        out = model(**concat(batches))
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        norm = torch.nn.utils.get_total_norm([g for g in grads.values() if g is not None])
        worst = {
            name: rel_err(result["grads"][name].float(), want.float())
            for name, want in grads.items()
            if want is not None and result["grads"].get(name) is not None
        }
        missing = [n for n, g in grads.items() if (g is None) != (result["grads"].get(n) is None)]
        report = {
            "world": world,
            "loss_rel": rel_err(result["loss"].float(), out.loss.detach().float()),
            "norm_rel": rel_err(result["norm"].float(), norm.float()),
            "grad_rel_max": max(worst.values()),
            "grad_rel_worst": max(worst, key=worst.get),
            "grads_compared": len(worst),
            "missing": missing,
            # Set process-wide by the first chunked layer (TURBOMOE_EP_CHUNKS > 1), else 0.
            "gemm_sm_margin": _native.lib().tm_gemm_sm_margin() if cuda else None,
        }
        return finish_main(out_path, report)
    return finish_main(out_path, None)


if __name__ == "__main__":
    sys.exit(main())
