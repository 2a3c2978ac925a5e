#!/usr/bin/env python3
"""AdamW step benchmark: turbomoe's fused step against the same step as tensor ops and torch's.

One GPU, the parameters of one Qwen3-30B-A3B decoder layer by default (expert gate/up and down
weights, attention projections, norms: ~0.63 B bf16 parameters). Each optimizer runs on its own
copy of the same parameters and gradients; CUDA events around whole `step()` calls, medians.
Floors: bytes moved at the device copy rate measured in the same run (a large `copy_`).

  turbomoe fused      turbomoe.train.optim.AdamW, float32 moments (the finetune default), one
                      tm_adamw_step pass per parameter
  turbomoe fused-bf16 the same with bfloat16 moments (what torch's fused AdamW stores)
  turbomoe tensor-ops the same optimizer with TURBOMOE_FUSED_ADAMW=0 (the step before the kernel)
  torch fused bf16    torch.optim.AdamW(fused=True): its moments in the parameters' dtype (bf16)
  torch foreach bf16  torch.optim.AdamW(foreach=True), same moments
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from cuda_timing import copy_rate, median_ms

from turbomoe.train.optim import AdamW


def layer_shapes(experts: int, hidden: int, inter: int, heads: int, kv: int, d: int) -> list:
    return [
        (experts, 2 * inter, hidden),
        (experts, hidden, inter),
        (experts, hidden),
        (heads * d, hidden),
        (kv * d, hidden),
        (kv * d, hidden),
        (hidden, heads * d),
        (d,),
        (d,),
        (hidden,),
        (hidden,),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = layer_shapes(args.experts, 2048, 768, 32, 4, 128)
    base = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
    grads = [torch.randn(s, device="cuda").to(torch.bfloat16) * 1e-2 for s in shapes]
    n = sum(p.numel() for p in base)

    def params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(p.clone()) for p in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        return ps

    runs = {
        "turbomoe fused (f32 moments)": (
            lambda ps: AdamW(ps, lr=1e-4, weight_decay=0.1),
            "1",
            2 + 2 + 4 + 4 + 2 + 4 + 4,
        ),
        "turbomoe fused-bf16 (bf16 moments)": (
            lambda ps: AdamW(ps, lr=1e-4, weight_decay=0.1, state_dtype=torch.bfloat16),
            "1",
            2 * 7,
        ),
        "turbomoe tensor-ops (f32 moments)": (
            lambda ps: AdamW(ps, lr=1e-4, weight_decay=0.1),
            "0",
            2 + 2 + 4 + 4 + 2 + 4 + 4,
        ),
        "torch fused (bf16 moments)": (
            lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True),
            "1",
            2 * 7,
        ),
        "torch foreach (bf16 moments)": (
            lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, foreach=True),
            "1",
            2 * 7,
        ),
    }
    rate = copy_rate(1 << 30, args.reps)
    print(f"{n / 1e9:.3f} B parameters; device copy {rate / 1e12:.2f} TB/s")
    results = {}
    for name, (make, fused_env, bytes_per_elem) in runs.items():
        os.environ["TURBOMOE_FUSED_ADAMW"] = fused_env
        ps = params()
        opt = make(ps)
        opt.step()  # creates the moments
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ms = median_ms(opt.step, args.reps)
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30
        floor = n * bytes_per_elem / rate * 1e3
        results[name] = {"ms": ms, "floor_ms": floor, "temp_gib": extra}
        print(
            f"{name:36s} {ms:8.2f} ms  floor {floor:6.2f} ms  ({floor / ms:5.1%})  "
            f"temporaries {extra:5.2f} GiB"
        )
        del opt, ps
        torch.cuda.empty_cache()
    os.environ.pop("TURBOMOE_FUSED_ADAMW", None)
    if args.json:
        args.json.write_text(json.dumps({"params": n, "copy_bytes_per_s": rate, "runs": results}))


if __name__ == "__main__":
    main()
