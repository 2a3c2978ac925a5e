"""The fused AdamW step (``turbomoe.ops.adamw_step_``) against the same step written as tensor
ops, and turbomoe's AdamW optimizer with and without it."""

from __future__ import annotations

import pytest
import torch

import turbomoe.ops as tops
from turbomoe.train import optim as tm_optim
from turbomoe.train.optim import AdamW

F32, BF16 = torch.float32, torch.bfloat16
HYPER = {"lr": 3e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def _run(param_dtype, state_dtype, weight_decay, fused, monkeypatch, shape=(37, 19), steps=4):
    monkeypatch.setenv("TURBOMOE_FUSED_ADAMW", "1" if fused else "0")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(param_dtype))
    opt = AdamW([p], weight_decay=weight_decay, state_dtype=state_dtype, **HYPER)
    for _ in range(steps):
        p.grad = torch.randn(shape).to(param_dtype)
        opt.step()
    return p.detach(), opt.state[p]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's bf16 spacing (for comparing bf16 results that may round apart)."""
    spacing = torch.finfo(BF16).eps * b.float().abs().clamp_min(torch.finfo(BF16).tiny)
    return (a.float() - b.float()).abs() / spacing


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("state_dtype", [F32, BF16])
@pytest.mark.parametrize("param_dtype", [F32, BF16])
def test_fused_step_matches_tensor_ops(param_dtype, state_dtype, weight_decay, monkeypatch):
    fused_p, fused_state = _run(param_dtype, state_dtype, weight_decay, True, monkeypatch)
    ref_p, ref_state = _run(param_dtype, state_dtype, weight_decay, False, monkeypatch)
    assert fused_state["exp_avg"].dtype == state_dtype and fused_p.dtype == param_dtype
    torch.manual_seed(0)  # _run drew the starting parameters first under this seed
    ref_start = torch.randn(37, 19).to(param_dtype)
    assert not torch.equal(ref_p, ref_start), "the reference did not move the parameters"
    for ours, ref in (
        (fused_p, ref_p),
        (fused_state["exp_avg"], ref_state["exp_avg"]),
        (fused_state["exp_avg_sq"], ref_state["exp_avg_sq"]),
    ):
        if ours.dtype == F32:
            torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-7)
        else:
            # float32 arithmetic in another order may round to the neighbouring bf16 value.
            assert float(_ulps_apart(ours, ref).max()) <= 1.0


def test_non_contiguous_parameters_take_the_tensor_op_step(monkeypatch):
    """A transposed parameter cannot go to the kernel: the step still happens, as tensor ops."""
    calls = []
    monkeypatch.setattr(tm_optim, "_step_with_tensor_ops", lambda *a: calls.append(a))
    p = torch.nn.Parameter(torch.randn(8, 6).t())
    p.grad = torch.randn(6, 8)
    q = torch.nn.Parameter(torch.randn(8, 6))
    q.grad = torch.randn(8, 6)
    before_q = q.detach().clone()
    AdamW([p, q], lr=1e-2).step()
    assert len(calls) == 1 and calls[0][0] is p
    assert not torch.equal(q.detach(), before_q)


def test_reasons_name_what_the_kernel_cannot_take():
    p, g = torch.randn(4, 4), torch.randn(4, 4)
    m, v = torch.zeros(4, 4), torch.zeros(4, 4)
    assert tops.adamw_step_reason(p, g, m, v) is None
    assert "non-contiguous" in tops.adamw_step_reason(p.t(), g, m, v)
    assert "shapes" in tops.adamw_step_reason(p, g[:2], m, v)
    assert "dtypes" in tops.adamw_step_reason(p.half(), g, m, v)
    assert "moments" in tops.adamw_step_reason(p, g, m, v.bfloat16())
    with pytest.raises(ValueError, match="non-contiguous"):
        tops.adamw_step_(
            p.t(), g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1
        )


def test_library_rejects_bad_hyperparameters_and_shared_memory():
    p, g = torch.randn(16), torch.randn(16)
    m, v = torch.zeros(16), torch.zeros(16)
    before = p.clone()
    kwargs = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="step"):
        tops.adamw_step_(p, g, m, v, step=0, **kwargs)
    with pytest.raises(ValueError, match="beta"):
        tops.adamw_step_(p, g, m, v, step=1, **{**kwargs, "beta1": 1.0})
    with pytest.raises(ValueError, match="share memory"):
        tops.adamw_step_(p, g, m, m, step=1, **kwargs)
    assert torch.equal(p, before) and not m.any(), "a rejected call changed its tensors"


def test_dtensor_parameters_step_on_their_local_shards(tmp_path, monkeypatch):
    """FSDP2's DTensor parameters: the fused step runs on the local shards, in place, with the
    result of the same step on plain tensors (a one-rank gloo mesh, Shard(0))."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    calls = []
    monkeypatch.setattr(tm_optim, "_step_with_tensor_ops", lambda *a: calls.append(a))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(3)
        start, grad = torch.randn(12, 5).to(BF16), torch.randn(12, 5).to(BF16)
        d = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        d.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        plain = torch.nn.Parameter(start.clone())
        plain.grad = grad.clone()
        AdamW([d], lr=1e-2, weight_decay=0.1).step()
        AdamW([plain], lr=1e-2, weight_decay=0.1).step()
        assert isinstance(d, DTensor) and not calls, "the DTensor took the tensor-op step"
        assert torch.equal(d.to_local(), plain.detach())
        assert not torch.equal(plain.detach(), start)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fused", [True, False])
def test_grad_scale_steps_like_clipped_gradients(fused, monkeypatch):
    """step(grad_scale=s) takes the step of the gradients multiplied by s (a clipping factor on
    the device) and leaves .grad as it was."""
    monkeypatch.setenv("TURBOMOE_FUSED_ADAMW", "1" if fused else "0")
    torch.manual_seed(4)
    ours = torch.nn.Parameter(torch.randn(33, 7))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = AdamW([ours], lr=1e-2, weight_decay=0.1)
    ref_opt = AdamW([ref], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(33, 7) * 5
        scale = (1.0 / grad.norm()).clamp(max=1.0)
        ours.grad, ref.grad = grad.clone(), grad * scale
        opt.step(grad_scale=scale)
        ref_opt.step()
        assert torch.equal(ours.grad, grad), "the step rescaled .grad"
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[ours]["exp_avg"], ref_opt.state[ref]["exp_avg"])


def test_grad_scale_must_be_one_float32_value():
    p, g = torch.randn(8), torch.randn(8)
    m, v = torch.zeros(8), torch.zeros(8)
    kwargs = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="grad_scale"):
        tops.adamw_step_(p, g, m, v, step=1, grad_scale=torch.ones(2), **kwargs)
    with pytest.raises(TypeError, match="grad_scale"):
        tops.adamw_step_(p, g, m, v, step=1, grad_scale=torch.ones((), dtype=BF16), **kwargs)
