"""A greedy answer from the trained model to one prompt: after the default run it shows, in
words, what a minute of training taught the tiny model."""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_PROMPT = "What is the capital of France?"


def sample_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 48) -> str:
    """The model's reply to a one-message chat, decoded without special tokens."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
