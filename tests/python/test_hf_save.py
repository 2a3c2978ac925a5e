"""save_pretrained under turbomoe writes a stock checkpoint: stock transformers (patches
removed) loads it into a fresh model that gives bitwise the logits stock code gives the
original model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_models import FAMILIES, build_model, count_op_calls, loss_and_grads, make_batch, rel_err
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import turbomoe


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()
    yield
    turbomoe.patch()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_stock_transformers(family: str, tmp_path: Path) -> None:
    model = build_model(family, seed=20)
    batch = make_batch(seed=20)
    # One turbomoe training step, so the checkpoint holds weights turbomoe produced.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_and_grads(model, batch)
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    # Stock's default checkpoint format: one tensor per expert, no fused 3-D expert tensors.
    assert any(".experts.0." in key for key in keys), keys
    assert not any(key.endswith(("experts.gate_up_proj", "experts.down_proj")) for key in keys)

    ids = batch["input_ids"]
    with torch.no_grad():
        patched_logits = model(input_ids=ids).logits
    turbomoe.unpatch()
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        with torch.no_grad(), count_op_calls() as counts:
            got = loaded(input_ids=ids).logits
    finally:
        turbomoe.patch()
    assert not any(counts.values())
    assert torch.equal(got, want)
    assert rel_err(patched_logits, want) <= 1e-5
