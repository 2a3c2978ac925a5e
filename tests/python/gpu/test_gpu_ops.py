"""Every turbomoe op on CUDA against the same op on CPU (the C++ CPU reference), forward and
backward, on fresh random inputs, with torch's caching allocator poisoned so that an output
element a kernel forgets to write reads as NaN (or as a huge integer) and fails the comparison.

Tolerances (relative Frobenius error): float32 1e-5 (1e-4 where long GEMM reductions are
involved), bfloat16 1e-2.

Run on a GPU machine with TURBOMOE_GPU_TESTS=1 (tests/python/conftest.py deselects them otherwise
and refuses to run them without CUDA).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import pytest
import torch

import turbomoe.ops as tops

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
F32, BF16 = torch.float32, torch.bfloat16
NAN_BYTE, BIG_BYTE = 0xFF, 0x7F  # float NaN / bf16 NaN;  int32 0x7F7F7F7F, floats ~3e38


def randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """torch.randn(shape, generator=generator) on the CPU; from 16 M values on, drawn on the GPU
    from a seed taken from generator (the test still replays from its printed seed) and brought
    back: the CPU generator took seconds for each Qwen3 expert weight (400 M values)."""
    if math.prod(shape) < 1 << 24:
        return torch.randn(shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    on_gpu = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(shape, generator=on_gpu, device=CUDA).cpu()


def caching_allocator_disabled() -> bool:
    return os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "") == "1"


def poison(byte: int = NAN_BYTE) -> None:
    """Fill free memory of torch's caching allocator with byte, then free it again.

    Large requests (> 1 MiB) are carved from one big poisoned segment and small ones from many
    poisoned 2 MiB small-pool segments, so the next torch.empty returns poisoned memory. Without
    the caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1: the suite's compute-sanitizer stage)
    there is no pool to fill, only the freed range the next cudaMalloc is likely to reuse, so the
    big segment is capped at 1 GiB: with 16 GiB filled before every run the memcheck stage ran
    out of device memory (nineteenth session) and spent most of its time in the fills. Under
    pytest-xdist it is capped at 4 GiB, the device being shared by the workers.
    """
    free, _total = torch.cuda.mem_get_info()
    # Under pytest-xdist (the suite's PYTEST_WORKERS) several workers share the device, and what
    # one poisons stays in its cache until the test ends (the conftest empties it then).
    cap = 1 << 30 if caching_allocator_disabled() else 16 << 30
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cap = min(cap, 4 << 30)
    big = torch.empty(min(free // 2, cap), dtype=torch.uint8, device=CUDA).fill_(byte)
    small = [torch.empty(512 << 10, dtype=torch.uint8, device=CUDA).fill_(byte) for _ in range(128)]
    del big, small
    torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b, in float64 on the GPU: on the CPU the comparison
    of one Qwen3 expert-weight gradient (400 M elements) took seconds, a third of such a test."""
    a, b = a.detach().to(CUDA, torch.float64), b.detach().to(CUDA, torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tolerance(dtype: torch.dtype, fp32_tol: float = 1e-5) -> float:
    return fp32_tol if dtype == F32 else 1e-2


def run(
    fn: Callable[..., object],
    args: Sequence[object],
    diff: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fn(*args) on device with float tensors in dtype, then the gradients of the inputs listed in
    diff against fixed random upstream gradients. Returns (outputs, gradients), on device."""
    moved: list[object] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.to(device)
            if a.is_floating_point():
                a = a.to(dtype)
            if i in diff:
                a = a.detach().requires_grad_(True)
        moved.append(a)
    if device.type == "cuda":
        poison()
    out = fn(*moved)
    outs = list(out) if isinstance(out, tuple | list) else [out]
    float_outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
    grads: list[torch.Tensor] = []
    if diff and float_outs:
        gen = torch.Generator().manual_seed(seed + 1)
        upstream = [
            torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device, o.dtype)
            for o in float_outs
        ]
        if device.type == "cuda":
            poison()
        inputs = [moved[i] for i in diff]
        grads = list(torch.autograd.grad(float_outs, inputs, upstream, allow_unused=False))
    return [o.detach() for o in outs], [g.detach() for g in grads]


def check(
    fn: Callable[..., object],
    args: Sequence[object],
    diff: Sequence[int],
    dtype: torch.dtype,
    seed: int,
    fp32_tol: float = 1e-5,
    reference: Callable[..., object] | None = None,
) -> None:
    """CUDA against the same op on CPU, both in dtype, on the same (dtype-rounded) inputs.

    Both round at the same points, so bf16 results differ only by accumulation order. Where the
    C++ CPU reference is too slow for a shape (it runs about 1 GFLOP/s; one Qwen3 expert layer
    of 512 tokens is ~120 GFLOP forward and backward), reference names a plain torch version of
    the same math, run on the GPU in float64 instead (bf16 then differs from it by its own
    rounding, measured at 2e-3 to 5e-3 for these ops). With such a reference both runs are on
    the GPU, and so is the rounding of the inputs (seconds on the CPU at those shapes).
    """
    where = torch.device("cpu") if reference is None else CUDA
    rounded = [
        a.to(where).to(dtype).to(F32)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    ]
    if reference is None:
        ref_outs, ref_grads = run(fn, rounded, diff, torch.device("cpu"), dtype, seed)
    else:
        ref_outs, ref_grads = run(reference, rounded, diff, CUDA, torch.float64, seed)
    outs, grads = run(fn, rounded, diff, CUDA, dtype, seed)
    tol = tolerance(dtype, fp32_tol)
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        assert o.shape == r.shape, f"output {i}"
        if r.is_floating_point():
            assert rel(o, r) < tol, f"output {i}: rel {rel(o, r):.3g}"
        else:
            assert o.dtype == r.dtype and torch.equal(o.cpu(), r.cpu()), f"output {i} differs"
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert g.shape == r.shape, f"grad {i}"
        assert rel(g, r) < tol, f"grad of input {diff[i]}: rel {rel(g, r):.3g}"


def fresh_seed() -> int:
    """Fresh random inputs on every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return seed


def distinct_ids(tokens: int, top_k: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(tokens, experts, generator=gen)
    return scores.topk(top_k, dim=-1).indices


DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")]


def test_import_does_not_initialise_cuda():
    code = "import torch, turbomoe, turbomoe.ops; assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


# ------------------------------------------------------------------------------------ routing

DEEPSEEK_FEW_GROUPS = {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5}

ROUTING = [
    ("softmax_topk", 513, 128, 8, True, {}),
    ("softmax_topk", 13, 5, 2, False, {}),
    ("topk_softmax", 257, 32, 4, False, {}),
    ("sigmoid_group_topk", 300, 256, 8, True, {"n_group": 8, "topk_group": 4}),
    ("sigmoid_group_topk", 13, 6, 2, False, {"routed_scaling_factor": 2.5}),
    # DeepSeek-V3's recipe on few groups: group masking (topk_group < n_group) together with
    # renormalisation and the routed scaling factor, forward and backward
    ("sigmoid_group_topk", 300, 16, 4, True, DEEPSEEK_FEW_GROUPS),
    ("sigmoid_group_topk", 97, 256, 8, True, DEEPSEEK_FEW_GROUPS),
    ("softmax_topk", 300, 64, 6, False, {}),  # plain probabilities, experts over two warp widths
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kind", "tokens", "experts", "top_k", "renorm", "extra"), ROUTING)
def test_route(kind, tokens, experts, top_k, renorm, extra, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen)
    bias = None
    if kind == "sigmoid_group_topk":
        bias = torch.randn(experts, generator=gen) * 0.05
        extra = {**extra, "renorm_epsilon": 1e-20}

    def fn(lg: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b = None if b is None else b.float()
        return tops.route(lg, top_k, kind, renorm, correction_bias=b, **extra)

    check(fn, [logits, bias], [0], dtype, seed)


# ------------------------------------------------------------------------------------ permute

PERMUTE = [(13, 2, 5), (512, 8, 128), (4096, 8, 128), (1, 1, 1)]


@pytest.mark.parametrize(("tokens", "top_k", "experts"), PERMUTE)
@pytest.mark.parametrize("byte", [NAN_BYTE, BIG_BYTE])
def test_permute_plan(tokens, top_k, experts, byte):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.1] = experts  # EP sentinel
    if experts > 2:
        ids[ids == 1] = 0  # expert 1 idle
    for index_dtype in (torch.int64, torch.int32):
        ref = tops.permute_plan(ids.to(index_dtype), experts)
        poison(byte)
        out = tops.permute_plan(ids.to(index_dtype).to(CUDA), experts)
        for o, r in zip(out, ref, strict=True):
            assert torch.equal(o.cpu(), r)


def test_permute_plan_all_to_one_expert_and_empty():
    ids = torch.full((700, 4), 3)
    ref = tops.permute_plan(ids, 8)
    poison()
    for o, r in zip(tops.permute_plan(ids.to(CUDA), 8), ref, strict=True):
        assert torch.equal(o.cpu(), r)
    poison()
    out = tops.permute_plan(torch.zeros(0, 4, dtype=torch.int64, device=CUDA), 8)
    assert out[2].cpu().tolist() == [0] * 9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hidden", "top_k", "experts"), [(13, 72, 2, 5), (512, 2048, 8, 128)]
)
def test_gather_rows_and_combine(tokens, hidden, top_k, experts, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.1] = experts
    sorted_pairs, pair_to_row, offsets = tops.permute_plan(ids, experts)
    x = torch.randn(tokens, hidden, generator=gen)
    rows = torch.randn(tokens * top_k, hidden, generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen)

    def gather(x_: torch.Tensor, sp: torch.Tensor, off: torch.Tensor, p2r: torch.Tensor):
        return tops.gather_rows(x_, sp, off, top_k, pair_to_row=p2r)

    check(gather, [x, sorted_pairs, offsets, pair_to_row], [0], dtype, seed)

    def combine_weighted(r: torch.Tensor, p2r: torch.Tensor, w: torch.Tensor):
        return tops.combine(r, p2r, w.float(), top_k)

    check(combine_weighted, [rows, pair_to_row, weights], [0, 2], dtype, seed)

    def combine_plain(r: torch.Tensor, p2r: torch.Tensor):
        return tops.combine(r, p2r, None, top_k)

    check(combine_plain, [rows, pair_to_row], [0], dtype, seed)

    # With the plan's offsets the backward clears only the dropped pairs' rows (the ~10% past
    # offsets[E]) in its own launch; poisoned, they must still come back as zeros.
    def combine_planned(r: torch.Tensor, p2r: torch.Tensor, w: torch.Tensor, off: torch.Tensor):
        return tops.combine(r, p2r, w.float(), top_k, expert_offsets=off)

    check(combine_planned, [rows, pair_to_row, weights, offsets], [0, 2], dtype, seed)


@pytest.mark.parametrize(
    "weights_dtype", [pytest.param(F32, id="w_fp32"), pytest.param(BF16, id="w_bf16")]
)
@pytest.mark.parametrize(
    ("tokens", "hidden", "top_k", "experts"), [(13, 72, 2, 5), (77, 13, 4, 8), (512, 2048, 8, 128)]
)
def test_combine_bf16_rows(tokens, hidden, top_k, experts, weights_dtype):
    """bf16 rows with float32 (as the router returns them) or bf16 routing weights, forward
    and backward; hidden 13 (26-byte rows) takes the element-wise kernels, the others vectors."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.1] = experts
    _sorted, pair_to_row, _offsets = tops.permute_plan(ids, experts)
    rows = torch.randn(tokens * top_k, hidden, generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen)

    def fn(r: torch.Tensor, p2r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return tops.combine(r, p2r, w.to(weights_dtype), top_k)

    check(fn, [rows, pair_to_row, weights], [0, 2], BF16, seed)


@pytest.mark.parametrize(
    ("tokens", "hidden", "top_k", "experts"),
    [(77, 13, 4, 8), (300, 72, 11, 16), (512, 2048, 8, 128)],
)
def test_combine_backward_with_offsets_is_bitwise_the_cleared_one(tokens, hidden, top_k, experts):
    """The batched backward with the plan's offsets (tail rows cleared in the kernel) against
    the same kernel after a memset of every row: the same bits, the dropped pairs' rows zero.
    K = 11 spans two slot batches; hidden 13 takes the element-wise kernel."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.1] = experts
    _sorted, pair_to_row, offsets = (t.to(CUDA) for t in tops.permute_plan(ids, experts))
    rows = torch.randn(tokens * top_k, hidden, generator=gen).to(CUDA, BF16)
    weights = torch.rand(tokens, top_k, generator=gen).to(CUDA)
    grad_out = torch.randn(tokens, hidden, generator=gen).to(CUDA, BF16)
    backward = torch.ops.turbomoe.combine_backward.default
    poison()
    planned = backward(grad_out, rows, pair_to_row, weights, offsets)
    poison()
    cleared = backward(grad_out, rows, pair_to_row, weights, None)
    for a, b in zip(planned, cleared, strict=True):
        assert torch.equal(a, b), f"seed {seed}"
    routed = int(offsets[-1])
    assert routed < tokens * top_k, f"seed {seed}: no dropped pair, nothing cleared"
    assert torch.count_nonzero(planned[0][routed:]) == 0


# ------------------------------------------------------------------------------- grouped GEMM


def torch_grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert matmuls; rows past offsets[E] are zero."""
    bounds = offsets.tolist()
    parts = [x[bounds[e] : bounds[e + 1]] @ w[e].t() for e in range(w.shape[0])]
    parts.append(x.new_zeros((x.shape[0] - bounds[-1], w.shape[1])))
    return torch.cat(parts)


def offsets_with_idle_expert(
    tokens: int, top_k: int, experts: int, gen: torch.Generator
) -> torch.Tensor:
    """expert_offsets of random routing in which expert 0 gets no rows and its pairs are dropped
    (so that some rows lie past offsets[E])."""
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[ids == 0] = experts
    return tops.permute_plan(ids, experts)[2]


GEMMS = [
    # (tokens, top_k, experts, N, K, large): odd small, medium, then Qwen3-30B-A3B's gate_up
    # and down projections at 512 tokens
    (13, 2, 5, 48, 72, False),
    (64, 8, 16, 256, 512, False),
    (512, 8, 128, 1536, 2048, True),
    (512, 8, 128, 2048, 768, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("tokens", "top_k", "experts", "n", "k", "large"), GEMMS)
def test_grouped_gemm(tokens, top_k, experts, n, k, large, transposed, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_with_idle_expert(tokens, top_k, experts, gen)
    x = torch.randn(tokens * top_k, k, generator=gen)
    shape = (experts, k, n) if transposed else (experts, n, k)
    w = randn(*shape, generator=gen) * k**-0.5

    def fn(x_: torch.Tensor, w_: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        return tops.grouped_gemm(x_, w_.transpose(1, 2) if transposed else w_, off)

    def reference(x_: torch.Tensor, w_: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        return torch_grouped_gemm(x_, w_.transpose(1, 2) if transposed else w_, off)

    check(fn, [x, w, offsets], [0, 1], dtype, seed, 1e-4, reference if large else None)


@pytest.mark.parametrize("pace_zeros", ["0", "1"])
@pytest.mark.parametrize("clusters", ["0", "1"])
@pytest.mark.parametrize("empty_share", [0.05, 0.7])
@pytest.mark.parametrize(("n", "k"), [(1536, 2048), (2048, 768), (48, 72)])
def test_grouped_gemm_grad_weight_ignores_rows_outside_each_expert(
    n: int,
    k: int,
    empty_share: float,
    clusters: str,
    pace_zeros: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dw[e] reads only expert e's rows: every expert's last reduction chunk reaches into the next
    expert's rows (counts are not multiples of 16 or 64) and the last one into unrouted rows,
    here NaN in both operands, which must not leak into any expert's gradient. Experts without
    rows get exact zeros (with many of them, as real routing gives, most tiles are such). Also
    through the 2-CTA cluster kernel (N a multiple of 256), whose CTAs clear their own copies of
    the shared x operand; and with the zero tiles paced by the operand loads."""
    monkeypatch.setenv("TURBOMOE_HOPPER_GEMM_CLUSTER_DW", clusters)
    monkeypatch.setenv("TURBOMOE_HOPPER_GEMM_PACE_ZEROS", pace_zeros)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    experts = 40
    counts = torch.randint(1, 300, (experts,), generator=gen)
    counts[torch.rand(experts, generator=gen) < empty_share] = 0
    counts[3], counts[5], counts[7] = 0, 1, 16
    counts[11] = 2000  # one expert with most rows: the longest tiles
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    routed = int(offsets[-1])
    rows = routed + 37  # unrouted rows past offsets[E]
    x = torch.randn(rows, k, generator=gen).to(BF16)
    dy = torch.randn(rows, n, generator=gen).to(BF16)
    x[routed:], dy[routed:] = float("nan"), float("nan")
    poison()
    op = torch.ops.turbomoe.grouped_gemm_backward_weight
    dw = op(dy.to(CUDA), x.to(CUDA), offsets.to(CUDA), BF16).cpu()
    bounds = offsets.tolist()
    ref = torch.stack(
        [
            dy[bounds[e] : bounds[e + 1]].float().t() @ x[bounds[e] : bounds[e + 1]].float()
            for e in range(experts)
        ]
    )
    assert dw.shape == (experts, n, k)
    assert torch.isfinite(dw).all(), f"seed {seed}: NaN leaked into dw"
    empty = (counts == 0).nonzero().flatten().tolist()
    assert float(dw[empty].abs().max()) == 0.0, f"seed {seed}: experts without rows {empty}"
    err = rel(dw, ref)
    assert err < 1e-2, f"seed {seed}: rel error {err}"


def skewed_offsets(experts: int, rows: int, gen: torch.Generator) -> torch.Tensor:
    """expert_offsets under routing like the model's: a few experts with most rows, a third with
    none, counts not multiples of 64 or 128."""
    share = torch.rand(experts, generator=gen) ** 6
    share[torch.rand(experts, generator=gen) < 0.3] = 0
    counts = (share / share.sum() * rows).floor().to(torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)


@pytest.mark.parametrize("epilogue", ["", "tma"])  # "": the default (quarter)
@pytest.mark.parametrize(("n", "k"), [(1536, 2048), (2048, 768)])
def test_grouped_gemm_grad_weight_clusters_equal_single_ctas(n: int, k: int, epilogue: str) -> None:
    """The 2-CTA cluster kernel (x's columns multicast to both CTAs) runs the same WGMMAs in the
    same order as one CTA a tile, so its dw must be bitwise the single-CTA kernel's, under
    skewed routing like the model's (a few experts with most rows, many empty), through either
    epilogue the clusters take."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    offsets = skewed_offsets(128, 8192, gen)
    rows = int(offsets[-1]) + 5
    x = torch.randn(rows, k, generator=gen).to(BF16).to(CUDA)
    dy = torch.randn(rows, n, generator=gen).to(BF16).to(CUDA)
    op = torch.ops.turbomoe.grouped_gemm_backward_weight
    results = {}
    for clusters in ("0", "1"):
        os.environ["TURBOMOE_HOPPER_GEMM_CLUSTER_DW"] = clusters
        os.environ["TURBOMOE_HOPPER_GEMM_EPILOGUE"] = epilogue
        try:
            poison()
            results[clusters] = op(dy, x, offsets.to(CUDA), BF16)
        finally:
            os.environ.pop("TURBOMOE_HOPPER_GEMM_CLUSTER_DW", None)
            os.environ.pop("TURBOMOE_HOPPER_GEMM_EPILOGUE", None)
    assert torch.isfinite(results["1"]).all(), f"seed {seed}"
    assert torch.equal(results["0"], results["1"]), f"seed {seed}: clusters differ"


@pytest.mark.parametrize(
    ("switch", "epilogue"),
    [
        ("TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS", "tma"),
        ("TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS", "split"),
        ("TURBOMOE_HOPPER_GEMM_PINGPONG", "split"),
        ("TURBOMOE_HOPPER_GEMM_PINGPONG", "quarter"),
    ],
)
@pytest.mark.parametrize("pass_name", ["forward", "grad_input"])
@pytest.mark.parametrize(
    ("experts", "rows", "n", "k"),
    # Qwen3-30B-A3B's gate/up and down (the down grad-input has 3 column blocks: odd pair
    # counts), then a small odd case with few tiles (a lone last tile, experts of one row)
    [(128, 8192, 1536, 2048), (128, 8192, 2048, 768), (7, 300, 136, 200)],
)
def test_grouped_gemm_row_kernels_equal_cooperative(
    experts: int, rows: int, n: int, k: int, pass_name: str, switch: str, epilogue: str
) -> None:
    """The forward and grad-input in 2-CTA clusters (TURBOMOE_HOPPER_GEMM_CLUSTER_ROWS=1: a
    cluster takes two consecutive tiles and each CTA loads half of the operand they share) and
    in the ping-pong kernel (TURBOMOE_HOPPER_GEMM_PINGPONG=1: each consumer warpgroup its own
    64-row tile) run the same WGMMAs for each 64-row group of outputs as the cooperative kernel,
    one CTA a tile, so the output must be bitwise the same, under skewed routing with unrouted
    rows past offsets[E] (written as zeros); and it must match a float32 reference."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    offsets = skewed_offsets(experts, rows, gen)
    total = int(offsets[-1]) + 77  # unrouted rows
    w = (randn(experts, n, k, generator=gen) * k**-0.5).to(BF16)
    width = k if pass_name == "forward" else n
    a = torch.randn(total, width, generator=gen).to(BF16)
    op = (
        torch.ops.turbomoe.grouped_gemm
        if pass_name == "forward"
        else torch.ops.turbomoe.grouped_gemm_backward_input
    )
    a_c, w_c, off_c = a.to(CUDA), w.to(CUDA), offsets.to(CUDA)
    results = {}
    for on in ("0", "1"):
        os.environ[switch] = on
        os.environ["TURBOMOE_HOPPER_GEMM_EPILOGUE"] = epilogue
        try:
            poison()
            results[on] = op(a_c, w_c, off_c).cpu()
        finally:
            os.environ.pop(switch, None)
            os.environ.pop("TURBOMOE_HOPPER_GEMM_EPILOGUE", None)
    got = results["1"]
    assert torch.isfinite(got).all(), f"seed {seed}: unwritten output"
    assert torch.equal(results["0"], got), f"seed {seed}: {switch} differs from one CTA a tile"
    bounds = offsets.tolist()
    parts = []
    for e in range(experts):
        rows_e = a[bounds[e] : bounds[e + 1]].float()
        we = w[e].float()
        parts.append(rows_e @ (we.t() if pass_name == "forward" else we))
    parts.append(torch.zeros(total - bounds[-1], got.shape[1]))
    err = rel(got, torch.cat(parts))
    assert err < 1e-2, f"seed {seed}: rel error {err}"
    assert float(got[bounds[-1] :].abs().max()) == 0.0, f"seed {seed}: unrouted rows not zero"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 128, 256), (5, 3, 7)])  # 16-byte slices; odd byte counts
