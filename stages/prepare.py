"""prepare: load the configured datasets, normalize them to TRL's conversational formats, deduplicate, split
train/eval and write them as JSONL."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from stages import demo_task
from stages.config import BUILTIN_DEMO
from stages.data import Kind, read_jsonl, write_jsonl
from stages.runner import StageContext

SOURCES: dict[Kind, tuple[str, str]] = {
    # kind -> (field of the `data` section, demo generator and its row count in `data.demo`)
    "sft": ("sft", "sft_rows"),
    "preference": ("preference", "preference_rows"),
    "prompt": ("prompts", "prompt_rows"),
}


def load_source(ctx: StageContext, kind: Kind) -> list[dict[str, Any]]:
    data = ctx.config.data
    field, generator = SOURCES[kind]
    source = getattr(data, field)
    if source == BUILTIN_DEMO:
        return getattr(demo_task, generator)(getattr(data.demo, generator), ctx.config.run.seed)
    return read_jsonl(Path(source), kind)


def deduplicate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def split(rows: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list, list]:
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * eval_fraction))
    return shuffled[n_eval:], shuffled[:n_eval]


def run(ctx: StageContext) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for kind in SOURCES:
        rows = load_source(ctx, kind)
        unique = deduplicate(rows)
        train, held_out = split(unique, ctx.config.prepare.eval_fraction, ctx.config.run.seed)
        write_jsonl(ctx.out_dir / f"{kind}_train.jsonl", train)
        write_jsonl(ctx.out_dir / f"{kind}_eval.jsonl", held_out)
        metrics[kind] = {
            "rows": len(rows),
            "duplicates": len(rows) - len(unique),
            "train": len(train),
            "eval": len(held_out),
        }
    return metrics
