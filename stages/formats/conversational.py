"""TRL's own conversational formats: `messages` (SFT), `preference` and `prompt` rows, checked field by field,
and `rated` rows (a response scored per aspect by several raters) for the multi-aspect reward model."""

from __future__ import annotations

from typing import Any

from stages.formats.records import Record

ROLES = ("system", "user", "assistant")


def messages_of(record: Record, field: str) -> list[dict[str, str]]:
    messages = record.get(field, list)
    if not messages:
        raise record.error(field, "expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise record.error(field, f"[{i}]: expected {{'role': ..., 'content': <string>}}")
        if message.get("role") not in ROLES:
            raise record.error(field, f"[{i}].role: {message.get('role')!r} is not one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def sft(records: list[Record]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        messages = messages_of(record, "messages")
        if messages[-1]["role"] != "assistant":
            raise record.error("messages", "the last message must be from the assistant")
        rows.append({"messages": messages})
    return rows


def preference(records: list[Record]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        row = {name: messages_of(record, name) for name in ("prompt", "chosen", "rejected")}
        margin = record.get("margin", (int, float), default=None)
        if margin is not None:
            row["margin"] = float(margin)
        rows.append(row)
    return rows


def prompt(records: list[Record]) -> list[dict[str, Any]]:
    return [{"prompt": messages_of(record, "prompt")} for record in records]


def rated(records: list[Record]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        ratings = record.get("ratings", dict)
        if not ratings:
            raise record.error("ratings", "expected scores for at least one aspect")
        for aspect, scores in ratings.items():
            numbers = isinstance(scores, list) and all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in scores
            )
            if not numbers or len(scores) < 2:
                raise record.error("ratings", f"{aspect!r}: expected a list of at least two raters' numeric scores")
        rows.append(
            {"prompt": messages_of(record, "prompt"), "response": messages_of(record, "response"), "ratings": ratings}
        )
    return rows
