"""One rank of the captured expert-parallel step check (run by test_gpu_parallel.py under
torchrun with 2 GPUs: EP 2, whose expert buffers are padded, so nothing in the step reads the
host). Two copies of the tiny qwen3_moe model (fp32) are parallelized alike; each step goes
through the plain one eagerly and through GraphedStep on the other (eager warm-up, then capture
and replays), the losses and every gradient are compared, and both take an AdamW step. Rank 0
writes the comparison to the JSON path given as the last argument.

usage: torchrun --nproc_per_node=2 ep_graph_main.py OUT.json
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/python: parallel_worker

from parallel_worker import build, finish_main, full_grads, make_batch, rel_err

import turbomoe
import turbomoe.parallel as tp
from turbomoe.train.graph_step import GraphedStep


def main() -> int:
    out_path = Path(sys.argv[1])
    turbomoe.patch()
    tp.init_distributed(timeout_s=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    base = build("qwen3_moe", seed=3).to(device)
    plain, graphed = copy.deepcopy(base), copy.deepcopy(base)
    tp.parallelize(plain, ep_size=world)
    tp.parallelize(graphed, ep_size=world)
    step = GraphedStep(graphed, warmup_steps=1)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, graphed)]
    loss_rel: list[float] = []
    grad_rel: list[float] = []
    missing: list[str] = []
    for i in range(4):
        batch = make_batch(seed=10 * i + rank, pad=0)
        del batch["attention_mask"]
        batch = {k: v.to(device) for k, v in batch.items()}
        want = plain(**batch).loss
        want.backward()
        got = step(**batch)
        loss_rel.append(rel_err(got.float(), want.detach().float()))
        want_grads, got_grads = full_grads(plain), full_grads(graphed)
        missing += [n for n, g in want_grads.items() if (g is None) != (got_grads[n] is None)]
        grad_rel.append(
            max(rel_err(got_grads[n], g) for n, g in want_grads.items() if g is not None)
        )
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    if rank == 0:
        report = {
            "world": world,
            "loss_rel_max": max(loss_rel),
            "grad_rel_max": max(grad_rel),
            "captures": step.stats.captures,
            "replays": step.stats.replays,
            "eager_steps": step.stats.eager_steps,
            "missing": missing,
        }
        return finish_main(out_path, report)
    return finish_main(out_path, None)


if __name__ == "__main__":
    sys.exit(main())
