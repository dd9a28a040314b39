"""prepare: load the configured datasets, normalize them to TRL's conversational formats, deduplicate, split
train/eval and write them as JSONL. The licences of everything used are recorded in the artifact's manifest."""

from __future__ import annotations

import json
import random
from typing import Any

from stages.agreement import category_counts, fleiss_kappa, item_agreement
from stages.data import write_jsonl
from stages.errors import InputError
from stages.runner import StageContext
from stages.sources import CONFIG_FIELD, check_licenses, load_kind


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


def with_agreement(rows: list[dict[str, Any]], min_agreement: float | None) -> tuple[list, dict[str, Any]]:
    """Fleiss' kappa per aspect; items whose raters agree less than `min_agreement` (mean over aspects of the
    share of agreeing rater pairs) are dropped; each kept item gets `targets`, the raters' mean per aspect."""
    if not rows:
        return rows, {}
    aspects = sorted(rows[0]["ratings"])
    for row in rows:
        if sorted(row["ratings"]) != aspects:
            raise InputError(f"rated data: every item must be rated on the same aspects {aspects}")
    try:
        kappa = {a: round(fleiss_kappa(category_counts([r["ratings"][a] for r in rows])), 4) for a in aspects}
    except ValueError as exc:
        raise InputError(f"rated data: {exc}") from None
    kept = []
    for row in rows:
        counts = category_counts([row["ratings"][a] for a in aspects])
        agreement = sum(item_agreement(c) for c in counts) / len(aspects)
        if min_agreement is None or agreement >= min_agreement:
            targets = {a: sum(row["ratings"][a]) / len(row["ratings"][a]) for a in aspects}
            kept.append(row | {"targets": targets})
    return kept, {"fleiss_kappa": kappa, "dropped_low_agreement": len(rows) - len(kept)}


def run(ctx: StageContext) -> dict[str, Any]:
    licenses = check_licenses(ctx.config)
    ctx.licenses |= set(licenses.values())
    metrics: dict[str, Any] = {"licenses": licenses}
    for kind in CONFIG_FIELD:
        rows = load_kind(ctx.config, kind)
        agreement: dict[str, Any] = {}
        if kind == "rated":
            rows, agreement = with_agreement(rows, ctx.config.prepare.min_agreement)
        unique = deduplicate(rows)
        train, held_out = split(unique, ctx.config.prepare.eval_fraction, ctx.config.run.seed)
        write_jsonl(ctx.out_dir / f"{kind}_train.jsonl", train)
        write_jsonl(ctx.out_dir / f"{kind}_eval.jsonl", held_out)
        metrics[kind] = {
            "rows": len(rows),
            "duplicates": len(rows) - len(unique),
            "train": len(train),
            "eval": len(held_out),
        } | agreement
    return metrics
