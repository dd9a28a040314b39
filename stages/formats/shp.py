"""Stanford Human Preferences (SHP): a Reddit post (`history`) and two comments; `labels` 1 means A is
preferred. The ratio of the comments' scores is kept as a margin, log-scaled: log(score_chosen/score_rejected)."""

from __future__ import annotations

import math
from typing import Any

from stages.formats.records import Record


def _sides(record: Record) -> tuple[str, str, float | None]:
    label = record.get("labels", int)
    if label not in (0, 1):
        raise record.error("labels", f"{label} is outside its range (0 or 1)")
    a, b = record.get("human_ref_A"), record.get("human_ref_B")
    score_a = record.get("score_A", (int, float), default=None)
    score_b = record.get("score_B", (int, float), default=None)
    chosen, rejected = (a, b) if label == 1 else (b, a)
    margin = None
    if score_a is not None and score_b is not None and score_a > 0 and score_b > 0:
        high, low = (score_a, score_b) if label == 1 else (score_b, score_a)
        margin = round(math.log(high / low), 6)
    return chosen, rejected, margin


def _post(record: Record) -> list[dict[str, str]]:
    return [{"role": "user", "content": record.get("history")}]


def preference(records: list[Record]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        chosen, rejected, margin = _sides(record)
        row = {
            "prompt": _post(record),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        if margin is not None:
            row["margin"] = margin
        rows.append(row)
    return rows


def sft(records: list[Record]) -> list[dict[str, Any]]:
    return [{"messages": _post(r) + [{"role": "assistant", "content": _sides(r)[0]}]} for r in records]


def prompt(records: list[Record]) -> list[dict[str, Any]]:
    return [{"prompt": _post(r)} for r in records]
