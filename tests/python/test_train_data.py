"""Training data: jsonl validation with file:line errors, encoding and label masking."""

from __future__ import annotations

import json

import pytest
import torch

from turbomoe.default import build_tokenizer
from turbomoe.train.batching import collate, epoch_batches
from turbomoe.train.data import ChatRow, CompletionRow, DataError, TextRow, load_rows
from turbomoe.train.encode import IGNORE_INDEX, Encoded, assistant_spans, encode_row, encode_rows


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


CHAT = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)


def test_loads_all_three_formats(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [CHAT, "", json.dumps({"prompt": "2+2=", "completion": "4"}), json.dumps({"text": "abc"})],
    )
    rows = load_rows(path)
    assert [type(r) for r in rows] == [ChatRow, CompletionRow, TextRow]
    assert [r.line for r in rows] == [1, 3, 4], "line numbers count blank lines"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ('{"foo": 1}', "exactly one of 'messages', 'prompt'+'completion' or 'text'"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "exactly one of"),
        ('{"prompt": "a"}', "'prompt' needs a 'completion'"),
        ('{"prompt": "a", "completion": 3}', "'completion' must be a string, got a number"),
        ('{"text": "  "}', "'text' is empty"),
        ('{"messages": "hi"}', "'messages' must be a list, got a string"),
        ('{"messages": []}', "'messages' is empty"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0] has role 'bot'"),
        ('{"messages": [{"role": "user"}]}', "messages[0] has no 'content'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}',
            "messages[1].content must be a string, got a number",
        ),
        ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [CHAT, CHAT, line, CHAT])
    with pytest.raises(DataError) as info:
        load_rows(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        load_rows(_write(tmp_path / "empty.jsonl", ["", "  "]))


def _supervised_text(tokenizer, encoded: Encoded) -> str:
    ids = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
    return tokenizer.decode(ids)


def test_chat_labels_cover_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8."},
    ]
    encoded = encode_row(ChatRow(messages, 1), tokenizer)
    assert encoded.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    # Each answer and its end-of-turn token; nothing of the system or user turns or headers.
    assert _supervised_text(tokenizer, encoded) == "5.<|im_end|>8.<|im_end|>"
    for i, label in enumerate(encoded.labels):
        assert label in (IGNORE_INDEX, encoded.input_ids[i])


def test_chat_labels_match_transformers_assistant_mask(tokenizer):
    """The template's {% generation %} markers give HF's own answer; ours must agree."""
    rows = load_rows(__import__("turbomoe.default", fromlist=["DATASET"]).DATASET)[:60]
    for row in rows:
        ours = encode_row(row, tokenizer)
        ref = tokenizer.apply_chat_template(
            row.messages, return_assistant_tokens_mask=True, return_dict=True
        )
        assert ours.input_ids == ref["input_ids"]
        assert [int(label != IGNORE_INDEX) for label in ours.labels] == ref["assistant_masks"]


def test_template_that_rewrites_earlier_turns(tokenizer):
    """Like Qwen3 dropping old reasoning: an earlier turn renders differently once later turns
    exist, so the prefix rendering is not a prefix; the content search must still find it."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = build_tokenizer()
    tok.chat_template = template
    messages = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": "second"},
    ]
    text, spans = assistant_spans(tok, messages, "<|im_end|>")
    assert [text[s:e] for s, e in spans] == ["first<|im_end|>", "<think></think>second<|im_end|>"]


def test_completion_and_text_rows(tokenizer):
    enc = encode_row(CompletionRow("Q: 2+2? A:", " 4", 1), tokenizer)
    assert tokenizer.decode(enc.input_ids) == "Q: 2+2? A: 4<|im_end|>"
    assert _supervised_text(tokenizer, enc) == " 4<|im_end|>"
    enc = encode_row(TextRow("abc", 1), tokenizer)
    assert enc.labels == enc.input_ids and tokenizer.decode(enc.input_ids) == "abc<|im_end|>"


def test_truncation_keeps_or_drops_rows(tokenizer, tmp_path):
    long_prompt = CompletionRow("x" * 50, "yz", 1)
    short = CompletionRow("q", "a" * 20, 2)
    data = encode_rows([long_prompt, short], tokenizer, max_length=10, path=tmp_path / "d.jsonl")
    assert data.dropped == 1 and data.truncated == 1
    assert len(data.examples) == 1 and len(data.examples[0].input_ids) == 10
    with pytest.raises(DataError, match="every row lost"):
        encode_rows([long_prompt], tokenizer, max_length=10, path="d.jsonl")


def test_chat_rows_need_a_chat_template(tokenizer, tmp_path):
    tok = build_tokenizer()
    tok.chat_template = None
    row = ChatRow([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 1)
    with pytest.raises(DataError, match="no chat template"):
        encode_rows([row], tok, 100, "d.jsonl")


def test_encoding_errors_name_the_line(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = "{{ raise_exception('template says no') }}"
    row = ChatRow([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 7)
    with pytest.raises(DataError, match=r"d\.jsonl:7: cannot encode: .*template says no"):
        encode_rows([row], tok, 100, "d.jsonl")


def test_collate_pads_and_masks():
    batch = collate([Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4], [4])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert (batch.tokens, batch.supervised) == (4, 3)
    assert batch.input_ids.dtype == torch.long


def _epochs(examples):
    return [b.input_ids.flatten().tolist() for b in epoch_batches(examples, 4, 0, 1, max_epochs=2)]


def test_epochs_cover_every_example_and_repeat_by_seed():
    examples = [Encoded([i], [i]) for i in range(10)]
    first = _epochs(examples)
    assert first == _epochs(examples)
    assert [len(b) for b in first] == [4, 4, 2, 4, 4, 2]
    assert sorted(first[0] + first[1] + first[2]) == list(range(10))
    assert first[:3] != first[3:], "reshuffled each epoch"
