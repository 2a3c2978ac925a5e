"""moe_experts(..., recompute=True): the lean autograd record gives the composed ops' output and
gradients (hidden, routing weights, both expert weights) on every routing shape the
expert-parallel owner sees, and keeps far fewer bytes for the backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from turbomoe.ops import moe_experts

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 19, 40, 12, 6, 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(dtype: torch.dtype, sentinels: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(TOKENS)])
    ids[0] = torch.tensor([1, 1, 1][:TOP_K])  # repeated experts in one token
    if sentinels:  # the owner's view: slots of other ranks' experts carry the sentinel E
        ids[ids >= 4] = EXPERTS
        ids[5] = EXPERTS  # a token with no local slot at all
    return {
        "hidden": torch.randn(TOKENS, HIDDEN, generator=g).to(dtype),
        "ids": ids,
        "weights": torch.rand(TOKENS, TOP_K, generator=g),
        "gate_up": (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.3).to(dtype),
        "down": (torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * 0.3).to(dtype),
        "proj": torch.randn(TOKENS, HIDDEN, generator=g),
    }


def _run(
    inp: dict[str, torch.Tensor], recompute: bool, frozen: bool = False, **kw: object
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    leaves = {
        k: inp[k].clone().requires_grad_(not (frozen and k in ("gate_up", "down")))
        for k in ("hidden", "weights", "gate_up", "down")
    }
    out = moe_experts(
        leaves["hidden"],
        inp["ids"],
        leaves["weights"],
        leaves["gate_up"],
        leaves["down"],
        recompute=recompute,
        **kw,  # type: ignore[arg-type]
    )
    (out.float() * inp["proj"]).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _routed(inp: dict[str, torch.Tensor]) -> int:
    return int((inp["ids"] < EXPERTS).sum())


# TURBOMOE_GATHER_IN_GEMM: x gathered into a copy, or read by the gate/up GEMMs themselves.
GATHER = pytest.mark.parametrize("gather", ["0", "1"], ids=["copy", "in_gemm"])


@GATHER
@pytest.mark.parametrize("sentinels", [False, True])
@pytest.mark.parametrize("activation", ["silu", "clamped"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_lean_record_matches_the_composed_ops_fp32(
    sentinels: bool, activation: str, interleaved: bool, gather: str, monkeypatch
) -> None:
    monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
    inp = _inputs(torch.float32, sentinels)
    kw = {"activation": activation, "interleaved": interleaved}
    if sentinels:
        kw["routed_pairs"] = _routed(inp)  # buffers sized exactly, as the owner does
    want_out, want = _run(inp, recompute=False, **kw)
    got_out, got = _run(inp, recompute=True, **kw)
    assert rel(got_out, want_out) <= 1e-6
    for name in want:
        assert rel(got[name], want[name]) <= 1e-5, name


def test_lean_record_matches_in_bf16() -> None:
    inp = _inputs(torch.bfloat16, sentinels=True, seed=3)
    want_out, want = _run(inp, recompute=False)
    got_out, got = _run(inp, recompute=True)
    assert rel(got_out, want_out) == 0.0  # the same forward ops
    for name in want:
        assert rel(got[name], want[name]) <= 2e-2, name


def test_frozen_experts_get_no_gradient_and_the_rest_is_unchanged() -> None:
    inp = _inputs(torch.float32, sentinels=False, seed=1)
    _, want = _run(inp, recompute=False, frozen=True)
    _, got = _run(inp, recompute=True, frozen=True)
    assert got["gate_up"] is None and got["down"] is None
    assert rel(got["hidden"], want["hidden"]) <= 1e-5
    assert rel(got["weights"], want["weights"]) <= 1e-5


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_lean_record_keeps_much_less_for_the_backward() -> None:
    inp = _inputs(torch.float32, sentinels=False, seed=2)
    leaves = [inp[k].clone().requires_grad_() for k in ("hidden", "weights", "gate_up", "down")]

    def call(recompute: bool) -> Callable[[], torch.Tensor]:
        return lambda: moe_experts(
            leaves[0], inp["ids"], leaves[1], leaves[2], leaves[3], recompute=recompute
        )

    composed, lean = _saved_bytes(call(False)), _saved_bytes(call(True))
    params = (leaves[2].numel() + leaves[3].numel()) * 4  # both paths keep the weights
    rows = TOKENS * TOP_K
    # Composed: x, gate/up, activation and down output per row; lean: the input and gate/up.
    assert composed - params >= rows * (HIDDEN + 2 * INTER + INTER + HIDDEN) * 4
    assert lean - params <= (TOKENS * HIDDEN + rows * 2 * INTER) * 4 + rows * 64


@GATHER
def test_an_owner_without_routed_rows_gets_zero_gradients(gather: str, monkeypatch) -> None:
    monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
    inp = _inputs(torch.float32, sentinels=True, seed=4)
    inp["ids"] = torch.full_like(inp["ids"], EXPERTS)  # every slot belongs to another rank
    want_out, want = _run(inp, recompute=False, routed_pairs=0)
    got_out, got = _run(inp, recompute=True, routed_pairs=0)
    assert torch.equal(got_out, torch.zeros_like(got_out)) and torch.equal(got_out, want_out)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "clamped"])
def test_fused_activation_backward_equals_the_four_passes(
    dtype: torch.dtype, activation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-pass activation backward rounds where the four passes stored: same gradients."""
    inp = _inputs(dtype, sentinels=True)
    kw = {"activation": activation, "routed_pairs": _routed(inp)}
    fused_out, fused = _run(inp, recompute=True, **kw)
    monkeypatch.setenv("TURBOMOE_FUSED_ACT_BACKWARD", "0")
    composed_out, composed = _run(inp, recompute=True, **kw)
    assert torch.equal(fused_out, composed_out)
    for name in ("hidden", "gate_up", "down"):
        assert torch.equal(fused[name], composed[name]), name
    # The routing weights' gradient is a row sum: the same up to summation order.
    torch.testing.assert_close(fused["weights"], composed["weights"], rtol=1e-5, atol=1e-6)


def test_gather_in_gemm_changes_no_bit_of_the_lean_record(monkeypatch) -> None:
    """On the CPU the gathered GEMMs run the same rows through the same loops as gather + GEMM:
    output and every gradient of the lean experts are bitwise those of the copying version."""
    inp = _inputs(torch.bfloat16, sentinels=True, seed=5)
    results = []
    for gather in ("0", "1"):
        monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
        results.append(_run(inp, recompute=True, routed_pairs=_routed(inp)))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
