"""TURBOMOE_PDL=1 (programmatic dependent launch, csrc/common/launch.cuh) changes when kernels
start, never what they compute: a chain of turbomoe's kernels gives bitwise the results it gives
without it, eagerly and replayed from a CUDA graph. A kernel that touched memory before waiting
for its predecessor would read that predecessor's output half-written here (the chains are of
short dependent kernels, where the next grid is resident before the previous one ends)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import turbomoe.ops as tops

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BF16 = torch.bfloat16
Outputs = list[torch.Tensor]


def _under_switch(
    monkeypatch: pytest.MonkeyPatch, value: str, fn: Callable[[], Outputs]
) -> Outputs:
    monkeypatch.setenv("TURBOMOE_PDL", value)
    try:
        out = fn()
        torch.cuda.synchronize()
        return out
    finally:
        monkeypatch.delenv("TURBOMOE_PDL")


def _assert_bitwise(got: Outputs, want: Outputs, seed: int) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape)
        assert torch.isfinite(a.float()).all(), f"seed {seed}: output {i} not finite"
        assert torch.equal(a, b), f"seed {seed}: output {i} differs with TURBOMOE_PDL=1"


def test_a_chain_of_short_dependent_kernels_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """400 of turbomoe's kernels in a row, each reading the one before: a row permutation
    (gather) then an RMSNorm, 200 times. The kernels are a few µs, so with PDL each next grid
    is already resident when its predecessor ends, which is where a missing wait shows; the
    permutation keeps the chain from settling on values a stale read would also give."""
    seed = int(torch.randint(0, 2**31, (1,)))
    gen = torch.Generator().manual_seed(seed)
    rows, hidden = 64, 2048
    x0 = torch.randn(rows, hidden, generator=gen).to(BF16).to(CUDA)
    w = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(BF16).to(CUDA)
    perm = torch.randperm(rows, generator=gen).to(torch.int32).to(CUDA)
    offsets = torch.tensor([0, rows], dtype=torch.int32, device=CUDA)

    def chain() -> Outputs:
        x, seen = x0, []
        for i in range(200):
            x = tops.rms_norm(tops.gather_rows(x, perm, offsets, 1), w, 1e-6)
            if i % 25 == 24:
                seen.append(x)
        return seen

    want = _under_switch(monkeypatch, "0", chain)
    _assert_bitwise(_under_switch(monkeypatch, "1", chain), want, seed)


def _moe_layer(seed: int) -> Callable[[], Outputs]:
    """Routing, the experts (plan, gather, grouped GEMMs, SwiGLU, combine) and a norm, forward and
    backward, at the Qwen3-30B-A3B expert shapes with 2,048 tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens, hidden, inter, experts, top_k = 2048, 2048, 768, 128, 8
    x0 = torch.randn(tokens, hidden, generator=gen).to(BF16).to(CUDA)
    router = (torch.randn(experts, hidden, generator=gen) * hidden**-0.5).to(BF16).to(CUDA)
    gate_up0 = (torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(BF16)
    down0 = (torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5).to(BF16)
    norm_w = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(BF16).to(CUDA)
    gate_up0, down0 = gate_up0.to(CUDA), down0.to(CUDA)
    grad_out = torch.randn(tokens, hidden, generator=gen).to(BF16).to(CUDA)

    def run() -> Outputs:
        x = x0.clone().requires_grad_()
        gate_up, down = gate_up0.clone().requires_grad_(), down0.clone().requires_grad_()
        h = tops.rms_norm(x, norm_w, 1e-6)
        weights, ids = tops.route(h @ router.t(), top_k, "softmax_topk", True)
        out = tops.moe_experts(h, ids, weights.to(BF16), gate_up, down)
        out.backward(grad_out)
        assert x.grad is not None and gate_up.grad is not None and down.grad is not None
        return [out.detach(), x.grad, gate_up.grad, down.grad]

    return run


def test_an_moe_layer_forward_and_backward_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = int(torch.randint(0, 2**31, (1,)))
    run = _moe_layer(seed)
    want = _under_switch(monkeypatch, "0", run)
    _assert_bitwise(_under_switch(monkeypatch, "1", run), want, seed)


def test_the_same_layer_replayed_from_a_graph_captured_with_pdl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stream capture turns the launches' programmatic serialisation into programmatic edges of the
    graph; each replay must give the eager results bitwise."""
    seed = int(torch.randint(0, 2**31, (1,)))
    gen = torch.Generator().manual_seed(seed)
    tokens, hidden = 4096, 2048
    x = torch.randn(tokens, hidden, generator=gen).to(BF16).to(CUDA)
    w = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(BF16).to(CUDA)
    pairs = torch.randperm(tokens * 8, generator=gen).to(torch.int32).to(CUDA)
    offsets = torch.tensor([0, tokens * 8], dtype=torch.int32, device=CUDA)

    def body() -> Outputs:
        h = tops.rms_norm(x, w, 1e-6)
        rows = tops.gather_rows(h, pairs, offsets, 8)
        y = tops.rms_norm(rows, w, 1e-6)
        return [h, rows, y]

    want = _under_switch(monkeypatch, "0", lambda: [t.clone() for t in body()])
    monkeypatch.setenv("TURBOMOE_PDL", "1")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # warm-up outside the capture (workspace sizes, attributes)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body()
    for _ in range(3):
        for t in outs:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_bitwise([t.clone() for t in outs], want, seed)
