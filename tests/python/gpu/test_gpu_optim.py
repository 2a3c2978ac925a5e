"""The fused AdamW step on CUDA against the same op on CPU (the C++ reference), over several
steps, for every dtype mix, sizes that leave a scalar tail, storage offsets that rule out the
vectorised body, with and without a gradient scale read on the device."""

from __future__ import annotations

import pytest
import torch

import turbomoe.ops as tops

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
F32, BF16 = torch.float32, torch.bfloat16
HYPER = {"lr": 2e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


def _tensor(n: int, offset: int, dtype: torch.dtype, fill: torch.Tensor | None) -> torch.Tensor:
    """n elements starting `offset` elements into a fresh buffer (offset 1-7: misaligned)."""
    base = torch.full((n + offset,), float("nan"), dtype=dtype, device=CUDA)
    t = base[offset:]
    if fill is not None:
        t.copy_(fill)
    return t


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize(("param_dtype", "state_dtype"), [(F32, F32), (BF16, F32), (BF16, BF16)])
@pytest.mark.parametrize(("n", "offset"), [(1, 0), (13, 0), (4099, 0), (1 << 20, 0), (4096, 3)])
def test_adamw_step_matches_cpu(n, offset, param_dtype, state_dtype, weight_decay, scaled):
    gen = torch.Generator().manual_seed(n + offset)
    start = torch.randn(n, generator=gen).to(param_dtype)
    cpu_p = start.clone()
    cpu_m, cpu_v = torch.zeros(n, dtype=state_dtype), torch.zeros(n, dtype=state_dtype)
    gpu_p = _tensor(n, offset, param_dtype, start)
    gpu_m = _tensor(n, offset, state_dtype, torch.zeros(n, dtype=state_dtype))
    gpu_v = _tensor(n, offset, state_dtype, torch.zeros(n, dtype=state_dtype))
    for step in range(1, 4):
        grad = torch.randn(n, generator=gen).to(param_dtype)
        # A clipping factor read on the device (a 0-dim float32 tensor), or none.
        scale = torch.tensor(0.37) if scaled else None
        cpu_kw = {"weight_decay": weight_decay, "step": step, "grad_scale": scale, **HYPER}
        tops.adamw_step_(cpu_p, grad, cpu_m, cpu_v, **cpu_kw)
        gpu_g = _tensor(n, offset, param_dtype, grad)
        gpu_kw = {**cpu_kw, "grad_scale": None if scale is None else scale.to(CUDA)}
        tops.adamw_step_(gpu_p, gpu_g, gpu_m, gpu_v, **gpu_kw)
    torch.cuda.synchronize()
    assert not torch.equal(cpu_p, start), "the reference did not move the parameters"
    for got, want in ((gpu_p, cpu_p), (gpu_m, cpu_m), (gpu_v, cpu_v)):
        got = got.cpu()
        assert torch.isfinite(got).all()
        if got.dtype == F32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        else:
            # The GPU contracts multiply-adds into FMAs, so a value may round to the neighbouring
            # bf16 one, and later steps carry that on: bound the whole and the largest deviation.
            assert rel(got, want) < 1e-2
            assert float((got.float() - want.float()).abs().max()) <= 2**-6 * float(
                want.float().abs().max()
            )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
