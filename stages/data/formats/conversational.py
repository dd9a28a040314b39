"""TRL's own conversational formats: `messages` (SFT), `preference` and `prompt` rows, checked field by field,
and `rated` rows (a response scored per aspect by several raters) for the multi-aspect reward model.

A preference row without a `prompt` holds two whole conversations (TRL's implicit-prompt form): the prompt is
the turns they share, as TRL's `extract_prompt` makes it. The same rule makes usable the real dumps whose two
transcripts differ before their last answer (HH-RLHF has a few), and those that keep the prompt's text beside two
whole conversations (UltraFeedback binarized: a string `prompt`, as TRL's `maybe_extract_prompt` reads it). A
`prompt` list that both conversations repeat at their start is taken off them, so that no turn appears twice.
"""

from __future__ import annotations

import math
from typing import Any

from rlhf_pipeline.stages.data.formats.records import Record, Skipped, UnusableRow, each

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


def messages_of(record: Record, field: str) -> Messages:
    messages = record.get(field, list)
    if not messages:
        raise record.error(field, "expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise record.error(field, f"[{i}]: expected {{'role': ..., 'content': <string>}}")
        if message.get("role") not in ROLES:
            raise record.error(field, f"[{i}].role: {message.get('role')!r} is not one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def answered(messages: Messages) -> Messages:
    """The conversation, if it ends with a non-empty assistant answer."""
    if messages[-1]["role"] != "assistant":
        raise UnusableRow("no assistant answer at the end")
    if not messages[-1]["content"].strip():
        raise UnusableRow("empty answer")
    return messages


def split_shared_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen answer, rejected answer) of two whole conversations: the prompt is the turns both share,
    each answer the rest of its conversation (TRL's `extract_prompt`)."""
    answered(chosen), answered(rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise UnusableRow("chosen identical to rejected")
    if shared == 0:
        raise UnusableRow("transcripts share no prompt")
    if shared in (len(chosen), len(rejected)):
        raise UnusableRow("one transcript continues the other")
    return chosen[:shared], chosen[shared:], rejected[shared:]


@each
def sft(record: Record) -> dict[str, Any]:
    return {"messages": answered(messages_of(record, "messages"))}


@each
def preference(record: Record) -> dict[str, Any]:
    chosen, rejected = messages_of(record, "chosen"), messages_of(record, "rejected")
    if record.row.get("prompt") is None or isinstance(record.row["prompt"], str):
        prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
    else:
        prompt = messages_of(record, "prompt")
        if chosen[: len(prompt)] == prompt == rejected[: len(prompt)]:
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        if not chosen or not rejected:
            raise UnusableRow("no assistant answer at the end")
        answered(chosen), answered(rejected)
        if chosen == rejected:
            raise UnusableRow("chosen identical to rejected")
    row: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    margin = record.get("margin", (int, float), default=None)
    if margin is not None:
        if not math.isfinite(margin):
            raise record.error("margin", f"expected a finite number, got {margin}")
        row["margin"] = float(margin)
    return row


@each
def prompt(record: Record) -> dict[str, Any]:
    messages = messages_of(record, "prompt")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise UnusableRow("no user turn to answer at the end")
    return {"prompt": messages}


def rated(records: list[Record]) -> tuple[list[dict[str, Any]], Skipped]:
    """Rated rows, every item rated on the same aspects by as many raters as the first (Fleiss' kappa needs
    that): a file that breaks it names the item's line."""
    rows, first = [], None
    for record in records:
        row = _rated(record)
        shape = rating_shape(row)
        first = first or shape
        if shape != first:
            raise record.error(
                "ratings", f"raters per aspect {shape}, the file's first item {first}: every item needs the same"
            )
        rows.append(row)
    return rows, Skipped(len(records))


def rating_shape(row: dict[str, Any]) -> dict[str, int]:
    """How many raters scored each aspect of a rated item."""
    return {aspect: len(scores) for aspect, scores in sorted(row["ratings"].items())}


def _rated(record: Record) -> dict[str, Any]:
    ratings = record.get("ratings", dict)
    if not ratings:
        raise record.error("ratings", "expected scores for at least one aspect")
    for aspect, scores in ratings.items():
        numbers = isinstance(scores, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in scores
        )
        if not numbers or len(scores) < 2:
            raise record.error("ratings", f"{aspect!r}: expected a list of at least two raters' numeric scores")
    return {"prompt": messages_of(record, "prompt"), "response": messages_of(record, "response"), "ratings": ratings}
