"""Training data: jsonl validation with file:line errors, encoding and label masking, packing
(documents never attend to each other), resumable batch order, the validation split."""

from __future__ import annotations

import json

import pytest
import torch

from turbomoe.default import build_tokenizer
from turbomoe.train.batching import BatchStream, collate, collate_packed, epoch_batches, pack
from turbomoe.train.data import ChatRow, CompletionRow, DataError, TextRow, load_rows
from turbomoe.train.encode import IGNORE_INDEX, Encoded, assistant_spans, encode_row, encode_rows
from turbomoe.train.loop import split_rows


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


def test_collate_packed_restarts_positions_and_masks_document_starts():
    batch = collate_packed([[Encoded([1, 2, 3], [1, 2, 3]), Encoded([4, 5], [-100, 5])]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # A document's first token is never a target: it would be predicted across the boundary.
    assert batch.labels.tolist() == [[-100, 2, 3, -100, 5]]
    assert batch.attention_mask is None and (batch.tokens, batch.supervised) == (5, 3)
    two = collate_packed([[Encoded([1, 2, 3], [1, 2, 3])], [Encoded([4], [4])]], pad_id=0)
    assert two.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]], "padding is its own document"
    assert two.labels.tolist() == [[-100, 2, 3], [-100, -100, -100]]


def test_pack_fills_rows_in_order():
    examples = [Encoded([0] * n, [0] * n) for n in (5, 4, 3, 9, 2)]
    assert pack(examples, [0, 1, 2, 3, 4], max_length=10) == [[0, 1], [2], [3], [4]]


@pytest.mark.parametrize("packing", [False, True])
def test_stream_position_resumes_exactly(packing):
    examples = [Encoded(list(range(1, 2 + i % 7)), list(range(1, 2 + i % 7))) for i in range(30)]

    def stream():
        return BatchStream(examples, 3, 0, seed=5, packing=packing, max_length=12)

    first = stream()
    for _ in range(7):
        next(first)
    state = first.state_dict()
    expected = [next(first).input_ids.tolist() for _ in range(9)]  # crosses an epoch boundary
    second = stream()
    second.load_state_dict(state)
    assert [next(second).input_ids.tolist() for _ in range(9)] == expected


def _ids(batch):
    return batch.input_ids.flatten().tolist()


@pytest.mark.parametrize("world", [2, 4, 5])
def test_shards_interleave_one_sequence_across_epochs(world):
    # 10 examples in batches of 4: 3 batches an epoch, fewer than 4 or 5 ranks. Every rank must
    # still get batches (the rank cycle used to restart each epoch and starve ranks >= 3), and
    # round k of the ranks must be batches k*world .. k*world + world - 1 of the single stream.
    examples = [Encoded([i], [i]) for i in range(10)]
    single = [_ids(b) for b in epoch_batches(examples, 4, 0, 1, max_epochs=4)]
    streams = [BatchStream(examples, 4, 0, 1, shard=(r, world)) for r in range(world)]
    rounds = len(single) // world
    for k in range(rounds):
        assert [_ids(next(s)) for s in streams] == single[k * world : (k + 1) * world]


@pytest.mark.parametrize("world", [2, 4])
def test_bounded_shards_end_together_with_fillers(world):
    examples = [Encoded([i, i + 1], [i, i + 1]) for i in range(10)]  # 3 batches of 4
    per_rank = [
        list(BatchStream(examples, 4, 0, 1, max_epochs=1, shard=(r, world), shuffle=False))
        for r in range(world)
    ]
    assert len({len(batches) for batches in per_rank}) == 1, "every rank the same count"
    real = [b for batches in per_rank for b in batches if b.supervised > 0]
    fillers = [b for batches in per_rank for b in batches if b.supervised == 0]
    firsts = [token for b in real for token in _ids(b)[::2]]
    assert sorted(firsts) == list(range(10)), "no example lost"
    assert len(fillers) == len(per_rank[0]) * world - 3
    for f in fillers:
        assert (f.labels == IGNORE_INDEX).all()


