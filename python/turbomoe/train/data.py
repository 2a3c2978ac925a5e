"""Reading and validating a jsonl training file.

Every line is checked before any training starts, so a typo in line 40,000 costs seconds, not a
run. Each error names the file, the line and what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A training file that cannot be used; the message starts with 'file:line:'."""


@dataclass(frozen=True)
class ChatRow:
    """A conversation; the loss covers the assistant messages."""

    messages: list[dict[str, str]]
    line: int


@dataclass(frozen=True)
class CompletionRow:
    """Plain text: the loss covers the completion, not the prompt."""

    prompt: str
    completion: str
    line: int


@dataclass(frozen=True)
class TextRow:
    """Plain text: the loss covers all of it."""

    text: str
    line: int


Row = ChatRow | CompletionRow | TextRow


def load_rows(path: str | Path) -> list[Row]:
    """All rows of a jsonl file; blank lines are skipped. Raises DataError on the first bad line."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    rows: list[Row] = []
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                rows.append(parse_line(line, path, number))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty)")
    return rows


def parse_line(line: str, path: str | Path, number: int) -> Row:
    """One jsonl line as a row; errors read '<path>:<number>: <what is wrong>'."""
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(obj)}")
    formats = [key for key in ("messages", "prompt", "text") if key in obj]
    if len(formats) != 1:
        found = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(
            f"{where}: a row needs exactly one of 'messages', 'prompt'+'completion' or 'text' "
            f"(keys found: {found})"
        )
    if formats[0] == "messages":
        return ChatRow(_messages(obj["messages"], where), number)
    if formats[0] == "prompt":
        if "completion" not in obj:
            raise DataError(f"{where}: 'prompt' needs a 'completion'")
        prompt = _string(obj["prompt"], "'prompt'", where, allow_empty=True)
        completion = _string(obj["completion"], "'completion'", where)
        return CompletionRow(prompt, completion, number)
    return TextRow(_string(obj["text"], "'text'", where), number)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"{where}: 'messages' must be a list, got {_kind(value)}")
    if not value:
        raise DataError(f"{where}: 'messages' is empty")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object, got {_kind(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}"
            )
        if "content" not in message:
            raise DataError(f"{where}: messages[{i}] has no 'content'")
        content = _string(
            message["content"], f"messages[{i}].content", where, allow_empty=role != "assistant"
        )
        # Extra keys (name, tool_calls, ...) pass through to the chat template untouched.
        messages.append({**message, "role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so there is nothing to learn")
    return messages


def _string(value: Any, name: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {name} is empty")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
