"""Single-turn instruction datasets: databricks-dolly-15k and Stanford Alpaca.

The instruction and its optional context (Dolly's `context`, Alpaca's `input`) form the user turn; the
response is the assistant turn. They hold no preference pairs. A row with an empty instruction or an empty
response is skipped and counted.
"""

from __future__ import annotations

from typing import Any

from rlhf_pipeline.stages.data.formats.records import Record, UnusableRow, each


def _user_turn(record: Record, context_field: str) -> list[dict[str, str]]:
    instruction = record.get("instruction").strip()
    if not instruction:
        raise UnusableRow("empty instruction")
    context = record.get(context_field, default="").strip()
    content = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": "user", "content": content}]


def _conversation(record: Record, context_field: str, answer_field: str) -> dict[str, Any]:
    answer = record.get(answer_field).strip()
    if not answer:
        raise UnusableRow("empty answer")
    return {"messages": _user_turn(record, context_field) + [{"role": "assistant", "content": answer}]}


@each
def dolly_sft(record: Record) -> dict[str, Any]:
    return _conversation(record, "context", "response")


@each
def dolly_prompt(record: Record) -> dict[str, Any]:
    return {"prompt": _user_turn(record, "context")}


@each
def alpaca_sft(record: Record) -> dict[str, Any]:
    return _conversation(record, "input", "output")


@each
def alpaca_prompt(record: Record) -> dict[str, Any]:
    return {"prompt": _user_turn(record, "input")}
