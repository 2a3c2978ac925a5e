"""PEFT LoRA on attention (target_modules) and on the 3-D expert weights (target_parameters):
turbomoe must read the parametrised ``gate_up_proj``/``down_proj`` (W + ΔW) at call time, so
losses and every LoRA gradient match stock."""

from __future__ import annotations

import pytest
import torch
from hf_models import (
    FAMILIES,
    assert_grads_close,
    build_model,
    loss_and_grads,
    make_batch,
    rel_err,
    stock_and_turbomoe,
)

import turbomoe

peft = pytest.importorskip("peft")

ATTENTION_TARGETS = {
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}
DEFAULT_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()
    yield
    turbomoe.patch()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_attention_and_experts_parity(family: str) -> None:
    model = build_model(family, seed=30)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=ATTENTION_TARGETS.get(family, DEFAULT_ATTENTION_TARGETS),
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        lora_dropout=0.0,
        # Random A and B: with the default B = 0 the adapters would not change the forward.
        init_lora_weights=False,
    )
    torch.manual_seed(31)
    lora_model = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in trainable) and any("o_proj" in n for n in trainable)
    batch = make_batch(seed=30)

    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(lora_model, batch)
    )
    assert set(grads0) == set(trainable)
    assert rel_err(loss1, loss0) <= 1e-5
    assert_grads_close(grads1, grads0, 1e-4)
    assert counts["moe_experts"] > 0 and counts["linear_cross_entropy"] == 1


def test_lora_on_lm_head_keeps_the_stock_loss() -> None:
    """A LoRA-wrapped lm_head is not a plain nn.Linear: the fused loss steps aside (one
    warning) and the stock loss runs on the adapted logits."""
    from turbomoe.hf.fallback import TurbomoeFallbackWarning, reset_warnings

    model = build_model("qwen3_moe", seed=32)
    config = peft.LoraConfig(
        r=2, target_modules=["lm_head", "q_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    torch.manual_seed(33)
    lora_model = peft.get_peft_model(model, config)
    batch = make_batch(seed=32)
    reset_warnings()
    with pytest.warns(TurbomoeFallbackWarning, match="lm_head"):
        (loss0, grads0, _), (loss1, grads1, out1), counts = stock_and_turbomoe(
            lambda: loss_and_grads(lora_model, batch)
        )
    assert counts["linear_cross_entropy"] == 0 and out1.logits is not None
    assert rel_err(loss1, loss0) <= 1e-5
    assert_grads_close(grads1, grads0, 1e-4)
