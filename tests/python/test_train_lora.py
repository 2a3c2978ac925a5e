"""LoRA fine-tuning through peft: adapters on attention and on the experts' 3-D weights, saved
so that stock peft (`PeftModel.from_pretrained` on the base) reproduces the trained logits."""

from __future__ import annotations

import textwrap

import pytest
import torch
from stock_process import run_without_turbomoe

from turbomoe.default import build_model, build_tokenizer, default_config
from turbomoe.train import FinetuneConfig, finetune

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tokenizer = build_tokenizer()
    torch.manual_seed(3)
    base = build_model(
        default_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    )
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = FinetuneConfig.from_values(
        {"lora": {"enabled": True, "r": 4, "alpha": 8}},
        model=str(root / "base"),
        output_dir=str(root / "run"),
        max_steps=4,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        device="cpu",
        progress="lines",
        threads=1,
        **{"log.plots": False, "data.max_length": 128},
    )
    return root, finetune(config, echo=lambda _: None)


def test_only_adapters_train_and_are_saved_in_peft_format(lora_run):
    _, result = lora_run
    ckpt = result.checkpoint
    assert (ckpt / "adapter_config.json").is_file()
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists(), "adapters only, not the base weights"
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable) and any("q_proj" in n for n in trainable)


def test_adapters_load_in_stock_peft_with_identical_logits(lora_run, tmp_path):
    root, result = lora_run
    ids = torch.tensor([result.tokenizer("<|im_start|>user\nWhat is 2 + 2?")["input_ids"]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    # A separate interpreter with stock transformers and peft: no turbomoe import at all.
    script = textwrap.dedent(
        f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(root / "base")!r}, local_files_only=True)
        model = PeftModel.from_pretrained(base, {str(result.checkpoint)!r}).eval()
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    run_without_turbomoe(script, tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
    # The adapters changed the model: the base alone gives other logits.
    with torch.no_grad(), result.model.disable_adapter():
        base_logits = result.model(input_ids=ids).logits
    assert not torch.allclose(base_logits, expected, atol=1e-4)
