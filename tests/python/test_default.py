"""The embedded default: byte-level tokenizer, tiny model config and bundled dataset."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from turbomoe.default import DATASET, build_model, build_tokenizer, default_config, make_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_is_byte_level(tokenizer):
    text = "Hello, wörld! 3 + 4 = 7 — ✓ 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")), "one token per byte, id == byte value"
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 260
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"


def test_special_tokens_are_single_tokens(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 1 + len("user\nhi") + 1


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
    ]
    assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    text = "naïve <|im_start|>assistant\nok<|im_end|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(loaded) == len(tokenizer)
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.eos_token_id == tokenizer.eos_token_id


def test_chat_template_generation_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_model_matches_tokenizer_and_runs(tokenizer):
    config = default_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert config.model_type == "qwen3_moe"
    assert config.vocab_size == len(tokenizer)
    assert (config.num_experts, config.num_experts_per_tok) == (8, 2)
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.tensor([tokenizer("What is 2 + 2?")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    # With labels turbomoe may fuse the LM head into the loss and return no logits.
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_bundled_dataset_is_the_generators_output():
    assert DATASET.read_text(encoding="utf-8") == make_dataset.render(make_dataset.build_examples())


def _rows():
    return [json.loads(line)["messages"] for line in DATASET.read_text().splitlines()]


def test_bundled_dataset_shape():
    rows = _rows()
    assert 300 <= len(rows) <= 600
    for messages in rows:
        roles = [m["role"] for m in messages]
        assert roles[-1] == "assistant" and "user" in roles
        assert all(m["content"].strip() for m in messages)
    assert any(len(m) == 4 for m in rows), "some two-turn chats"
    assert any(m[0]["role"] == "system" for m in rows), "some system prompts"
    questions = [m["content"] for row in rows for m in row if m["role"] == "user"]
    assert len(set(questions)) == len(questions), "no duplicate question"


def _pairs():
    for messages in _rows():
        turns = [m for m in messages if m["role"] != "system"]
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            yield q["content"], a["content"]


def test_bundled_answers_are_correct():
    """Re-derives every computable answer independently of the generator."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    checked = 0
    for question, answer in _pairs():
        if m := re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", answer):
            a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
            assert str(a) in question and str(b) in question
            expected = a // b if op == "/" else ops[op](a, b)
            assert op != "/" or a % b == 0
            assert result == expected, (question, answer)
        elif m := re.fullmatch(r"'(\w+)' reversed is '(\w+)'\.", answer):
            assert m[2] == m[1][::-1]
        elif m := re.fullmatch(r"'(\w+)' has (\d+) letters\.", answer):
            assert len(m[1]) == int(m[2])
        elif m := re.fullmatch(r"(\d+) (\w+) is (\d+) (\w+)\.", answer):
            factors = {
                ("kilometer", "meters"): 1000,
                ("meter", "centimeters"): 100,
                ("centimeter", "millimeters"): 10,
                ("kilogram", "grams"): 1000,
                ("liter", "milliliters"): 1000,
                ("hour", "minutes"): 60,
                ("minute", "seconds"): 60,
                ("day", "hours"): 24,
                ("week", "days"): 7,
                ("foot", "inches"): 12,
                ("feet", "inches"): 12,
                ("yard", "feet"): 3,
            }
            unit = m[2] if m[2] == "feet" else m[2].removesuffix("s")
            assert int(m[3]) == int(m[1]) * factors[(unit, m[4])], answer
        elif m := re.fullmatch(r"(\d+) is (even|odd)\.", answer):
            assert (int(m[1]) % 2 == 0) == (m[2] == "even")
        elif m := re.fullmatch(r"(\d+) comes after (\d+)\.", answer):
            assert int(m[1]) == int(m[2]) + 1
        elif m := re.fullmatch(r"(\d+) is larger\.", answer):
            a, b = map(int, re.findall(r"\d+", question))
            assert int(m[1]) == max(a, b)
        elif question.startswith("Sort from smallest"):
            values = [int(v) for v in re.findall(r"\d+", question)]
            assert answer == ", ".join(map(str, sorted(values)))
        elif question.startswith("Sort these words"):
            words = question.split(": ", 1)[1].rstrip(".").split(", ")
            assert answer == ", ".join(sorted(words))
        elif question.startswith("Spell"):
            word = re.search(r"'(\w+)'", question)[1]
            assert answer.replace("-", "") == word
        elif question.startswith("Write '"):
            assert answer == re.search(r"'(\w+)'", question)[1].upper()
        else:
            continue
        checked += 1
    assert checked > 250
