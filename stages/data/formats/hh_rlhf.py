"""Anthropic HH-RLHF: `chosen`/`rejected` transcripts of `\\n\\nHuman:` / `\\n\\nAssistant:` turns.

The two transcripts normally share the conversation before their final assistant turn: that is the prompt.
About 0.2 % of the real rows differ earlier; there the prompt is the turns both share, as TRL does it. Rows with
an empty answer, identical transcripts, or a transcript that does not end with an answer are skipped and counted.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_pipeline.stages.data.formats.conversational import answered, split_shared_prompt
from rlhf_pipeline.stages.data.formats.records import Record, UnusableRow, each

TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(record: Record, field: str) -> list[dict[str, str]]:
    text = record.get(field)
    parts = TURN.split("\n\n" + text.lstrip("\n"))
    messages = [
        {"role": ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if parts[0].strip():
        raise record.error(field, "text before the first 'Human:' turn")
    if not messages:
        raise record.error(field, "no 'Human:' / 'Assistant:' turns in the transcript")
    if messages[0]["role"] != "user":
        raise UnusableRow("transcript does not start with a Human turn")
    return messages


@each
def preference(record: Record) -> dict[str, Any]:
    prompt, chosen, rejected = split_shared_prompt(
        parse_transcript(record, "chosen"), parse_transcript(record, "rejected")
    )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@each
def sft(record: Record) -> dict[str, Any]:
    return {"messages": answered(parse_transcript(record, "chosen"))}


@each
def prompt(record: Record) -> dict[str, Any]:
    """The conversation before the chosen transcript's final answer."""
    conversation = answered(parse_transcript(record, "chosen"))[:-1]
    if not conversation or conversation[-1]["role"] != "user":
        raise UnusableRow("no user turn before the last answer")
    return {"prompt": conversation}
