"""Anthropic HH-RLHF: `chosen`/`rejected` transcripts of `\\n\\nHuman:` / `\\n\\nAssistant:` turns.

Both transcripts share the conversation before their final assistant turn: that is the prompt.
"""

from __future__ import annotations

import re
from typing import Any

from stages.formats.records import Record

TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(record: Record, field: str) -> list[dict[str, str]]:
    text = record.get(field)
    parts = TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise record.error(field, "text before the first 'Human:' turn")
    messages = [
        {"role": ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if not messages:
        raise record.error(field, "no 'Human:' / 'Assistant:' turns in the transcript")
    if messages[-1]["role"] != "assistant" or messages[0]["role"] != "user":
        raise record.error(field, "a transcript must start with 'Human:' and end with 'Assistant:'")
    return messages


def _pair(record: Record) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    chosen, rejected = parse_transcript(record, "chosen"), parse_transcript(record, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise record.error("rejected", "does not share the conversation before the last assistant turn with 'chosen'")
    return chosen[:-1], chosen[-1], rejected[-1]


def preference(records: list[Record]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        prompt, chosen, rejected = _pair(record)
        rows.append({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]})
    return rows


def sft(records: list[Record]) -> list[dict[str, Any]]:
    return [{"messages": parse_transcript(record, "chosen")} for record in records]


def prompt(records: list[Record]) -> list[dict[str, Any]]:
    return [{"prompt": _pair(record)[0]} for record in records]
