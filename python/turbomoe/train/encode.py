"""Rows -> token ids and labels, with the loss only on what the model should learn to write.

Chat rows are rendered with the tokenizer's own chat template, so a fine-tuned model sees exactly
the format it will be prompted with. Assistant turns are located as character spans of the rendered
text (by rendering the conversation up to each turn, which works for any template), and a token is
supervised when it starts inside a span; everything else gets label -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbomoe.train.data import ChatRow, CompletionRow, DataError, Row, TextRow

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and every HF loss) skips
_PROBE = "\x00turbomoe-probe\x00"


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss applies; same length as input_ids

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class EncodedDataset:
    examples: list[Encoded]
    truncated: int  # rows cut at max_length that kept some supervised tokens
    dropped: int  # rows left with no supervised token after truncation


def encode_rows(
    rows: list[Row], tokenizer: Any, max_length: int, path: str | Path
) -> EncodedDataset:
    """Encodes every row; errors name the row's line in path."""
    if any(isinstance(r, ChatRow) for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{path}: has 'messages' rows but the tokenizer has no chat template; add one to the "
            "model's tokenizer_config or use 'prompt'/'completion' or 'text' rows"
        )
    terminator = _turn_terminator(tokenizer) if any(isinstance(r, ChatRow) for r in rows) else ""
    examples: list[Encoded] = []
    truncated = dropped = 0
    for row in rows:
        try:
            encoded = encode_row(row, tokenizer, terminator)
        except DataError:
            raise
        except Exception as exc:  # a template or tokenizer error: report which row caused it
            raise DataError(f"{path}:{row.line}: cannot encode: {exc}") from exc
        if len(encoded.input_ids) > max_length:
            encoded = Encoded(encoded.input_ids[:max_length], encoded.labels[:max_length])
            if encoded.supervised == 0:
                dropped += 1
                continue
            truncated += 1
        examples.append(encoded)
    if not examples:
        raise DataError(
            f"{path}: every row lost all its supervised tokens to data.max_length {max_length}"
        )
    return EncodedDataset(examples, truncated, dropped)


def encode_row(row: Row, tokenizer: Any, terminator: str = "") -> Encoded:
    """One row, untruncated. terminator: the chat template's end-of-turn text (see below)."""
    if isinstance(row, ChatRow):
        return _encode_chat(row.messages, tokenizer, terminator)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(row, CompletionRow):
        prompt = tokenizer(row.prompt, add_special_tokens=True)["input_ids"]
        completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"] + eos
        return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    assert isinstance(row, TextRow)
    ids = tokenizer(row.text, add_special_tokens=True)["input_ids"] + eos
    return Encoded(ids, list(ids))


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _turn_terminator(tokenizer: Any) -> str:
    """The text a template writes right after an assistant message's content (ChatML:
    '<|im_end|>'), found by rendering a probe message; '' when the template will not say."""
    try:
        text = _render(
            tokenizer,
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}],
            generation_prompt=False,
        )
    except Exception:
        return ""
    at = text.rfind(_PROBE)
    return text[at + len(_PROBE) :].rstrip() if at >= 0 else ""


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], terminator: str = ""
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn.

    A span runs from just after the template's assistant header to the end of the turn (its
    end-of-turn token included, trailing whitespace not), so the model learns to stop.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix_end(tokenizer, messages[:i], True, text)
        if start is None or start < cursor:
            # The template renders earlier turns differently once more follow (e.g. Qwen3 drops
            # reasoning from old turns): fall back to finding the content itself.
            start = text.find(message["content"].strip(), cursor)
        end = _prefix_end(tokenizer, messages[: i + 1], False, text)
        if end is not None:
            end = len(text[:end].rstrip())
        elif start >= 0:
            content = message["content"].strip()
            at = text.find(content, start)
            end = at + len(content) if at >= 0 else -1
            if end >= 0 and terminator and text.startswith(terminator, end):
                end += len(terminator)
        if start < 0 or end is None or end <= start:
            raise DataError(
                f"assistant message {i} cannot be located in the chat template's output "
                "(the template rewrites its content)"
            )
        spans.append((start, end))
        cursor = end
    return text, spans


def _prefix_end(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, text: str
) -> int | None:
    """len(render(messages)) when that rendering is a prefix of text, else None."""
    if not messages and not generation_prompt:
        return 0
    try:
        prefix = _render(tokenizer, messages, generation_prompt)
    except Exception:  # some templates refuse partial conversations (e.g. no user turn yet)
        return None
    return len(prefix) if text.startswith(prefix) else None


def _encode_chat(messages: list[dict[str, str]], tokenizer: Any, terminator: str) -> Encoded:
    text, spans = assistant_spans(tokenizer, messages, terminator)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise DataError(
            "chat rows need a fast (tokenizers-backed) tokenizer to map turns to tokens"
        ) from exc
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span = 0
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if spans[span][0] <= start:
            labels[t] = ids[t]
    return Encoded(ids, labels)
