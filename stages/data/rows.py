"""Rows in TRL's conversational formats as the stages exchange them: JSONL files written by `prepare`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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
