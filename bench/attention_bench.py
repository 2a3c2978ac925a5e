#!/usr/bin/env python3
"""Which PyTorch SDPA backend is fastest for training on this GPU (DESIGN §3, attention).

Times forward and forward + backward of ``scaled_dot_product_attention`` for each backend
(flash, cuDNN, memory-efficient) on the benchmark's attention shape (Qwen3-30B-A3B: 32 query /
4 KV heads, head dim 128, causal), with GQA handled two ways: ``enable_gqa=True`` on the
[B, 4, S, D] key/value, and key/value expanded to 32 heads first (the expansion's copy counted).
Every backend's output and gradients are checked against the math backend in float32 first.

CUDA events, median over ``--reps`` calls after warm-up; TFLOP/s use the causal FLOP count
(forward 2·2·S²·D·Hq / 2, backward 2.5× forward).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from turbomoe.bench.timing import median_ms

CUDA = torch.device("cuda")
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: str, backend: SDPBackend
) -> torch.Tensor:
    with sdpa_kernel([backend]):
        if gqa == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), is_causal=True
        )


def check(backend: SDPBackend, gqa: str, heads: int, kv_heads: int, dim: int) -> float:
    """Largest relative error of out / dq / dk / dv against float32 math on a small shape."""
    torch.manual_seed(0)
    shape_q, shape_kv = (1, heads, 256, dim), (1, kv_heads, 256, dim)
    q, k, v = (
        torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for s in (shape_q, shape_kv, shape_kv)
    )
    grad = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    out = attention(q, k, v, gqa, backend)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_out = attention(*ref_in, "expand", SDPBackend.MATH)
    ref = [ref_out, *torch.autograd.grad(ref_out, ref_in, grad.float())]
    return max(float((g.float() - r).norm() / r.norm()) for g, r in zip(got, ref, strict=True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    b, s, hq, hk, d = a.batch, a.seq, a.heads, a.kv_heads, a.dim
    fwd_flop = 4 * b * hq * s * s * d / 2
    rows = []
    torch.manual_seed(0)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
    gpu = torch.cuda.get_device_name()
    print(f"attention B={b} S={s} Hq={hq} Hkv={hk} D={d} causal bf16 on {gpu}")
    print(
        f"{'backend':<10} {'gqa':<11} {'rel err':>8} {'fwd ms':>7} {'fwd TF/s':>8} "
        f"{'bwd ms':>7} {'bwd TF/s':>8} {'f+b ms':>7}"
    )
    for name, backend in BACKENDS.items():
        for gqa in ("enable_gqa", "expand"):
            row: dict[str, object] = {"backend": name, "gqa": gqa}
            try:
                row["rel_err"] = check(backend, gqa, hq, hk, d)

                def fwd(gqa: str = gqa, backend: SDPBackend = backend) -> torch.Tensor:
                    with torch.no_grad():
                        return attention(q, k, v, gqa, backend)

                def fwd_bwd(gqa: str = gqa, backend: SDPBackend = backend) -> None:
                    out = attention(q, k, v, gqa, backend)
                    torch.autograd.grad(out, (q, k, v), grad)

                f_ms = median_ms(fwd, CUDA, a.warmup, a.reps)
                fb_ms = median_ms(fwd_bwd, CUDA, a.warmup, a.reps)
                row.update(fwd_ms=f_ms, fwd_bwd_ms=fb_ms, bwd_ms=fb_ms - f_ms)
                row["fwd_tflops"] = fwd_flop / f_ms / 1e9
                row["bwd_tflops"] = 2.5 * fwd_flop / max(fb_ms - f_ms, 1e-6) / 1e9
                print(
                    f"{name:<10} {gqa:<11} {row['rel_err']:>8.1e} {f_ms:>7.3f} "
                    f"{row['fwd_tflops']:>8.0f} {fb_ms - f_ms:>7.3f} {row['bwd_tflops']:>8.0f} "
                    f"{fb_ms:>7.3f}"
                )
            except RuntimeError as exc:  # a backend that does not take these inputs
                row["error"] = str(exc).splitlines()[0][:160]
                print(f"{name:<10} {gqa:<11} not available: {row['error']}")
            rows.append(row)
    ok = [r for r in rows if "fwd_bwd_ms" in r and float(r["rel_err"]) < 2e-2]  # type: ignore[arg-type]
    if ok:
        best = min(ok, key=lambda r: float(r["fwd_bwd_ms"]))  # type: ignore[arg-type]
        print(f"fastest forward + backward: {best['backend']} ({best['gqa']})")
    if a.json:
        a.json.write_text(json.dumps({"shape": vars(a) | {"json": None}, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
