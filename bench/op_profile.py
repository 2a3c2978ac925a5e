#!/usr/bin/env python3
"""Which operators launch the GPU time of a training step, with their input shapes.

`turbomoe bench --profile` ranks CUDA kernels by name; a kernel such as PyTorch's
`direct_copy_kernel` or `elementwise_kernel` does not say which line of the model asked for it.
This runs a few eager (not graph-replayed) forward + loss + backward steps of the bench model with
turbomoe patched in and ranks the operators by the GPU time of the kernels they launched
themselves, grouped by input shapes, so that a copy or a fill can be traced to its caller.

    python bench/op_profile.py --layers 2 --top 40    # GPU; --device cpu --tiny: a smoke run
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny qwen3_moe shape")
    ap.add_argument("--stock", action="store_true", help="profile stock transformers instead")
    args = ap.parse_args()

    if not args.stock:
        import turbomoe  # noqa: F401  (patches transformers)
    from turbomoe.bench.models import build_model, qwen3_30b_a3b_config, tiny_config

    device = torch.device(args.device)
    config = tiny_config(layers=args.layers) if args.tiny else qwen3_30b_a3b_config(args.layers)
    seq = 128 if args.tiny else args.seq
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(
        config,
        device=device,
        dtype=dtype,
        seed=0,
        experts_implementation="grouped_mm" if args.stock else None,
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=gen).to(device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages(group_by_input_shape=True)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.top]
    total = sum(getattr(e, key) for e in events) / 1e3 / args.steps
    print(
        f"{'stock' if args.stock else 'turbomoe'}, {args.layers} layers, seq {seq}: "
        f"{total:.2f} ms/step of self {'GPU' if device.type == 'cuda' else 'CPU'} time"
    )
    print(f"{'ms/step':>8s} {'calls':>6s}  operator  [input shapes]")
    for e in ranked:
        ms = getattr(e, key) / 1e3 / args.steps
        calls = e.count / args.steps
        print(f"{ms:8.3f} {calls:6.1f}  {e.key}  {str(e.input_shapes)[:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
