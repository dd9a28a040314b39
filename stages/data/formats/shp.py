"""Stanford Human Preferences (SHP): a Reddit post (`history`) and two comments; `labels` 1 means A is
preferred. The ratio of the comments' scores is kept as a margin, log-scaled: log(score_chosen/score_rejected).
Pairs whose comments tie on score, are identical, or one of which is empty are skipped and counted."""

from __future__ import annotations

import math
from typing import Any

from rlhf_pipeline.stages.data.formats.records import Record, UnusableRow, each


def _sides(record: Record) -> tuple[str, str, float | None]:
    label = record.get("labels", int)
    if label not in (0, 1):
        raise record.error("labels", f"{label} is outside its range (0 or 1)")
    a, b = record.get("human_ref_A"), record.get("human_ref_B")
    score_a = record.get("score_A", (int, float), default=None)
    score_b = record.get("score_B", (int, float), default=None)
    if not a.strip() or not b.strip():
        raise UnusableRow("empty answer")
    if a.strip() == b.strip():
        raise UnusableRow("chosen identical to rejected")
    if score_a is not None and score_a == score_b:
        raise UnusableRow("tied scores")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    margin = None
    if score_a is not None and score_b is not None and score_a > 0 and score_b > 0:
        high, low = (score_a, score_b) if label == 1 else (score_b, score_a)
        if high < low:  # SHP prefers the comment with the higher score: such a row is mislabelled
            raise UnusableRow("label disagrees with scores")
        margin = round(math.log(high / low), 6)
    return chosen, rejected, margin


def _post(record: Record) -> list[dict[str, str]]:
    return [{"role": "user", "content": record.get("history")}]


@each
def preference(record: Record) -> dict[str, Any]:
    chosen, rejected, margin = _sides(record)
    row = {
        "prompt": _post(record),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    if margin is not None:
        row["margin"] = margin
    return row


@each
def sft(record: Record) -> dict[str, Any]:
    return {"messages": _post(record) + [{"role": "assistant", "content": _sides(record)[0]}]}


@each
def prompt(record: Record) -> dict[str, Any]:
    return {"prompt": _post(record)}
