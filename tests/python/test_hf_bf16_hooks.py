"""bf16 accuracy of each hook on its own, against a float32 reference of the same weights.

Two correct bf16 runs can differ from each other by more than a tight tolerance, so each run is
judged by its distance from float32 stock transformers: turbomoe with one hook applied must be
no further from it than stock bf16 is (with slack). Patching one hook at a time names the op at
fault when the full patch drifts. CPU always; CUDA with the ``gpu`` marker.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import build_model, loss_and_grads, make_batch

import turbomoe
from turbomoe.hf.registry import HOOKS

SLACK = 1.25
ABS_SLACK = 1e-3

Grads = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()
    yield
    turbomoe.patch()


def _flat_rel_err(got: Grads, want: Grads) -> float:
    diff = sum(((got[k].double() - want[k].double()) ** 2).sum() for k in want)
    ref = sum((want[k].double() ** 2).sum() for k in want)
    return float((diff / ref).sqrt())


def _worst(got: Grads, want: Grads, n: int = 3) -> list[tuple[str, float]]:
    errs = {
        k: float((got[k].double() - want[k].double()).norm() / want[k].double().norm())
        for k in want
    }
    return sorted(errs.items(), key=lambda item: -item[1])[:n]


def _check_hooks_one_by_one(family: str, device: torch.device) -> None:
    base = build_model(family, seed=40).to(device)
    batch = {k: v.to(device) for k, v in make_batch(seed=40).items()}
    turbomoe.unpatch()
    try:
        _, reference, _ = loss_and_grads(copy.deepcopy(base), batch)
        model = copy.deepcopy(base).to(torch.bfloat16)
        _, stock, _ = loss_and_grads(model, batch)
    finally:
        turbomoe.patch()
    stock = {k: v.float() for k, v in stock.items()}
    stock_err = _flat_rel_err(stock, reference)
    failures = []
    for hook in HOOKS:
        turbomoe.patch(hooks=[hook])
        _, grads, _ = loss_and_grads(model, batch)
        grads = {k: v.float() for k, v in grads.items()}
        err = _flat_rel_err(grads, reference)
        if err > SLACK * stock_err + ABS_SLACK:
            failures.append(f"{hook}: {err:.3e} (worst {_worst(grads, reference)})")
    assert not failures, (
        f"{family} on {device}: stock bf16 is {stock_err:.3e} from float32; hooks further "
        f"than {SLACK}x that: {failures}"
    )


def test_bf16_hooks_cpu() -> None:
    _check_hooks_one_by_one("deepseek_v3", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_bf16_hooks_cuda(family: str) -> None:
    _check_hooks_one_by_one(family, torch.device("cuda"))