def test_zero_empty_experts(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """tm_zero_empty_experts on CUDA zeroes exactly the slices of experts without rows."""
    from turbomoe import _native

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    experts = shape[0]
    counts = torch.randint(0, 3, (experts,), generator=gen)
    counts[0], counts[1] = 0, 2
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    dw = (torch.rand(shape, generator=gen) + 1).to(dtype)  # no zeros to start with
    want = dw.clone()
    want[counts == 0] = 0
    got, off_c = dw.to(CUDA), offsets.to(CUDA)
    _native.call(
        "tm_zero_empty_experts",
        _native.describe(off_c),
        _native.describe(got),
        _native.stream_for(got),
    )
    assert torch.equal(got.cpu(), want), f"seed {seed}"


@pytest.mark.parametrize("gated", [False, True])
def test_weight_gradient_with_zeros_aside_is_bitwise_the_same(
    gated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TURBOMOE_DW_ZEROS_ASIDE=1 (the grad-weight GEMM skips the empty experts, whose zeros a
    side stream writes) gives bitwise the same gradients as the GEMM writing them, at the Qwen3
    expert shapes under routing that leaves most experts empty, from poisoned memory (a slice
    neither wrote would read NaN); the side stream has joined when backward returns."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    experts, k, n = 128, 2048, 1536
    counts = torch.zeros(experts, dtype=torch.int64)
    busy = torch.randperm(experts, generator=gen)[:40]  # as the benchmark model's router
    counts[busy] = torch.randint(1, 1500, (40,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    rows = int(offsets[-1])
    x = torch.randn(rows, k, generator=gen).to(BF16).to(CUDA)
    w = (randn(experts, n, k, generator=gen) * k**-0.5).to(BF16).to(CUDA)
    g = torch.randn(rows, n // 2 if gated else n, generator=gen).to(BF16).to(CUDA)
    off_c = offsets.to(CUDA)
    from turbomoe.ops import empty_experts

    deferred = []
    real_aside = empty_experts.zero_empty_experts_aside

    def counting_aside(offsets_: torch.Tensor, dw: torch.Tensor) -> None:
        deferred.append(dw.shape)
        real_aside(offsets_, dw)

    monkeypatch.setattr(empty_experts, "zero_empty_experts_aside", counting_aside)
    grads = {}
    for aside in ("0", "1"):
        monkeypatch.setenv("TURBOMOE_DW_ZEROS_ASIDE", aside)
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        if gated:
            out = tops.grouped_gemm_gated(xx, ww, off_c, tops.activation.SILU)[1]
        else:
            out = tops.grouped_gemm(xx, ww, off_c)
        poison()
        out.backward(g)
        grads[aside] = (xx.grad, ww.grad)
    assert deferred == [w.shape], "the zeros were not deferred (or deferred with the switch off)"
    assert torch.isfinite(grads["1"][1]).all(), f"seed {seed}: unwritten weight gradient"
    empty = (counts == 0).to(CUDA)
    assert float(grads["1"][1][empty].abs().max()) == 0.0, f"seed {seed}: empty experts not zero"
    assert torch.equal(grads["0"][0], grads["1"][0]), f"seed {seed}: dx differs"
    assert torch.equal(grads["0"][1], grads["1"][1]), f"seed {seed}: dw differs"


@pytest.mark.parametrize("pass_name", ["forward", "grad_input", "grad_weight"])
@pytest.mark.parametrize(("n", "k"), [(1536, 2048), (2048, 768)])
def test_grouped_gemm_epilogues_agree_bitwise(n: int, k: int, pass_name: str) -> None:
    """Every epilogue of the Hopper kernel (whole-box TMA, split, quarter, deferred, direct
    stores) and the grad-weight's zero tiles paced or not store the same accumulators: the
    outputs must be bitwise equal, under skewed routing with empty experts and unrouted rows."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    experts = 128
    offsets = skewed_offsets(experts, 8192, gen)
    total = int(offsets[-1]) + 29
    w = (randn(experts, n, k, generator=gen) * k**-0.5).to(BF16).to(CUDA)
    x = torch.randn(total, k, generator=gen).to(BF16).to(CUDA)
    dy = torch.randn(total, n, generator=gen).to(BF16).to(CUDA)
    off = offsets.to(CUDA)
    ops = torch.ops.turbomoe

    def run() -> torch.Tensor:
        poison()
        if pass_name == "forward":
            return ops.grouped_gemm(x, w, off)
        if pass_name == "grad_input":
            return ops.grouped_gemm_backward_input(dy, w, off)
        return ops.grouped_gemm_backward_weight(dy, x, off, BF16)

    # "": the pass's default epilogue (the variable set but empty counts as unset)
    settings = [(e, "1") for e in ("", "tma", "split", "quarter", "deferred", "direct")]
    if pass_name == "grad_weight":
        settings += [("tma", "0"), ("quarter", "0")]
    results = {}
    for epilogue, pace in settings:
        os.environ["TURBOMOE_HOPPER_GEMM_EPILOGUE"] = epilogue
        os.environ["TURBOMOE_HOPPER_GEMM_PACE_ZEROS"] = pace
        try:
            results[(epilogue, pace)] = run()
        finally:
            os.environ.pop("TURBOMOE_HOPPER_GEMM_EPILOGUE", None)
            os.environ.pop("TURBOMOE_HOPPER_GEMM_PACE_ZEROS", None)
    default = run()
    assert torch.isfinite(default).all(), f"seed {seed}: unwritten output"
    for setting, got in results.items():
        assert torch.equal(got, default), f"seed {seed}: {setting} differs from the default"


GATHERED = [
    # (tokens, top_k, experts, N, K): Qwen3-30B-A3B's gate/up and down at 4096 and 512 tokens,
    # then odd small shapes (K a multiple of 8, which the 16-byte row copies need)
    (4096, 8, 128, 1536, 2048),
    (512, 8, 128, 2048, 768),
    (13, 2, 5, 48, 72),
    (70, 4, 6, 136, 200),
]


def gathered_problem(
    tokens: int, top_k: int, experts: int, n: int, k: int, gen: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """(src, sorted_pairs, pair_to_row, offsets, w, dy) on the CPU: expert 0's pairs dropped (rows
    past offsets[E]), and src one token short, so that the last token's pairs read zeros."""
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[ids == 0] = experts
    sorted_pairs, pair_to_row, offsets = tops.permute_plan(ids, experts)
    src = torch.randn(tokens - 1, k, generator=gen).to(BF16)
    w = (randn(experts, n, k, generator=gen) * k**-0.5).to(BF16)
    dy = torch.randn(sorted_pairs.shape[0], n, generator=gen).to(BF16)
    return src, sorted_pairs, pair_to_row, offsets, w, dy


def gathered_rows_float(src: torch.Tensor, sorted_pairs: torch.Tensor, top_k: int) -> torch.Tensor:
    """The x the gathered passes read, in float32 on the GPU (zeros for the missing token)."""
    padded = torch.cat([src, src.new_zeros(1, src.shape[1])]).float()
    return padded[(sorted_pairs.long() // top_k).clamp(min=0, max=src.shape[0])].to(CUDA)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("path", ["hopper", "generic"])
@pytest.mark.parametrize(("tokens", "top_k", "experts", "n", "k"), GATHERED)
def test_grouped_gemm_gathered_passes(
    tokens: int,
    top_k: int,
    experts: int,
    n: int,
    k: int,
    path: str,
    out_dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forward and the grad-weight with the token gather in their operand load (Hopper:
    cp.async rows into the swizzled stage; generic: the tiled kernel's row loader), poisoned
    outputs, against the CPU reference of the same ops (large shapes: torch per expert in float32
    on the gathered rows); on the Hopper path also bitwise against the gather kernel followed by
    the plain pass, which runs the same WGMMAs on the same values."""
    from turbomoe import _native
    from turbomoe.ops.gathered_gemm import _backward_weight_gathered, forward_gathered_into

    monkeypatch.setenv("TURBOMOE_HOPPER_GEMM_GATHER", "1" if path == "hopper" else "0")
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    src, sorted_pairs, pair_to_row, offsets, w, dy = gathered_problem(
        tokens, top_k, experts, n, k, gen
    )
    rows, routed = sorted_pairs.shape[0], int(offsets[-1])
    large = tokens >= 512
    if large:
        x = gathered_rows_float(src, sorted_pairs, top_k)
        ref_y = torch_grouped_gemm(x, w.float().to(CUDA), offsets).cpu()
        bounds = offsets.tolist()
        dyf = dy.float().to(CUDA)
        parts = [(dyf[a:b].t(), x[a:b]) for a, b in itertools.pairwise(bounds)]
        ref_dw = torch.stack([g @ xe for g, xe in parts]).cpu()
    else:
        ref_y = forward_gathered_into(
            src, sorted_pairs, top_k, w, offsets, torch.empty(rows, n, dtype=out_dtype)
        )
        ref_dw = _backward_weight_gathered(dy, src, sorted_pairs, offsets, top_k, out_dtype, False)
    src_c, pairs_c, w_c, off_c, dy_c = (t.to(CUDA) for t in (src, sorted_pairs, w, offsets, dy))
    poison()
    y = forward_gathered_into(
        src_c, pairs_c, top_k, w_c, off_c, torch.empty(rows, n, dtype=out_dtype, device=CUDA)
    )
    dw = _backward_weight_gathered(dy_c, src_c, pairs_c, off_c, top_k, out_dtype, False)
    y_cpu, dw_cpu = y.cpu(), dw.cpu()
    assert torch.isfinite(y_cpu).all() and torch.isfinite(dw_cpu).all(), f"seed {seed}"
    assert float(y_cpu[routed:].abs().max()) == 0.0, f"seed {seed}: rows past offsets[E]"
    assert float(dw_cpu[0].abs().max()) == 0.0, f"seed {seed}: expert 0 has no rows"
    for name, got, ref in (("y", y_cpu, ref_y), ("dw", dw_cpu, ref_dw)):
        err = rel(got, ref)
        assert err < tolerance(out_dtype, 1e-4), f"seed {seed}: {name} rel error {err}"
    if path == "hopper":
        # src is one token short; the gather kernel needs every token's row: a zero row for it.
        src_full = torch.cat([src_c, src_c.new_zeros(1, k)])
        x = tops.gather_rows(src_full, pairs_c, off_c, top_k, pair_to_row=pair_to_row.to(CUDA))
        y_pair = torch.empty(rows, n, dtype=out_dtype, device=CUDA)
        _native.call(
            "tm_grouped_gemm_forward",
            _native.describe(x),
            _native.describe(w_c),
            _native.describe(off_c),
            _native.describe(y_pair),
            None,
            0,
            _native.stream_for(x),
        )
        dw_pair = torch.ops.turbomoe.grouped_gemm_backward_weight(dy_c, x, off_c, out_dtype)
        assert torch.equal(y, y_pair), f"seed {seed}: forward differs from gather + forward"
        assert torch.equal(dw, dw_pair), f"seed {seed}: dw differs from gather + grad-weight"


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("path", ["hopper", "generic"])
@pytest.mark.parametrize(("tokens", "top_k", "experts", "n", "k"), GATHERED)
def test_grouped_gemm_gathered_dy_passes(
    tokens: int,
    top_k: int,
    experts: int,
    n: int,
    k: int,
    path: str,
    out_dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grad-input and the grad-weight with dy's rows gathered from a per-token gradient g
    [tokens, N] (the lean experts' down projection; Hopper: cp.async rows into A's stage),
    poisoned outputs, against the CPU reference of the same ops (large shapes: torch per expert
    in float32 on the gathered rows); on the Hopper path also bitwise against the gather kernel
    followed by the plain pass."""
    from turbomoe.ops.gathered_gemm import _backward_input_gathered, _backward_weight_gathered

    monkeypatch.setenv("TURBOMOE_HOPPER_GEMM_GATHER", "1" if path == "hopper" else "0")
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    # src plays g [tokens - 1, N]: the last token's pairs read zeros. w comes as [E, K, N].
    problem = gathered_problem(tokens, top_k, experts, k, n, gen)
    g, sorted_pairs, pair_to_row, offsets = problem[:4]
    w = problem[4].transpose(1, 2).contiguous()  # [E, N, K]
    rows, routed = sorted_pairs.shape[0], int(offsets[-1])
    x = torch.randn(rows, k, generator=gen).to(BF16)
    if tokens >= 512:
        gf = gathered_rows_float(g, sorted_pairs, top_k)
        wf, xf = w.float().to(CUDA), x.float().to(CUDA)
        bounds = offsets.tolist()
        ref_dx = torch.zeros(rows, k, device=CUDA)
        for e, (a, b) in enumerate(itertools.pairwise(bounds)):
            ref_dx[a:b] = gf[a:b] @ wf[e]
        ref_dw = torch.stack([gf[a:b].t() @ xf[a:b] for a, b in itertools.pairwise(bounds)])
        ref_dx, ref_dw = ref_dx.cpu(), ref_dw.cpu()
    else:
        ref_dx = _backward_input_gathered(g, sorted_pairs, w, offsets, top_k, rows).float()
        ref_dw = _backward_weight_gathered(g, x, sorted_pairs, offsets, top_k, out_dtype, True)
    g_c, pairs_c, w_c, off_c, x_c = (t.to(CUDA) for t in (g, sorted_pairs, w, offsets, x))
    poison()
    dx = _backward_input_gathered(g_c, pairs_c, w_c, off_c, top_k, rows)
    dw = _backward_weight_gathered(g_c, x_c, pairs_c, off_c, top_k, out_dtype, True)
    dx_cpu, dw_cpu = dx.cpu(), dw.cpu()
    assert torch.isfinite(dx_cpu).all() and torch.isfinite(dw_cpu).all(), f"seed {seed}"
    assert float(dx_cpu[routed:].abs().max()) == 0.0, f"seed {seed}: rows past offsets[E]"
    assert float(dw_cpu[0].abs().max()) == 0.0, f"seed {seed}: expert 0 has no rows"
    for name, got, ref, dtype in (("dx", dx_cpu, ref_dx, BF16), ("dw", dw_cpu, ref_dw, out_dtype)):
        err = rel(got, ref)
        assert err < tolerance(dtype, 1e-4), f"seed {seed}: {name} rel error {err}"
    if path == "hopper":
        g_full = torch.cat([g_c, g_c.new_zeros(1, n)])  # the missing token's zero row
        gathered = tops.gather_rows(g_full, pairs_c, off_c, top_k, pair_to_row=pair_to_row.to(CUDA))
        dx_pair = torch.ops.turbomoe.grouped_gemm_backward_input(gathered, w_c, off_c)
        dw_pair = torch.ops.turbomoe.grouped_gemm_backward_weight(gathered, x_c, off_c, out_dtype)
        assert torch.equal(dx, dx_pair), f"seed {seed}: dx differs from gather + grad-input"
        assert torch.equal(dw, dw_pair), f"seed {seed}: dw differs from gather + grad-weight"


@pytest.mark.parametrize(("tokens", "top_k", "experts", "n", "k"), GATHERED[1:3])
def test_grouped_gemm_gathered_op_gradients(
    tokens: int, top_k: int, experts: int, n: int, k: int
) -> None:
    """The differentiable op on CUDA against itself on the CPU: output and both gradients."""
    from turbomoe.ops.gathered_gemm import grouped_gemm_gathered

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    src, sorted_pairs, pair_to_row, offsets, w, dy = gathered_problem(
        tokens, top_k, experts, n, k, gen
    )
    pair_to_row = pair_to_row[: src.shape[0] * top_k]
    rows = sorted_pairs.shape[0]

    def fn(s: torch.Tensor, ww: torch.Tensor, p: torch.Tensor, q: torch.Tensor, o: torch.Tensor):
        return grouped_gemm_gathered(s, p, q, ww, o, top_k, rows)

    results = {}
    for device in (torch.device("cpu"), CUDA):
        # Fresh leaves on each device (src.to("cpu") would be src itself).
        s = src.detach().clone().to(device).requires_grad_()
        ww = w.detach().clone().to(device).requires_grad_()
        if device == CUDA:
            poison()
        y = fn(s, ww, sorted_pairs.to(device), pair_to_row.to(device), offsets.to(device))
        y.backward(dy.to(device))
        results[device.type] = (y.detach().cpu(), s.grad.cpu(), ww.grad.cpu())
    names = ("y", "grad src", "grad w")
    for name, got, ref in zip(names, results["cuda"], results["cpu"], strict=True):
        assert torch.isfinite(got).all(), f"seed {seed}: {name}"
        err = rel(got, ref)
        assert err < 1e-2, f"seed {seed}: {name} rel error {err}"


# ------------------------------------------------------------- grouped GEMM + gated activation


def torch_grouped_gemm_gated(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, variant: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch_grouped_gemm(x, w, offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    if variant == tops.activation.SILU:
        return gate_up, torch.nn.functional.silu(gate) * up
    gate, up = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    return gate_up, (up + 1) * gate * torch.sigmoid(1.702 * gate)


GATED_GEMMS = [
    # (tokens, top_k, experts, I, K, large): I a multiple of 64 runs the activation in the
    # Hopper GEMM's epilogue (bf16), I = 40 the GEMM and then the activation op; the last is
    # Qwen3-30B-A3B's gate/up at 512 tokens
    (13, 2, 5, 64, 72, False),
    (64, 8, 16, 192, 256, False),
    (40, 4, 6, 40, 64, False),
    (512, 8, 128, 768, 2048, True),
]


@pytest.mark.parametrize("epilogue", ["fused", "composed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [1, 2], ids=["silu", "clamped"])
@pytest.mark.parametrize(("tokens", "top_k", "experts", "inter", "k", "large"), GATED_GEMMS)
def test_grouped_gemm_gated(
    tokens, top_k, experts, inter, k, large, variant, dtype, epilogue, monkeypatch
):
    """Both library paths: the SwiGLU epilogue (opt-in, bf16 with I % 64 == 0) and the GEMM then
    the activation kernel."""
    monkeypatch.setenv("TURBOMOE_HOPPER_GEMM_SWIGLU", "1" if epilogue == "fused" else "0")
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    offsets = offsets_with_idle_expert(tokens, top_k, experts, gen)
    x = torch.randn(tokens * top_k, k, generator=gen)
    # Against the CPU op (same dtype, same rounding points) gate/up spread widely (x3), so that
    # the clamped variant's limit of 7 is crossed often. The float64 reference of the large case
    # does not round gate_up before the activation: there an element within a bf16 rounding of
    # the limit gets the other side's gradient, so gate/up stay ~N(0, 1), rarely near 7.
    w = randn(experts, 2 * inter, k, generator=gen) * k**-0.5 * (1 if large else 3)

    def fn(x_: torch.Tensor, w_: torch.Tensor, off: torch.Tensor) -> object:
        return tops.grouped_gemm_gated(x_, w_, off, variant, 1.702, 7.0)

    def reference(x_: torch.Tensor, w_: torch.Tensor, off: torch.Tensor) -> object:
        return torch_grouped_gemm_gated(x_, w_, off, variant)

    check(fn, [x, w, offsets], [0, 1], dtype, seed, 1e-4, reference if large else None)


@pytest.mark.parametrize("routing", ["uniform", "model"])
def test_grouped_gemm_gated_epilogue_equals_gemm_then_activation(routing: str) -> None:
    """The activation in the Hopper GEMM's epilogue gives what the library's composed path gives
    (TURBOMOE_HOPPER_GEMM_SWIGLU=0: the grouped GEMM, then the activation kernel on its rounded
    halves): gate_up bitwise (same tiles and reduction order), act to the last bit or within one
    bf16 rounding. Rows straddle experts (whole-box and row-by-row stores), a tail of unrouted
    rows comes out zero, and the model-like routing leaves most experts empty."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    experts, k, inter = 128, 2048, 768
    if routing == "model":
        bias = torch.randn(experts, generator=gen) * 3.0
        ids = (bias + torch.randn(512, experts, generator=gen)).topk(8, -1).indices
    else:
        ids = torch.rand(512, experts, generator=gen).topk(8, -1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
    rows = int(offsets[-1]) + 77
    x = torch.randn(rows, k, generator=gen).to(BF16).to(CUDA)
    w = (randn(experts, 2 * inter, k, generator=gen) * k**-0.5 * 3).to(BF16).to(CUDA)
    off = offsets.to(CUDA)
    op = torch.ops.turbomoe.grouped_gemm_gated
    outs = {}
    for fused in (True, False):
        os.environ["TURBOMOE_HOPPER_GEMM_SWIGLU"] = "1" if fused else "0"
        try:
            poison()
            outs[fused] = [t.cpu() for t in op(x, w, off, 1, 1.0, 1.0)]
        finally:
            os.environ.pop("TURBOMOE_HOPPER_GEMM_SWIGLU", None)
    (gate_up, act), (ref_gate_up, ref_act) = outs[True], outs[False]
    assert torch.isfinite(gate_up).all() and torch.isfinite(act).all(), f"seed {seed}"
    assert torch.equal(gate_up, ref_gate_up), f"seed {seed}: gate_up differs"
    assert float(act[int(offsets[-1]) :].abs().max()) == 0.0, f"seed {seed}: unrouted rows"
    differ = int((act != ref_act).sum())
    err = rel(act, ref_act)
    assert err < 1e-3, f"seed {seed}: act rel {err:.3g}, {differ} elements differ"
    print(f"act elements differing from the composed path: {differ} of {act.numel()}")


# ----------------------------------------------------------------------------- MoE experts


def torch_moe(
    h: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Hugging Face's eager Qwen3-MoE experts loop, written out (id E = dropped)."""
    out = torch.zeros_like(h)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        gate, up = (h[token] @ gate_up[e].t()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down[e].t()
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out


MOE = [
    # (tokens, hidden, inter, experts, top_k, large)
    (13, 72, 24, 5, 2, False),
    (64, 256, 128, 16, 4, False),
    (512, 2048, 768, 128, 8, True),  # Qwen3-30B-A3B's expert shape, 512 tokens
]


@pytest.mark.parametrize(
    ("gather", "recompute"),
    [("0", False), ("1", False), ("1", True)],
    ids=["copy", "gather_in_gemm", "gather_in_gemm_lean"],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden", "inter", "experts", "top_k", "large"), MOE)
def test_moe_experts_qwen3(
    tokens, hidden, inter, experts, top_k, large, dtype, gather, recompute, monkeypatch
):
    """Forward and gradients on CUDA against the CPU (large: a torch loop); also with the token
    gather inside the gate/up GEMMs (TURBOMOE_GATHER_IN_GEMM=1), composed and lean."""
    monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[ids == 1] = 0
    ids[torch.rand(tokens, top_k, generator=gen) < 0.05] = experts
    hidden_states = torch.randn(tokens, hidden, generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen)
    gate_up = randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    down = randn(experts, hidden, inter, generator=gen) * inter**-0.5

    def fn(h: torch.Tensor, i: torch.Tensor, w: torch.Tensor, gu: torch.Tensor, d: torch.Tensor):
        return tops.moe_experts(h, i, w, gu, d, recompute=recompute)

    args = [hidden_states, ids, weights, gate_up, down]
    check(fn, args, [0, 2, 3, 4], dtype, seed, 1e-4, torch_moe if large else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_experts_gpt_oss_style(dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    tokens, hidden, inter, experts, top_k = 77, 136, 40, 8, 4
    ids = distinct_ids(tokens, top_k, experts, gen)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1)
    gate_up = randn(experts, hidden, 2 * inter, generator=gen) * 0.5  # HF's [E, H, 2I]
    gate_up_bias = torch.randn(experts, 2 * inter, generator=gen)
    down = randn(experts, inter, hidden, generator=gen) * inter**-0.5
    down_bias = torch.randn(experts, hidden, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)

    def fn(h, i, w, gu, gub, d, db):
        return tops.moe_experts(
            h,
            i,
            w,
            gu.transpose(1, 2),
            d.transpose(1, 2),
            activation="clamped",
            interleaved=True,
            gate_up_bias=gub,
            down_bias=db,
        )

    args = [x, ids, weights, gate_up, gate_up_bias, down, down_bias]
    check(fn, args, [0, 2, 3, 4, 5, 6], dtype, seed, 1e-4)


def test_moe_experts_zero_tokens():
    gate_up = torch.randn(4, 16, 8, device=CUDA, requires_grad=True)
    down = torch.randn(4, 8, 8, device=CUDA, requires_grad=True)
    h = torch.randn(0, 8, device=CUDA, requires_grad=True)
    w = torch.rand(0, 2, device=CUDA, requires_grad=True)
    poison()
    out = tops.moe_experts(h, torch.zeros(0, 2, dtype=torch.int64, device=CUDA), w, gate_up, down)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.count_nonzero(gate_up.grad) == 0 and torch.count_nonzero(down.grad) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_experts_routed_pairs(dtype):
    """The expert-parallel owner's exact-size buffers: most slots are the sentinel (dropped)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    tokens, hidden, inter, experts, top_k = 2048, 256, 128, 16, 8
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.75] = experts
    routed = int((ids < experts).sum())
    x = torch.randn(tokens, hidden, generator=gen)
    w = torch.rand(tokens, top_k, generator=gen)
    gate_up = randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    down = randn(experts, hidden, inter, generator=gen) * inter**-0.5

    def fn(x_, w_, gu, dn, ids_):
        return tops.moe_experts(x_, ids_, w_, gu, dn, routed_pairs=routed)

    check(fn, [x, w, gate_up, down, ids], [0, 1, 2, 3], dtype, seed, 1e-4)


# ------------------------------------------------------------------------ gated activations

# (rows, inter, layout): "fused" reads the two halves of one [M, 2I] buffer and "interleaved"
# its alternating columns (both through ops.gated, like the MoE layer); "separate" passes two
# tensors. Widths that are multiples of 8 take the vectorised kernels, the others (and the
# interleaved columns, stride 2) the scalar ones.
GATED_CASES = [
    (13, 24, "fused"),
    (4096, 768, "fused"),
    (1000, 20, "fused"),
    (77, 64, "interleaved"),
    (300, 128, "separate"),
    (33, 7, "separate"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "clamped"])
@pytest.mark.parametrize(("rows", "inter", "layout"), GATED_CASES)
def test_gated_activation(rows, inter, layout, activation, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    scale = 4.0 if activation == "clamped" else 2.0  # reach past the clamp limit of 7
    if layout == "separate":
        gate = torch.randn(rows, inter, generator=gen) * scale
        up = torch.randn(rows, inter, generator=gen) * scale

        def fn(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            if activation == "silu":
                return tops.silu_mul(g, u)
            return tops.clamped_swiglu(g, u)

        check(fn, [gate, up], [0, 1], dtype, seed)
        return
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * scale

    def fused(x: torch.Tensor) -> torch.Tensor:
        return tops.gated(x, activation, interleaved=layout == "interleaved")

    check(fused, [gate_up], [0], dtype, seed)


# The lean experts' one-pass backward through the activation and the routing weight; widths that
# are multiples of 8 take the 16-byte path, the others and interleaved columns the scalar one.
WEIGHTED_CASES = [
    (13, 24, "fused", True),
    (4096, 768, "fused", True),
    (1000, 20, "fused", True),
    (77, 64, "interleaved", True),
    (300, 128, "fused", False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "clamped"])
@pytest.mark.parametrize(("rows", "inter", "layout", "want_weighted"), WEIGHTED_CASES)
def test_gated_activation_weighted_backward(
    rows, inter, layout, want_weighted, activation, weights_dtype, dtype
):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    scale = 4.0 if activation == "clamped" else 2.0  # reach past the clamp limit of 7
    grad_rows = torch.randn(rows, inter, generator=gen)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * scale
    row_weights = torch.rand(rows, generator=gen)
    row_weights[: rows // 10] = 0.0  # rows past the routed ones
    variant = 1 if activation == "silu" else 2
    op = torch.ops.turbomoe.gated_activation_weighted_backward

    def fn(g: torch.Tensor, gu: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = w.to(weights_dtype)
        return op(g, gu, w, variant, 1.702, 7.0, layout == "interleaved", want_weighted)

    check(fn, [grad_rows, gate_up, row_weights], [], dtype, seed)


# -------------------------------------------------------------------------- norms, RoPE, loss


@pytest.mark.parametrize("dtype", DTYPES)
# Narrow rows share a warp in the forward (lanes per row: 16 for 72 and 128, 8 for 40, 1 for 8),
# with a last warp partly past the rows.
@pytest.mark.parametrize(
    ("rows", "hidden"), [(13, 72), (4096, 2048), (3, 5120), (1037, 128), (45, 40), (33, 8)]
)
def test_rms_norm(rows, hidden, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen) * 2
    weight = torch.rand(hidden, generator=gen) + 0.5

    def fn(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return tops.rms_norm(x_, w_, 1e-6)

    # the weight gradient sums over all rows: a long reduction
    check(fn, [x, weight], [0, 1], dtype, seed, fp32_tol=1e-4 if rows > 1000 else 1e-5)


RMS_NORM_VIEWS = [
    # (rows, hidden, width, start): x = buf[:, start : start + hidden] of buf [rows, width], so
    # x's row stride (width) differs from its hidden size
    (13, 16, 24, 0),  # vector kernels (16, 24 and the base are 8-element aligned)
    (13, 24, 40, 0),
    (13, 24, 40, 8),
    (13, 16, 24, 3),  # base off the vector alignment: element-wise kernels
    (13, 13, 20, 0),  # hidden not a multiple of 8: element-wise kernels
    (2500, 1024, 1536, 0),  # 3 rows per backward team, two-stage grad_weight reduction
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden", "width", "start"), RMS_NORM_VIEWS)
def test_rms_norm_row_stride(rows, hidden, width, start, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(rows, width, generator=gen) * 2
    weight = torch.rand(hidden, generator=gen) + 0.5

    def fn(b: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return tops.rms_norm(b[:, start : start + hidden], w_, 1e-6)

    check(fn, [buf, weight], [0, 1], dtype, seed, fp32_tol=1e-4 if rows > 1000 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "hidden"),
    # the model's hidden and per-head norms (8 and 16 rows a team), an odd run of rows, rows
    # wider than the cached vectors, element-wise rows
    [(4096, 2048), (131072, 128), (16384, 128), (2500, 1024), (7, 6144), (33, 13)],
)
def test_rms_norm_backward_prefetch_is_bitwise_the_same(rows: int, hidden: int, dtype) -> None:
    """The backward that loads each team's next row under the current row's sum
    (TURBOMOE_RMSNORM_PREFETCH=1) does the same arithmetic in the same order: grad_x and the
    weight's gradient bitwise equal to the default kernel's."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * 2).to(dtype).to(CUDA)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(CUDA)
    grad = torch.randn(rows, hidden, generator=gen).to(dtype).to(CUDA)
    results = {}
    for prefetch in ("0", "1"):
        os.environ["TURBOMOE_RMSNORM_PREFETCH"] = prefetch
        try:
            xr = x.clone().requires_grad_(True)
            wr = weight.clone().requires_grad_(True)
            poison()
            tops.rms_norm(xr, wr, 1e-6).backward(grad)
            results[prefetch] = (xr.grad, wr.grad)
        finally:
            os.environ.pop("TURBOMOE_RMSNORM_PREFETCH", None)
    for name, a, b in zip(("grad_x", "grad_weight"), results["0"], results["1"], strict=True):
        assert torch.isfinite(b).all(), f"seed {seed}: {name} unwritten"
        assert torch.equal(a, b), f"seed {seed}: {name} differs with the prefetch"


RESIDUAL_NORM = [
    # (rows, hidden, width): the model's hidden at 4096 tokens, wider rows than the cached
    # vectors of the backward, element-wise rows, padded rows (row stride `width`)
    (4096, 2048, 2048),
    (7, 6144, 6144),
    (33, 13, 13),
    (13, 24, 40),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden", "width"), RESIDUAL_NORM)
def test_residual_norm_ops(rows: int, hidden: int, width: int, dtype) -> None:
    """add_rms_norm and rms_norm_keep_input (the residual adds in the norms' kernels) against
    the CPU reference, and bitwise against torch's add and turbomoe's rms_norm on the GPU,
    forward and backward, on NaN-poisoned memory."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    xb = torch.randn(rows, width, generator=gen) * 2
    res = torch.randn(rows, hidden, generator=gen) * 2
    weight = torch.rand(hidden, generator=gen) + 0.5

    def layer(x_: torch.Tensor, r_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        kept, y = tops.rms_norm_keep_input(x_[:, :hidden], w_, 1e-6)
        total, y2 = tops.add_rms_norm(y * r_, kept, w_, 1e-6)
        return total * 0.5 + y2

    def plain(x_: torch.Tensor, r_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        x_ = x_[:, :hidden]
        total = x_ + tops.rms_norm(x_, w_, 1e-6) * r_
        return total * 0.5 + tops.rms_norm(total, w_, 1e-6)

    if rows * hidden <= 1 << 16:  # the CPU reference is slow on the model's shape
        check(layer, [xb, res, weight], [0, 1, 2], dtype, seed, fp32_tol=1e-4)
    args = [a.to(dtype).to(CUDA).requires_grad_(True) for a in (xb, res, weight)]
    grad = torch.randn(rows, hidden, generator=gen).to(dtype).to(CUDA)
    results = []
    for fn in (layer, plain):
        poison()
        out = fn(*args)
        results.append((out, *torch.autograd.grad(out, args, grad)))
    for name, got, want in zip(("out", "grad_x", "grad_r", "grad_w"), *results, strict=True):
        assert torch.isfinite(got).all(), f"seed {seed}: {name} unwritten"
        assert torch.equal(got, want), f"seed {seed}: {name} differs from add + rms_norm"


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_input_linears(dtype) -> None:
    """Qwen3-30B-A3B's q/k/v projections at 4096 tokens: the forward bitwise F.linear's, the
    weight gradients bitwise stock's, the summed input gradient as close to the exact sum as
    stock's adds are."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 4096, 2048, generator=gen)).to(dtype).to(CUDA).requires_grad_(True)
    outs = (4096, 512, 512)
    weights = [
        (torch.randn(n, 2048, generator=gen) * 0.02).to(dtype).to(CUDA).requires_grad_(True)
        for n in outs
    ]
    grads = [torch.randn(1, 4096, n, generator=gen).to(dtype).to(CUDA) for n in outs]
    poison()
    fused_out = tops.shared_input_linears(x, tuple(weights))
    fused = torch.autograd.grad(fused_out, [x, *weights], grads)
    poison()
    stock_out = [torch.nn.functional.linear(x, w) for w in weights]
    stock = torch.autograd.grad(stock_out, [x, *weights], grads)
    for got, want in zip(fused_out, stock_out, strict=True):
        assert torch.equal(got, want), f"seed {seed}: forward differs from F.linear"
    for got, want in zip(fused[1:], stock[1:], strict=True):
        assert torch.isfinite(got).all() and torch.equal(got, want), f"seed {seed}: weight grad"
    exact = sum(
        g.double().reshape(-1, g.shape[-1]) @ w.double()
        for g, w in zip(grads, weights, strict=True)
    ).reshape(x.shape)
    err = rel(fused[0].double(), exact)
    assert err < tolerance(dtype, 1e-5), f"seed {seed}: grad_x rel {err:.3g}"
    assert err <= rel(stock[0].double(), exact) * 1.5 + 1e-7, f"seed {seed}: worse than stock"


QK_NORM_ROPE = [
    # (B, S, NH, D, cos/sin dtype, cos/sin of batch 1): Qwen3-30B-A3B's q and k heads at 4096
    # tokens, the other head dims the kernel takes, cos/sin per batch row
    (1, 4096, 32, 128, None, True),
    (1, 4096, 4, 128, None, True),
    (2, 33, 3, 64, None, False),
    (1, 17, 5, 256, F32, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "s", "nh", "d", "cs_dtype", "broadcast"), QK_NORM_ROPE)
def test_qk_norm_rope(b, s, nh, d, cs_dtype, broadcast, dtype):
    """The fused q/k norm + RoPE against the CPU reference, and bitwise against the two CUDA
    ops it fuses (rms_norm then apply_rope) forward and backward, on NaN-poisoned memory."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    cb = 1 if broadcast else b
    x = torch.randn(b, s, nh, d, generator=gen) * 2
    weight = torch.rand(d, generator=gen) + 0.5
    angles = torch.rand(cb, s, d, generator=gen) * 10
    cos, sin = angles.cos(), angles.sin()
    if s * nh * b <= 4096:  # the CPU reference is slow on the model's shapes

        def fn(x_, w_, c, s_):
            return tops.qk_norm_rope(x_, w_, 1e-6, c, s_)

        check(fn, [x, weight, cos, sin], [0, 1], dtype, seed, fp32_tol=1e-4)
    cdt = cs_dtype or dtype
    xc = x.to(dtype).to(CUDA).requires_grad_(True)
    wc = weight.to(dtype).to(CUDA).requires_grad_(True)
    cc, sc = cos.to(cdt).to(CUDA), sin.to(cdt).to(CUDA)
    grad = torch.randn(b, s, nh, d, generator=gen).to(dtype).to(CUDA)
    poison()
    fused = tops.qk_norm_rope(xc, wc, 1e-6, cc, sc)
    fused_gx, fused_gw = torch.autograd.grad(fused, (xc, wc), grad)
    poison()
    normed = tops.rms_norm(xc, wc, 1e-6)
    two = tops.apply_rope(normed.transpose(1, 2), cc, sc).transpose(1, 2)
    two_gx, two_gw = torch.autograd.grad(two, (xc, wc), grad)
    for name, a, want in (
        ("y", fused, two),
        ("grad_x", fused_gx, two_gx),
        ("grad_weight", fused_gw, two_gw),
    ):
        assert torch.isfinite(a).all(), f"seed {seed}: {name} unwritten"
        assert torch.equal(a, want), f"seed {seed}: {name} differs from rms_norm + apply_rope"


ROPE = [
    # (B, NH, S, D, R, interleaved)
    (2, 3, 7, 16, 16, False),
    (1, 32, 512, 128, 128, False),
    (2, 4, 33, 192, 64, True),
    (1, 4, 9, 24, 8, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "nh", "s", "d", "r", "interleaved"), ROPE)
def test_rope(b, nh, s, d, r, interleaved, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, nh, d, generator=gen)  # [B,S,NH,D], viewed transposed below
    freqs = torch.rand(b, s, r // 2, generator=gen) * 10
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def fn(x_: torch.Tensor, c: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        return tops.apply_rope(x_.transpose(1, 2), c, s_, interleaved)

    check(fn, [x, cos, sin], [0], dtype, seed)


ROPE_VIEWS = [
    # (B, NH, S, width, start, R, interleaved, cos_batch): x = q[..., start:] of q [B,NH,S,width]
    # (itself a transposed [B,S,NH,width] buffer), cos/sin [cos_batch,S,R]
    (2, 3, 7, 18, 0, 10, False, 2),  # D=18, R/2=5: element-wise kernel
    (2, 3, 7, 18, 0, 10, True, 2),
    (2, 3, 130, 18, 8, 10, False, 2),  # DeepSeek-V3-style q[..., 8:18]: D=10, row stride 18
    (2, 3, 130, 18, 8, 10, True, 2),
    (2, 3, 7, 18, 8, 8, True, 2),  # D=10, R=8: two pass-through dims
    (2, 5, 33, 26, 10, 8, False, 2),  # D=16, R=8 would vectorise but for the row stride 26
    (2, 5, 33, 26, 10, 8, True, 2),
    (3, 4, 9, 16, 0, 16, False, 1),  # cos/sin of batch 1 broadcast over B=3: vector kernel
    (3, 4, 9, 18, 8, 10, True, 1),  # broadcast, element-wise kernel
    (2, 16, 65, 192, 128, 64, True, 1),  # DeepSeek-V3's q_pe = q[..., 128:192]: vector kernel
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "nh", "s", "width", "start", "r", "interleaved", "cb"), ROPE_VIEWS)
def test_rope_views(b, nh, s, width, start, r, interleaved, cb, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, nh, width, generator=gen)  # [B,S,NH,width], viewed transposed below
    angles = torch.rand(cb, s, r, generator=gen) * 10  # every column its own angle
    cos, sin = angles.cos(), angles.sin()

    def fn(q_: torch.Tensor, c: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        return tops.apply_rope(q_.transpose(1, 2)[..., start:], c, s_, interleaved)

    check(fn, [q, cos, sin], [0], dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "vocab", "large"), [(13, 101, False), (1000, 151936, True)])
def test_cross_entropy(rows, vocab, large, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = -100

    def fn(lg: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return tops.cross_entropy(lg, lb)

    def reference(lg: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(lg, lb, reduction="none")

    # Over Qwen3's 151,936-entry vocabulary the float32 CPU reference's own summation error is
    # about 1e-5 of the loss, so the CUDA kernel is judged against float64 there.
    check(fn, [logits, labels], [0], dtype, seed, reference=reference if large else None)


# The one-pass forward + backward: a row over 1 CTA (101: unvectorised), 2 (bf16 32,000) or 4
# (float32 32,000) CTAs of a cluster with small slices, 8 (151,936) and 8 with large slices
# (400,000), and the two-kernel path (1,000,000: too long for 8 CTAs' shared memory).
CE_FORWARD_BACKWARD = [(13, 101), (64, 32000), (257, 151936), (64, 400000), (16, 1000000)]


@pytest.mark.parametrize("one_pass", ["1", "0"], ids=["one_pass", "two_kernels"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "vocab"), CE_FORWARD_BACKWARD)
def test_cross_entropy_forward_backward(rows, vocab, dtype, in_place, one_pass, monkeypatch):
    """tm_cross_entropy_forward_backward against float64 torch: loss, lse and the gradient
    (grad_loss[r] * (softmax - onehot)), ignored rows zero, an out-of-range label NaN; the
    one-pass kernel (opt-in, TURBOMOE_CE_ONE_PASS=1) and the two kernels."""
    from turbomoe.ops.loss import _ce_forward_backward_into

    monkeypatch.setenv("TURBOMOE_CE_ONE_PASS", one_pass)

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = -100
    labels[-1] = vocab  # invalid: NaN loss and gradient row, no host sync
    grad_loss = torch.rand(rows, generator=gen) + 0.5
    z = logits.double()
    lse_ref = torch.logsumexp(z, dim=1)
    valid = labels >= 0
    safe = labels.clamp(0, vocab - 1)
    loss_ref = torch.where(valid, lse_ref - z.gather(1, safe[:, None])[:, 0], 0.0)
    onehot = torch.zeros_like(z).scatter_(1, safe[:, None], 1.0)
    grad_ref = grad_loss.double()[:, None] * (torch.softmax(z, dim=1) - onehot)
    grad_ref[~valid] = 0.0

    poison()
    lg = logits.to(CUDA)
    loss = torch.empty(rows, device=CUDA)
    lse = torch.empty(rows, device=CUDA)
    grad = lg if in_place else torch.empty_like(lg)
    _ce_forward_backward_into(grad_loss.to(CUDA), lg, labels.to(CUDA), -100, loss, lse, grad)
    loss, lse, grad = loss.cpu(), lse.cpu(), grad.cpu().double()

    ok = valid.clone()
    ok[-1] = False
    assert torch.isnan(loss[-1]) and torch.isnan(grad[-1]).all()
    assert torch.equal(loss[~valid], torch.zeros(int((~valid).sum())))
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))
    assert torch.equal(lse[~valid], torch.zeros(int((~valid).sum())))
    # The loss and lse are formed in float32 from the (dtype) logits the reference also reads.
    assert rel(loss[ok], loss_ref[ok]) < 1e-5
    assert rel(lse[ok], lse_ref[ok]) < 1e-5
    assert rel(grad[ok], grad_ref[ok]) < tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 1000, 622 * 1024 + 8])
def test_scale_unless_one(numel, dtype):
    """A unit scale leaves every bit (NaNs included) as it was; another scale equals the CPU
    reference bit for bit (the product of x and the scale rounded to x's dtype)."""
    from turbomoe.ops.loss import scale_unless_one

    gen = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(numel, generator=gen).to(dtype)
    x[::7] = float("nan")
    on_gpu = x.to(CUDA)
    scale_unless_one(torch.ones(1, device=CUDA), on_gpu)
    assert torch.equal(on_gpu.cpu().view(torch.uint8), x.view(torch.uint8))
    for s in (0.3, -2.0, 0.0):
        want = x.clone()
        scale_unless_one(torch.full((1,), s), want)
        got = x.to(CUDA)
        scale_unless_one(torch.full((1,), s, device=CUDA), got)
        got = got.cpu()
        # NaN payloads may differ between the CPU and CUDA roundings; positions may not.
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(got[finite].view(torch.uint8), want[finite].view(torch.uint8))


# Several chunks and one chunk (rows <= chunk: the summed op's single pass), small and large.
LINEAR_CE_CASES = [
    (13, 72, 101, 5, False),
    (200, 256, 5000, 64, False),
    (200, 256, 5000, 512, False),
    (1024, 2048, 32000, 384, True),
    (1024, 2048, 32000, 4096, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("summed", [False, True], ids=["per_row", "summed"])
@pytest.mark.parametrize(("rows", "hidden", "vocab", "chunk", "large"), LINEAR_CE_CASES)
def test_linear_cross_entropy(rows, hidden, vocab, chunk, large, summed, dtype):
    """Per-row losses (linear_cross_entropy), or their sum with the gradients formed in the
    forward (linear_cross_entropy_total)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) * hidden**-0.5 * 3
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::7] = -100
    op = tops.linear_cross_entropy_total if summed else tops.linear_cross_entropy

    def fn(h_: torch.Tensor, w_: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return op(h_, w_, lb, chunk_rows=chunk)

    def reference(h_: torch.Tensor, w_: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        reduction = "sum" if summed else "none"
        return torch.nn.functional.cross_entropy(h_ @ w_.t(), lb, reduction=reduction)

    check(fn, [h, weight, labels], [0, 1], dtype, seed, 1e-4, reference if large else None)


# ---------------------------------------------------------------------------------- ep_layout

EP_LAYOUT = [(13, 2, 8, 4), (512, 8, 128, 8), (4096, 8, 256, 64), (1, 1, 1, 1), (3000, 4, 64, 2)]


@pytest.mark.parametrize(("tokens", "top_k", "experts", "ranks"), EP_LAYOUT)
@pytest.mark.parametrize("byte", [NAN_BYTE, BIG_BYTE])
def test_ep_layout(tokens, top_k, experts, ranks, byte):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.1] = experts  # EP sentinel
    if ranks > 2:
        per_rank = experts // ranks
        ids[(ids // per_rank) == 1] = 0  # rank 1 receives nothing
    for index_dtype in (torch.int64, torch.int32):
        ref = tops.ep_layout(ids.to(index_dtype), experts, ranks)
        poison(byte)
        out = tops.ep_layout(ids.to(index_dtype).to(CUDA), experts, ranks)
        for o, r in zip(out, ref, strict=True):
            assert torch.equal(o.cpu(), r)


def test_ep_layout_all_to_one_rank_strided_and_empty():
    ids = torch.full((700, 4), 7)
    ids[:, 1] = 6
    ref = tops.ep_layout(ids, 8, 4)
    poison()
    for o, r in zip(tops.ep_layout(ids.to(CUDA), 8, 4), ref, strict=True):
        assert torch.equal(o.cpu(), r)
    strided = torch.randint(0, 9, (4, 1500)).t()  # [T,K] view with strides (1, T)
    ref = tops.ep_layout(strided, 8, 4)
    poison()
    out = torch.ops.turbomoe.ep_layout(strided.to(CUDA), 8, 4)  # the op itself reads strides
    for o, r in zip(out, ref, strict=True):
        assert torch.equal(o.cpu(), r)
    poison()
    out = tops.ep_layout(torch.zeros(0, 4, dtype=torch.int64, device=CUDA), 8, 4)
    assert out[0].cpu().tolist() == [0] * 4
    assert out[1].cpu().tolist() == [0] * 8


EP_SEND_PLAN = [
    (13, 2, 8, 4, 13),
    (4096, 8, 128, 4, 4096),
    (3000, 8, 128, 8, 3100),
    (1, 1, 1, 1, 2),
]


@pytest.mark.parametrize(("tokens", "top_k", "experts", "ranks", "capacity"), EP_SEND_PLAN)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_ep_send_plan(tokens, top_k, experts, ranks, capacity, dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    ids = distinct_ids(tokens, top_k, experts, gen)
    ids[torch.rand(tokens, top_k, generator=gen) < 0.05] = experts  # EP sentinel: dropped
    weights = torch.rand(tokens, top_k, generator=gen).to(dtype)
    w_cpu = weights.clone().requires_grad_()
    ref = tops.ep_send_plan(ids, w_cpu, experts, ranks, capacity)
    probe = torch.randn(ref.meta.shape, generator=gen)
    (ref.meta * probe).sum().backward()
    poison()
    w_gpu = weights.to(CUDA).requires_grad_()
    out = tops.ep_send_plan(ids.to(CUDA), w_gpu, experts, ranks, capacity)
    for name in ("send_pairs", "pair_to_row", "meta", "bad_ids", "token_rank_slot"):
        assert torch.equal(getattr(out, name).cpu(), getattr(ref, name)), f"{name} (seed {seed})"
    poison()
    (out.meta * probe.to(CUDA)).sum().backward()
    assert torch.equal(w_gpu.grad.cpu(), w_cpu.grad), f"weight gradient (seed {seed})"


def test_ep_send_plan_counts_ids_outside_the_experts():
    ids = torch.randint(0, 8, (50, 4))
    ids[3, 1], ids[7, 0], ids[9, 3] = -2, 8, 1000  # invalid, sentinel, invalid
    weights = torch.rand(50, 4, device=CUDA)
    out = tops.ep_send_plan(ids.to(CUDA), weights, 8, 2, 50)
    assert int(out.bad_ids.item()) == 3
    # Every id outside [0, E) is dropped: no row carries a weight for it.
    assert float(out.meta[:, 4:].sum()) == pytest.approx(
        float(weights.cpu()[(ids >= 0) & (ids < 8)].sum()), rel=1e-6
    )
