"""Eager steps against GraphedStep replays of the same turbomoe model on one GPU.

Prints, for the Qwen3-30B-A3B shape with --layers layers: the step time of each (CUDA events,
median of --steps after warm-up), whether one replay reproduces the eager step's loss and
gradients from the same weights and batch (max relative difference per parameter), and the
per-kernel tables of both under torch.profiler, so that a slower replay can be traced to kernels
that run differently inside the graph or to gaps between them.

    python bench/graph_probe.py --layers 4 --steps 5
"""

from __future__ import annotations

import argparse

import torch

import turbomoe  # noqa: F401  (patches the model onto turbomoe's ops)
from turbomoe.bench.models import build_model, qwen3_30b_a3b_config
from turbomoe.bench.profiling import Profile, profile_steps
from turbomoe.bench.timing import median_ms
from turbomoe.train.graph_step import GraphedStep


def _eager(model: torch.nn.Module, batch: dict[str, object]) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _table(name: str, prof: Profile, top: int) -> None:
    print(f"\n## {name}: {prof.total_ms_per_step:.2f} ms of kernels per step")
    for row in prof.rows[:top]:
        print(f"{row.ms_per_step:8.3f} ms {row.calls_per_step:6.1f}x  {row.name[:110]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()

    device = torch.device("cuda")
    config = qwen3_30b_a3b_config(args.layers)
    model = build_model(
        config, device=device, dtype=torch.bfloat16, seed=0, experts_implementation=None
    )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=gen).to(device)
    batch: dict[str, object] = {"input_ids": ids, "labels": ids, "use_cache": False}

    graphed = GraphedStep(model, warmup_steps=1)
    graphed(**batch)  # eager warm-up
    model.zero_grad(set_to_none=True)
    graphed(**batch)  # capture + first replay
    replay_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    eager_loss = _eager(model, batch)
    eager_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    replay_loss = graphed(**batch)
    diffs = {
        n: ((replay_grads[n].float() - g.float()).norm() / g.float().norm().clamp_min(1e-30)).item()
        for n, g in eager_grads.items()
    }
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    print(f"loss eager {eager_loss.item():.6f} replay {replay_loss.item():.6f}")
    print(f"grads: {sum(d == 0 for d in diffs.values())}/{len(diffs)} bitwise equal; worst {worst}")
    model.zero_grad(set_to_none=True)

    def clear() -> None:
        model.zero_grad(set_to_none=True)

    # Gradients are dropped between calls (outside the window), as an optimizer step would.
    for name, fn in (("eager", lambda: _eager(model, batch)), ("graph", lambda: graphed(**batch))):
        ms = median_ms(fn, device, warmup=0, reps=args.steps, before=clear)  # warmed up above
        print(f"{name}: {ms:.2f} ms/step median of {args.steps} ({args.seq / ms * 1e3:,.0f} TPS)")

    def eager_step() -> None:
        _eager(model, batch)
        model.zero_grad(set_to_none=True)

    def graph_step() -> None:
        graphed(**batch)
        model.zero_grad(set_to_none=True)

    _table("eager", profile_steps(eager_step, device, 2, args.top), args.top)
    _table("graph", profile_steps(graph_step, device, 2, args.top), args.top)


if __name__ == "__main__":
    main()