def test_stream_resumes_old_checkpoints_without_position():
    examples = [Encoded([i], [i]) for i in range(10)]
    stream = BatchStream(examples, 4, 0, 1, shard=(1, 2))
    stream.load_state_dict({"epoch": 1, "index": 1})  # written before "position" existed
    assert stream.position == 1
    assert _ids(next(stream)) == _ids(list(epoch_batches(examples, 4, 0, 1, max_epochs=2))[4])


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    rows = load_rows(
        _write(tmp_path / "d.jsonl", [json.dumps({"text": f"t{i}"}) for i in range(20)])
    )
    train, val = split_rows(rows, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert {r.line for r in train}.isdisjoint(r.line for r in val)
    assert split_rows(rows, 0.2, seed=1) == (train, val)
    assert split_rows(rows, 0.2, seed=2)[1] != val


def _token_losses(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    target = torch.tensor(ids[1:])
    return torch.nn.functional.cross_entropy(logits[: len(ids) - 1], target, reduction="none")


def test_packed_documents_never_see_each_other(tokenizer):
    """Packed vs one-by-one: every document's logits and per-token losses match in fp32, which
    holds only if no token attends across a document boundary."""
    from turbomoe.default import build_model, default_config

    config = default_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = build_model(config).float().eval()
    texts = ["What is 2 + 3? 5.", "Hi", "The capital of France is Paris, of course."]
    docs = [tokenizer(t)["input_ids"] for t in texts]
    packed = collate_packed([[Encoded(d, d) for d in docs]], pad_id=0)
    # use_cache=False as in training: transformers reads packing from position_ids only when
    # there is no KV cache (masking_utils._preprocess_mask_arguments).
    with torch.no_grad():
        together = model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False
        ).logits[0]
        # The same row with continuous positions: documents now see each other (sanity check).
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits[0]
        at = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            part = together[at : at + len(doc)]
            torch.testing.assert_close(part, alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                _token_losses(part, doc), _token_losses(alone, doc), rtol=1e-5, atol=1e-5
            )
            at += len(doc)
        assert not torch.allclose(leaky[len(docs[0]) :], together[len(docs[0]) :], atol=1e-3)


def test_padded_width_rounds_up_within_the_limit():
    from turbomoe.train.batching import padded_width

    assert padded_width(37) == 37
    assert padded_width(37, 16) == 48
    assert padded_width(48, 16) == 48
    assert padded_width(1000, 64, limit=1024) == 1024
    assert padded_width(1000, 64, limit=1010) == 1010  # never past max_length...
    assert padded_width(1020, 64, limit=1010) == 1020  # ...nor shorter than the longest row


def test_rounded_batches_keep_masks_labels_and_positions():
    examples = [Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4], [4])]
    batch = collate(examples, pad_id=0, multiple=8)
    assert batch.input_ids.shape == (2, 8)
    assert batch.attention_mask.sum().item() == 4 and batch.tokens == 4
    assert (batch.labels[:, 3:] == -100).all()
    packed = collate_packed([examples], pad_id=0, multiple=8, limit=6)
    assert packed.input_ids.shape == (1, 6) and packed.tokens == 4
    assert packed.position_ids[0].tolist() == [0, 1, 2, 0, 0, 1]  # padding: its own positions


def test_stream_pads_to_the_configured_multiple():
    examples = [Encoded(list(range(1, n + 1)), list(range(1, n + 1))) for n in (3, 5, 9, 2)]
    stream = BatchStream(examples, 2, 0, seed=1, max_length=16, max_epochs=1, pad_to_multiple_of=8)
    widths = {b.input_ids.shape[1] for b in stream}
    assert widths <= {8, 16}


def test_fixed_shape_pads_every_packed_batch_to_one_shape():
    """fixed_shape (train.cuda_graph): every batch [batch_size, max_length], the epoch's last one
    too; the padding rows carry no loss and leave the real rows (tokens, labels, positions) as
    the variable-shape stream has them."""
    examples = [Encoded(list(range(1, 2 + i % 5)), list(range(1, 2 + i % 5))) for i in range(11)]
    fixed = BatchStream(examples, 2, 0, seed=5, packing=True, max_length=8, fixed_shape=True)
    plain = BatchStream(examples, 2, 0, seed=5, packing=True, max_length=8)
    per_epoch = plain.batches_per_epoch()
    shapes = set()
    for _ in range(per_epoch):
        a, b = next(fixed), next(plain)
        assert a.input_ids.shape == (2, 8)
        rows, width = b.input_ids.shape
        shapes.add((rows, width))
        assert torch.equal(a.input_ids[:rows, :width], b.input_ids)
        assert torch.equal(a.labels[:rows, :width], b.labels)
        assert torch.equal(a.position_ids[:rows, :width], b.position_ids)
        assert (a.labels[rows:] == -100).all() and (a.labels[:, width:] == -100).all()
        assert (a.tokens, a.supervised) == (b.tokens, b.supervised)
    assert len(shapes) > 1  # the variable stream did change shape: the padding was exercised
    with pytest.raises(ValueError, match="packing"):
        BatchStream(examples, 3, 0, seed=5, max_length=12, fixed_shape=True)
