"""Rows in TRL's conversational formats, read from and written to JSONL.

Kinds: `sft` rows are `{"messages": [...]}`; `preference` rows are `{"prompt": [...], "chosen": [...],
"rejected": [...]}` with an optional numeric `margin`; `prompt` rows are `{"prompt": [...]}`.
Every problem names the file, the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from stages.errors import InputError

Kind = Literal["sft", "preference", "prompt"]
ROLES = ("system", "user", "assistant")
CONVERSATION_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}


def read_jsonl(path: Path, kind: Kind) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read data file ({exc})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        validate_row(row, kind, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows (the file is empty)")
    return rows


def validate_row(row: Any, kind: Kind, where: str) -> None:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object")
    for field in CONVERSATION_FIELDS[kind]:
        if field not in row:
            raise InputError(f"{where}: missing field {field!r}")
        _validate_messages(row[field], f"{where}: field {field!r}")
    if kind == "sft" and row["messages"][-1]["role"] != "assistant":
        raise InputError(f"{where}: field 'messages': the last message must be from the assistant")
    if kind == "preference" and "margin" in row and not isinstance(row["margin"], int | float):
        raise InputError(f"{where}: field 'margin': expected a number")


def _validate_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InputError(f"{where}[{i}]: expected {{'role': ..., 'content': <string>}}")
        if message.get("role") not in ROLES:
            raise InputError(f"{where}[{i}].role: {message.get('role')!r} is not one of {', '.join(ROLES)}")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Read rows this project wrote itself (already validated)."""
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sft_as_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a conversation before its final assistant turn, so that only that turn carries the loss."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}
