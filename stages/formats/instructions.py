"""Single-turn instruction datasets: databricks-dolly-15k and Stanford Alpaca.

The instruction and its optional context (Dolly's `context`, Alpaca's `input`) form the user turn; the
response is the assistant turn. They hold no preference pairs.
"""

from __future__ import annotations

from typing import Any

from stages.formats.records import Record


def _user_turn(record: Record, context_field: str) -> list[dict[str, str]]:
    instruction = record.get("instruction").strip()
    if not instruction:
        raise record.error("instruction", "is empty")
    context = record.get(context_field, default="").strip()
    content = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": "user", "content": content}]


def _conversations(records: list[Record], context_field: str, answer_field: str) -> list[dict[str, Any]]:
    return [
        {"messages": _user_turn(r, context_field) + [{"role": "assistant", "content": r.get(answer_field).strip()}]}
        for r in records
    ]


def dolly_sft(records: list[Record]) -> list[dict[str, Any]]:
    return _conversations(records, "context", "response")


def dolly_prompt(records: list[Record]) -> list[dict[str, Any]]:
    return [{"prompt": _user_turn(r, "context")} for r in records]


def alpaca_sft(records: list[Record]) -> list[dict[str, Any]]:
    return _conversations(records, "input", "output")


def alpaca_prompt(records: list[Record]) -> list[dict[str, Any]]:
    return [{"prompt": _user_turn(r, "input")} for r in records]
