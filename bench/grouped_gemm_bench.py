#!/usr/bin/env python3
"""Grouped GEMM benchmark: turbomoe's Hopper kernel against torch._grouped_mm.

One process, one GPU, same inputs for both:
  * correctness first: edge cases (empty experts, one expert taking every row, unrouted rows that
    must be zeroed, sizes that are not multiples of the tiles, float32 outputs) and every timed
    configuration, against a float32 reference computed with torch; outputs are NaN-poisoned
    before each checked call so unwritten elements fail;
  * timing: CUDA events around each call, median over many calls, inputs rotating over several
    sets so that no call finds its operands in L2;
  * TFLOP/s against a dense 8192^3 bf16 matmul measured in the same run.

Shapes are Qwen3-30B-A3B's experts: gate/up (K 2048 -> N 1536) and down (K 768 -> N 2048),
128 experts, 8,192 / 32,768 / 131,072 routed rows, balanced and skewed ("real-ish") routing,
passes forward (y = x w^T), grad-input (dx = dy w) and grad-weight (dw_e = dy_e^T x_e), and
(--passes fwd_gated, gate/up only, --impl native) the forward with SwiGLU in the epilogue against
torch._grouped_mm followed by silu(gate) * up (TFLOP/s counts the GEMM's FLOPs).

Implementations ("--impl"):
  hopper  the internal entry points through bench/hopper_selftest.cu's library (--lib)
  native  libturbomoe's C ABI (tm_grouped_gemm_*), TURBOMOE_LIBRARY or --lib
  none    torch._grouped_mm only
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"gate_up": (2048, 1536), "down": (768, 2048)}  # name -> (K, N)


def parse_shape(name: str) -> tuple[int, int]:
    """(K, N) of a named shape, or of "KxN" (e.g. 4096x1536: a sweep over K at a fixed N keeps
    the tile count fixed, which separates a per-tile cost from the main loop's rate)."""
    if name in SHAPES:
        return SHAPES[name]
    match = re.fullmatch(r"(\d+)x(\d+)", name)
    if match is None:
        raise SystemExit(f"--shapes: {name!r} is neither {', '.join(SHAPES)} nor KxN")
    k, n = int(match.group(1)), int(match.group(2))
    if k % 8 or n % 8 or k <= 0 or n <= 0:
        raise SystemExit(f"--shapes: {name!r}: K and N must be positive multiples of 8")
    return k, n


PASSES = ("fwd", "dx", "dw", "fwd_gather", "dw_gather", "dx_gather", "dw_gather_dy")
# The passes with a gathered operand: x's rows from the token rows (fwd_gather, dw_gather), or
# dy's rows from a per-token gradient (dx_gather, dw_gather_dy: the lean experts' down projection).
GATHER_PASSES = ("fwd_gather", "dw_gather", "dx_gather", "dw_gather_dy")
WEIGHT_PASSES = ("dw", "dw_gather", "dw_gather_dy")
TOP_K = 8  # the gathered passes: each token feeds TOP_K rows
# Kernel variants for A/B timing in one run (environment switches read by the library per call;
# see csrc/grouped_gemm/hopper_gemm.cu).
VARIANTS = {
    # split epilogue (4 stages) for forward / grad-input, quarter epilogue (4 stages and the zero
    # box) with paced zero tiles for grad-weight, idle empty halves
    "default": {},
    "split": {"TURBOMOE_HOPPER_GEMM_EPILOGUE": "split"},  # 4 stages, two-piece epilogue
    "tma": {"TURBOMOE_HOPPER_GEMM_EPILOGUE": "tma"},  # 3 stages, whole-box epilogue
    # 4 stages and the zero box (grad-weight: paced zero tiles), four-piece epilogue
    "quarter": {"TURBOMOE_HOPPER_GEMM_EPILOGUE": "quarter"},
    "direct": {"TURBOMOE_HOPPER_GEMM_EPILOGUE": "direct"},  # fragment stores, 4 stages
    "noskip": {"TURBOMOE_HOPPER_GEMM_SKIP_HALVES": "0"},
    "notrim": {"TURBOMOE_HOPPER_GEMM_TRIM_TAIL": "0"},  # grad-weight: whole tail chunk
    # grad-weight: expert order dealt round-robin, zero tiles computed (the schedule before)
    "nobalance": {"TURBOMOE_HOPPER_GEMM_BALANCE_DW": "0"},
    "deferred": {"TURBOMOE_HOPPER_GEMM_EPILOGUE": "deferred"},  # stores under next WGMMAs
    # fwd_gated: the SwiGLU epilogue (opt-in; the default is the GEMM, then the activation)
    "gated": {"TURBOMOE_HOPPER_GEMM_SWIGLU": "1"},
    # grad-weight in 2-CTA clusters, x's columns multicast to both (TMA multicast); through the
    # default (quarter) epilogue, or the whole-box one
    "cluster": {"TURBOMOE_HOPPER_GEMM_CLUSTER_DW": "1"},
    "cluster_tma": {"TURBOMOE_HOPPER_GEMM_CLUSTER_DW": "1", "TURBOMOE_HOPPER_GEMM_EPILOGUE": "tma"},
    "nocluster": {"TURBOMOE_HOPPER_GEMM_CLUSTER_DW": "0"},
    # grad-weight: empty experts' zero tiles all stored at the start (not paced)
    "nopace": {"TURBOMOE_HOPPER_GEMM_PACE_ZEROS": "0"},
    # forward / grad-input in 2-CTA clusters sharing the weight columns (or rows) by multicast
    "cluster_rows": {"TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS": "1"},
    "cluster_rows_split": {
        "TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS": "1",
        "TURBOMOE_HOPPER_GEMM_EPILOGUE": "split",
    },
    # forward / grad-input in the ping-pong kernel (each consumer warpgroup its own 64-row tile):
    # split epilogue, 4 stages; quarter epilogue, 5 stages
    "pingpong": {"TURBOMOE_HOPPER_GEMM_PINGPONG": "1", "TURBOMOE_HOPPER_GEMM_EPILOGUE": "split"},
    "pingpong_quarter": {
        "TURBOMOE_HOPPER_GEMM_PINGPONG": "1",
        "TURBOMOE_HOPPER_GEMM_EPILOGUE": "quarter",
    },
    # fwd_gather the unfused way: tm_gather_rows into a permuted copy, then the forward
    "gather_composed": {"TURBOMOE_BENCH_GATHER": "composed"},
    "v1": {
        "TURBOMOE_HOPPER_GEMM_EPILOGUE": "direct",
        "TURBOMOE_HOPPER_GEMM_SKIP_HALVES": "0",
        "TURBOMOE_HOPPER_GEMM_TRIM_TAIL": "0",
        "TURBOMOE_HOPPER_GEMM_BALANCE_DW": "0",
        "TURBOMOE_HOPPER_GEMM_CLUSTER_DW": "0",
    },
}
VARIANT_KEYS = (
    "TURBOMOE_HOPPER_GEMM_EPILOGUE",
    "TURBOMOE_HOPPER_GEMM_SKIP_HALVES",
    "TURBOMOE_HOPPER_GEMM_TRIM_TAIL",
    "TURBOMOE_HOPPER_GEMM_BALANCE_DW",
    "TURBOMOE_HOPPER_GEMM_SWIGLU",
    "TURBOMOE_HOPPER_GEMM_CLUSTER_DW",
    "TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS",
    "TURBOMOE_HOPPER_GEMM_PACE_ZEROS",
    "TURBOMOE_HOPPER_GEMM_PINGPONG",
    "TURBOMOE_BENCH_GATHER",
)


def set_variant(name: str) -> None:
    for key in VARIANT_KEYS:
        os.environ.pop(key, None)
    os.environ.update(VARIANTS[name])


def load_native_module() -> Any:
    """python/turbomoe/_native.py without importing the turbomoe package (which patches HF)."""
    spec = importlib.util.spec_from_file_location("tm_native", REPO / "python/turbomoe/_native.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


class Ours:
    """Calls one implementation of the three passes; each returns False when it declined."""

    def __init__(self, impl: str, lib_path: str | None) -> None:
        self.impl = impl
        self.native = load_native_module()
        self.msg = ctypes.create_string_buffer(1024)
        if impl == "hopper":
            self.lib = ctypes.CDLL(lib_path or str(REPO / "build-hopper-so/libhopper_selftest.so"))
            T = self.native._T  # describe()'s packed tm_tensor bytes
            for name in ("hs_forward", "hs_backward_input", "hs_backward_weight"):
                fn = getattr(self.lib, name)
                fn.restype = ctypes.c_int
                fn.argtypes = [T, T, T, T, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        elif impl == "native":
            if lib_path:
                os.environ["TURBOMOE_LIBRARY"] = lib_path
            self.native.lib()

    def _hopper(
        self, name: str, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor
    ) -> bool:
        d = self.native.describe
        rc = getattr(self.lib, name)(
            d(a), d(b), d(offsets), d(out), self.native.stream_for(a), self.msg, len(self.msg)
        )
        if rc == 2:
            raise RuntimeError(f"{name}: {self.msg.value.decode()}")
        return rc == 0

    def _native(
        self, name: str, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor
    ) -> bool:
        d = self.native.describe
        self.native.call(name, d(a), d(b), d(offsets), d(out), None, 0, self.native.stream_for(a))
        return True

    def forward(
        self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, y: torch.Tensor
    ) -> bool:
        if self.impl == "hopper":
            return self._hopper("hs_forward", x, w, offsets, y)
        return self._native("tm_grouped_gemm_forward", x, w, offsets, y)

    def grad_input(
        self, dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, dx: torch.Tensor
    ) -> bool:
        if self.impl == "hopper":
            return self._hopper("hs_backward_input", dy, w, offsets, dx)
        return self._native("tm_grouped_gemm_backward_input", dy, w, offsets, dx)

    def grad_weight(
        self, dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, dw: torch.Tensor
    ) -> bool:
        if self.impl == "hopper":
            return self._hopper("hs_backward_weight", dy, x, offsets, dw)
        return self._native("tm_grouped_gemm_backward_weight", dy, x, offsets, dw)

    def forward_gated(self, ins: dict, act: torch.Tensor) -> bool:
        """gate_up and SwiGLU in one library call (the activation in the epilogue on Hopper);
        act is the checked output, gate_up a scratch buffer of the inputs."""
        if self.impl != "native":
            return False  # the selftest harness builds the plain passes only
        x, w = ins["x"], ins["w"]
        gate_up = ins.get("gate_up")
        if gate_up is None:
            gate_up = ins["gate_up"] = torch.empty(x.shape[0], w.shape[1], **_like(x))
        d = self.native.describe
        params = self.native.make_params(self.native.SwigluParams, variant=1, alpha=1.0, limit=1.0)
        self.native.call(
            "tm_grouped_gemm_swiglu_forward",
            params,
            d(x),
            d(w),
            d(ins["offsets"]),
            d(gate_up),
            d(act),
            self.native.stream_for(x),
        )
        return True

    def gathered(self, pass_: str, ins: dict, out: torch.Tensor) -> bool:
        """A GATHER_PASSES pass with the gathered operand's rows read from the token rows
        (src or dsrc, row pairs // TOP_K) in the operand load, or (TURBOMOE_BENCH_GATHER=composed)
        the gather kernel into a permuted copy, then the plain pass."""
        if self.impl != "native":
            return False
        d, stream = self.native.describe, self.native.stream_for(out)
        pairs, offsets = ins["pairs"], ins["offsets"]
        of_dy = pass_ in ("dx_gather", "dw_gather_dy")
        src = ins["dsrc"] if of_dy else ins["src"]
        if os.environ.get("TURBOMOE_BENCH_GATHER") == "composed":
            key = "dy_gathered" if of_dy else "x_gathered"
            rows = ins.get(key)
            if rows is None:
                rows = ins[key] = torch.empty(ins["dy" if of_dy else "x"].shape, **_like(src))
            self.native.call("tm_gather_rows", d(src), d(pairs), d(offsets), TOP_K, d(rows), stream)
            if pass_ == "fwd_gather":
                return self.forward(rows, ins["w"], offsets, out)
            if pass_ == "dx_gather":
                return self.grad_input(rows, ins["w"], offsets, out)
            if pass_ == "dw_gather_dy":
                return self.grad_weight(rows, ins["x"], offsets, out)
            return self.grad_weight(ins["dy"], rows, offsets, out)
        if pass_ == "fwd_gather":
            name = "tm_grouped_gemm_forward_gathered"
            operands = (d(src), d(pairs), TOP_K, d(ins["w"]))
        elif pass_ == "dx_gather":
            name = "tm_grouped_gemm_backward_input_gathered"
            operands = (d(src), d(pairs), TOP_K, d(ins["w"]))
        elif pass_ == "dw_gather_dy":
            name = "tm_grouped_gemm_backward_weight_gathered_dy"
            operands = (d(src), d(ins["x"]), d(pairs), TOP_K)
        else:
            name = "tm_grouped_gemm_backward_weight_gathered"
            operands = (d(ins["dy"]), d(src), d(pairs), TOP_K)
        self.native.call(name, *operands, d(offsets), d(out), stream)
        return True

    def run(self, pass_: str, ins: dict, out: torch.Tensor) -> bool:
        if pass_ in GATHER_PASSES:
            return self.gathered(pass_, ins, out)
        if pass_ == "fwd_gated":
            return self.forward_gated(ins, out)
        if pass_ == "fwd":
            return self.forward(ins["x"], ins["w"], ins["offsets"], out)
        if pass_ == "dx":
            return self.grad_input(ins["dy"], ins["w"], ins["offsets"], out)
        return self.grad_weight(ins["dy"], ins["x"], ins["offsets"], out)


# ------------------------------------------------------------------------------------ routing


def make_counts(total: int, experts: int, kind: str, gen: torch.Generator) -> list[int]:
    """Rows per expert.

    balanced: as equal as possible. uniform: multinomial over equal expert popularity (counts
    spread by ~sqrt(mean), expert boundaries at arbitrary rows). skewed: multinomial over
    log-normal popularity (sigma 0.6: max/mean about 2-3, like a trained router's spread).
    model: as the benchmark's random-initialised model routes (model_like_counts).
    """
    if kind == "balanced":
        base, extra = divmod(total, experts)
        return [base + (1 if e < extra else 0) for e in range(experts)]
    if kind == "model":
        return model_like_counts(total, experts, gen)
    if kind not in ("uniform", "skewed"):
        raise ValueError(f"routing is {kind!r}, expected balanced, uniform, skewed or model")
    logits = torch.randn(experts, generator=gen) * (0.6 if kind == "skewed" else 0.0)
    probs = torch.softmax(logits, 0)
    sample = torch.multinomial(probs, total, replacement=True, generator=gen)
    return torch.bincount(sample, minlength=experts).tolist()


def model_like_counts(total: int, experts: int, gen: torch.Generator, top_k: int = 8) -> list[int]:
    """Rows per expert as the benchmark's random-initialised Qwen3-30B-A3B routes them.

    Its hidden states are strongly correlated across tokens (causal attention averages), so its
    router sends most tokens to the same few dozen experts: measured on CPU over 12 layers of
    4096 tokens, max/mean 12-16 (an expert takes nearly every token), 33-96 of 128 experts get
    none. Emulated by each of total/top_k tokens taking the top-k of a shared per-expert bias
    (sigma 3) plus its own unit noise: max/mean ~15, ~80 empty experts.
    """
    if total % top_k != 0:
        raise ValueError(f"model routing needs rows divisible by top_k={top_k}, got {total}")
    bias = torch.randn(experts, generator=gen) * 3.0
    logits = bias + torch.randn(total // top_k, experts, generator=gen)
    ids = logits.topk(top_k, dim=-1).indices
    return torch.bincount(ids.reshape(-1), minlength=experts).tolist()


def offsets_from(counts: list[int], device: str) -> torch.Tensor:
    off = [0]
    for c in counts:
        off.append(off[-1] + c)
    return torch.tensor(off, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------- reference


def _like(t: torch.Tensor) -> dict:
    return {"dtype": t.dtype, "device": t.device}


def reference(pass_: str, ins: dict, rows_total: int) -> torch.Tensor:
    """float32 result of a pass, rows past offsets[E] zero."""
    off = ins["offsets"].tolist()
    E = len(off) - 1
    w = ins["w"]
    if pass_ == "fwd_gated":
        gate, up = reference("fwd", ins, rows_total).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if pass_ in ("fwd_gather", "dw_gather"):
        plain = pass_.removesuffix("_gather")
        return reference(plain, {**ins, "x": gathered(ins, rows_total)}, rows_total)
    if pass_ in ("dx_gather", "dw_gather_dy"):
        plain = "dx" if pass_ == "dx_gather" else "dw"
        return reference(plain, {**ins, "dy": gathered_dy(ins, rows_total)}, rows_total)
    if pass_ == "fwd":
        x = ins["x"]
        out = torch.zeros(rows_total, w.shape[1], dtype=torch.float32, device=x.device)
        for e in range(E):
            if off[e + 1] > off[e]:
                out[off[e] : off[e + 1]] = x[off[e] : off[e + 1]].float() @ w[e].float().t()
        return out
    if pass_ == "dx":
        dy = ins["dy"]
        out = torch.zeros(rows_total, w.shape[2], dtype=torch.float32, device=dy.device)
        for e in range(E):
            if off[e + 1] > off[e]:
                out[off[e] : off[e + 1]] = dy[off[e] : off[e + 1]].float() @ w[e].float()
        return out
    dy, x = ins["dy"], ins["x"]
    out = torch.zeros(E, dy.shape[1], x.shape[1], dtype=torch.float32, device=dy.device)
    for e in range(E):
        if off[e + 1] > off[e]:
            out[e] = dy[off[e] : off[e + 1]].float().t() @ x[off[e] : off[e + 1]].float()
    return out


def gathered(ins: dict, rows: int) -> torch.Tensor:
    """The permuted rows fwd_gather reads: src[pairs[r] // TOP_K] (zeros past src's tokens)."""
    return ins["src_padded"].index_select(0, ins["tokens"][:rows])


def gathered_dy(ins: dict, rows: int) -> torch.Tensor:
    """The permuted gradient rows dx_gather reads: dsrc[pairs[r] // TOP_K]."""
    return ins["dsrc_padded"].index_select(0, ins["tokens"][:rows])


def out_shape(pass_: str, ins: dict, rows_total: int) -> tuple[int, ...]:
    E, N, K = ins["w"].shape
    if pass_ == "fwd_gated":
        return (rows_total, N // 2)
    if pass_ in ("fwd", "fwd_gather"):
        return (rows_total, N)
    if pass_ in ("dx", "dx_gather"):
        return (rows_total, K)
    return (E, N, K)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def make_inputs(
    counts: list[int],
    K: int,
    N: int,
    device: str,
    gen: torch.Generator,
    rows_total: int | None = None,
) -> dict:
    E = len(counts)
    routed = sum(counts)
    M = rows_total if rows_total is not None else routed
    bf = torch.bfloat16
    x = torch.randn(M, K, device=device, dtype=torch.float32, generator=gen).to(bf)
    dy = torch.randn(M, N, device=device, dtype=torch.float32, generator=gen).to(bf)
    w = (torch.randn(E, N, K, device=device, dtype=torch.float32, generator=gen) * 0.05).to(bf)
    if M > routed:
        # Unrouted rows hold garbage that must neither leak into dw nor survive in y / dx.
        x[routed:] = float("nan")
        dy[routed:] = float("nan")
    # fwd_gather: tokens whose TOP_K pairs, shuffled, fill the rows; the last token is missing
    # from src, so that its pairs give zero rows.
    tokens = -(-M // TOP_K) + 1
    src = torch.randn(tokens - 1, K, device=device, dtype=torch.float32, generator=gen).to(bf)
    pairs = torch.randperm(tokens * TOP_K, device=device, generator=gen).to(torch.int32)
    # dx_gather / dw_gather_dy: one gradient row per token.
    dsrc = torch.randn(tokens - 1, N, device=device, dtype=torch.float32, generator=gen).to(bf)
    # The torch side of the gathered passes: src / dsrc with a zero row for the missing token,
    # and the rows' tokens.
    src_padded = torch.cat([src, src.new_zeros(1, K)])
    return {
        "routed": routed,
        "src_padded": src_padded,
        "dsrc": dsrc,
        "dsrc_padded": torch.cat([dsrc, dsrc.new_zeros(1, N)]),
        "tokens": (pairs.long() // TOP_K).clamp(max=tokens - 1),
        "x": x,
        "dy": dy,
        "w": w,
        "offsets": offsets_from(counts, device),
        "src": src,
        "pairs": pairs,
    }


# ----------------------------------------------------------------------------- torch baseline


def grouped_mm_fn(pass_: str) -> Callable[[dict], torch.Tensor]:
    """torch._grouped_mm computing the same pass (dw as [E,N,K]; if torch rejects the
    column-major dy^T operand, x^T . dy as [E,K,N], transposed back outside the timing)."""

    def fwd(ins: dict) -> torch.Tensor:
        return torch._grouped_mm(ins["x"], ins["w"].transpose(1, 2), offs=ins["offsets"][1:])

    def fwd_gated(ins: dict) -> torch.Tensor:
        gate, up = fwd(ins).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def fwd_gather(ins: dict) -> torch.Tensor:
        x = gathered(ins, ins["routed"])
        return torch._grouped_mm(x, ins["w"].transpose(1, 2), offs=ins["offsets"][1:])

    def dw_gather(ins: dict) -> torch.Tensor:
        x = gathered(ins, ins["routed"])
        return torch._grouped_mm(ins["dy"][: ins["routed"]].t(), x, offs=ins["offsets"][1:])

    def dx_gather(ins: dict) -> torch.Tensor:
        dy = gathered_dy(ins, ins["routed"])
        return torch._grouped_mm(dy, ins["w"], offs=ins["offsets"][1:])

    def dw_gather_dy(ins: dict) -> torch.Tensor:
        dy = gathered_dy(ins, ins["routed"])
        return torch._grouped_mm(dy.t(), ins["x"][: ins["routed"]], offs=ins["offsets"][1:])

    def dx(ins: dict) -> torch.Tensor:
        return torch._grouped_mm(ins["dy"], ins["w"], offs=ins["offsets"][1:])

    def dw_nk(ins: dict) -> torch.Tensor:
        return torch._grouped_mm(ins["dy"].t(), ins["x"], offs=ins["offsets"][1:])

    def dw_kn(ins: dict) -> torch.Tensor:
        return torch._grouped_mm(ins["x"].t(), ins["dy"], offs=ins["offsets"][1:])

    return {
        "fwd": fwd,
        "fwd_gated": fwd_gated,
        "fwd_gather": fwd_gather,
        "dw_gather": dw_gather,
        "dx_gather": dx_gather,
        "dw_gather_dy": dw_gather_dy,
        "dx": dx,
        "dw": dw_nk,
        "dw_kn": dw_kn,
    }[pass_]


# ------------------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[int], Any], n_sets: int, warmup: int, reps: int) -> float:
    """Median milliseconds of fn(i % n_sets) over reps calls, each bracketed by CUDA events."""
    for i in range(warmup):
        fn(i % n_sets)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def dense_peak(reps: int) -> float:
    n = 8192
    a = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_calls(lambda i: torch.matmul(a[i], b[i], out=c), 2, 5, reps)
    return 2 * n**3 / ms / 1e9


# ----------------------------------------------------------------------------------- checking


def check_case(
    ours: Ours,
    name: str,
    counts: list[int],
    K: int,
    N: int,
    rows_total: int,
    out_dtype: torch.dtype,
    gen: torch.Generator,
    results: list,
) -> bool:
    ins = make_inputs(counts, K, N, "cuda", gen, rows_total)
    ok_all = True
    for pass_ in PASSES:
        shape = out_shape(pass_, ins, rows_total)
        out = torch.full(shape, float("nan"), device="cuda", dtype=out_dtype)
        ran = ours.run(pass_, ins, out)
        torch.cuda.synchronize()
        if not ran:
            results.append({"case": name, "pass": pass_, "status": "declined"})
            print(f"  {name:34s} {pass_:3s} declined (falls back)")
            continue
        ref = reference(pass_, ins, rows_total)
        err = rel_err(out, ref)
        tol = 1e-4 if out_dtype == torch.float32 else 8e-3
        ok = err < tol
        ok_all &= ok
        results.append({"case": name, "pass": pass_, "rel_err": err, "ok": ok})
        print(f"  {name:34s} {pass_:3s} rel_err {err:.2e} {'ok' if ok else 'FAIL'}")
    return ok_all


def edge_cases(ours: Ours, gen: torch.Generator) -> tuple[bool, list]:
    print("correctness: edge cases")
    results: list = []
    ok = True
    cases = [
        # name, counts, K, N, rows_total (> sum: unrouted rows), out dtype
        (
            "mixed counts + unrouted rows",
            [0, 1, 127, 129, 300, 0, 443, 64],
            256,
            512,
            1200,
            torch.bfloat16,
        ),
        ("tile residues K=200 N=136", [70, 0, 33, 250, 5], 200, 136, 358, torch.bfloat16),
        ("one expert takes all", [0, 0, 777, 0], 512, 384, 777, torch.bfloat16),
        ("float32 outputs", [31, 65, 0, 129], 192, 320, 240, torch.float32),
        ("qwen gate_up small", [40] * 16, 2048, 1536, 640, torch.bfloat16),
        ("qwen down small", [17, 0, 200, 3] * 4, 768, 2048, 880, torch.bfloat16),
    ]
    for name, counts, K, N, rows_total, dt in cases:
        ok &= check_case(ours, name, counts, K, N, rows_total, dt, gen, results)
    return ok, results


# ---------------------------------------------------------------------------- one timed pass


def bench_pass(
    row: dict,
    ours: Ours | None,
    variants: list[str],
    sets: list[dict],
    dt: torch.dtype,
    args: argparse.Namespace,
) -> bool:
    """Checks each variant of ours and torch._grouped_mm on one configuration, then times them
    all; fills row, returns False on a wrong result of ours."""
    pass_, rows = row["pass"], row["rows"]
    flops = 2.0 * rows * row["K"] * row["N"]
    shape = out_shape(pass_, sets[0], rows)
    outs = [torch.empty(shape, device="cuda", dtype=dt) for _ in sets]
    ok_all = True
    timed: dict[str, Callable[[int], object]] = {}
    # correctness of the timed configuration (first set, poisoned output) for each variant
    for v in variants if ours is not None else []:
        set_variant(v)
        outs[0].fill_(float("nan"))
        ran = ours.run(pass_, sets[0], outs[0])
        torch.cuda.synchronize()
        if not ran:
            row.setdefault("declined", []).append(v)
            continue
        err = rel_err(outs[0], reference(pass_, sets[0], rows))
        ok = err < (1e-4 if dt == torch.float32 else 8e-3)
        ok_all &= ok
        row.setdefault("variants", {})[v] = {"rel_err": err, "ok": ok, "ms_rounds": []}
        timed[v] = lambda i: ours.run(pass_, sets[i], outs[i])
    gfn = grouped_mm_fn(pass_)
    try:
        try:
            ref_out = gfn(sets[0])
            torch.cuda.synchronize()
        except Exception as exc:
            if pass_ != "dw":
                raise
            row["gmm_note"] = f"dy^T.x rejected ({exc}); timed x^T.dy"[:300]
            gfn = grouped_mm_fn("dw_kn")
            ref_out = gfn(sets[0]).transpose(1, 2)
            torch.cuda.synchronize()
        row["gmm_rel_err"] = rel_err(ref_out, reference(pass_, sets[0], rows))
        del ref_out
        timed["gmm"] = lambda i: gfn(sets[i])
    except Exception as exc:  # report and keep going: the table is the product
        row["gmm_error"] = f"{type(exc).__name__}: {exc}"[:300]
    # Timing in rounds over everything, the order rotated each round, so that a drift of the
    # clock during the run favours no one; each keeps its best round's median.
    names = list(timed)
    best: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            set_variant(n if n != "gmm" else variants[0])
            best[n].append(time_calls(timed[n], len(sets), args.warmup, args.reps))
    set_variant(variants[0])
    for v, res in row.get("variants", {}).items():
        res["ms_rounds"] = best[v]
        res["ms"] = min(best[v])
        res["tflops"] = flops / res["ms"] / 1e9
    if "gmm" in best:
        row["gmm_ms_rounds"] = best["gmm"]
        row["gmm_ms"] = min(best["gmm"])
        row["gmm_tflops"] = flops / row["gmm_ms"] / 1e9
    first = row.get("variants", {}).get(variants[0])
    if first is not None:
        row.update(
            rel_err=first["rel_err"],
            ok=first["ok"],
            ours_ms=first["ms"],
            ours_tflops=first["tflops"],
        )
    if "ours_ms" in row and "gmm_ms" in row:
        row["speedup"] = row["gmm_ms"] / row["ours_ms"]
    return ok_all


# -------------------------------------------------------------------------------------- main


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(r: dict, peak: float, variants: list[str]) -> str:
    ours = r.get("ours_tflops")
    others = "".join(
        f" {fmt(r.get('variants', {}).get(v, {}).get('tflops'), '.0f'):>6s}" for v in variants[1:]
    )
    return (
        f"{r['shape']:8s} {r['rows']:7d} {r['routing']:8s} {r['pass']:4s} "
        f"{fmt(r.get('ours_ms'), '.3f'):>8s} {fmt(ours, '.0f'):>6s} "
        f"{fmt(r.get('gmm_ms'), '.3f'):>8s} {fmt(r.get('gmm_tflops'), '.0f'):>6s} "
        f"{fmt(r.get('speedup'), '.2f'):>6s} "
        f"{fmt(None if ours is None else 100 * ours / peak, '.0f'):>6s} "
        f"{fmt(r.get('rel_err'), '.1e'):>8s}{others}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--impl", choices=("hopper", "native", "none"), default="hopper")
    ap.add_argument("--lib", default=None, help="library for --impl hopper/native")
    ap.add_argument("--rows", default="8192,32768,131072")
    ap.add_argument(
        "--shapes", default="gate_up,down", help="of gate_up, down, or KxN (e.g. 4096x1536)"
    )
    ap.add_argument("--routing", default="balanced,skewed")
    ap.add_argument(
        "--passes",
        default="fwd,dx,dw",
        help="of fwd, dx, dw, fwd_gated, fwd_gather, dw_gather, dx_gather, dw_gather_dy",
    )
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sets", type=int, default=2, help="rotating input sets")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds; best median kept")
    ap.add_argument("--dw-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--skip-edge", action="store_true")
    ap.add_argument(
        "--variants",
        default="default",
        help="kernel variants to check and time; the first is reported as 'ours'",
    )
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    cpu_gen = torch.Generator()
    cpu_gen.manual_seed(99)
    ours = Ours(args.impl, args.lib) if args.impl != "none" else None
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "impl": args.impl,
        "edge": [],
        "rows": [],
    }
    all_ok = True

    variants = args.variants.split(",")
    if ours is not None and not args.skip_edge:
        for v in variants:
            set_variant(v)
            print(f"[variant {v}]")
            ok, res = edge_cases(ours, gen)
            report["edge"] += [dict(r, variant=v) for r in res]
            all_ok &= ok

    peak = dense_peak(20)
    report["dense_peak_tflops"] = peak
    print(f"dense bf16 8192^3 matmul: {peak:.0f} TFLOP/s")

    dw_dtype = torch.float32 if args.dw_dtype == "fp32" else torch.bfloat16
    table = []
    for shape_name in args.shapes.split(","):
        K, N = parse_shape(shape_name)
        for rows in (int(r) for r in args.rows.split(",")):
            for routing in args.routing.split(","):
                counts = make_counts(rows, args.experts, routing, cpu_gen)
                sets = [make_inputs(counts, K, N, "cuda", gen) for _ in range(args.sets)]
                skew = max(counts) / (rows / args.experts)
                for pass_ in args.passes.split(","):
                    if pass_ == "fwd_gated" and shape_name != "gate_up":
                        continue  # the gated epilogue belongs to the gate/up projection
                    dt = dw_dtype if pass_ in WEIGHT_PASSES else torch.bfloat16
                    row = {
                        "shape": shape_name,
                        "K": K,
                        "N": N,
                        "rows": rows,
                        "routing": routing,
                        "max_over_mean": skew,
                        "pass": pass_,
                    }
                    all_ok &= bench_pass(row, ours, variants, sets, dt, args)
                    table.append(row)
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
                del sets
                torch.cuda.empty_cache()

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))

    print()
    print(
        f"dense peak {peak:.0f} TFLOP/s; TFLOP/s = 2*rows*K*N / median time; impl={args.impl}; "
        f"'ours' = variant {variants[0]}, last columns: TF/s of {', '.join(variants[1:]) or '-'}"
    )
    hdr = (
        f"{'shape':8s} {'rows':>7s} {'routing':8s} {'pass':4s} {'ours ms':>8s} {'TF/s':>6s} "
        f"{'gmm ms':>8s} {'TF/s':>6s} {'x gmm':>6s} {'%peak':>6s} {'rel_err':>8s}"
        + "".join(f" {v[:6]:>6s}" for v in variants[1:])
    )
    print(hdr)
    for r in table:
        print(format_row(r, peak, variants))
    print("CORRECTNESS:", "PASS" if all_ok else "FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
