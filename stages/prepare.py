"""prepare: load the configured datasets, normalize them to TRL's conversational formats, and write them as JSONL.

Each source's rows are deduplicated (against every source before it too), split into train and eval, and only
then weighted (`weight: 2` repeats the training rows), so that eval never holds a copy of a training row. Rows
that are well formed but unusable were skipped and counted while converting; their counts, with the first line
numbers, are in the metrics and the log. The licences of everything used are recorded in the manifest.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.data.agreement import category_counts, fleiss_kappa, item_agreement
from rlhf_pipeline.stages.data.formats.conversational import rating_shape
from rlhf_pipeline.stages.data.rows import write_jsonl
from rlhf_pipeline.stages.data.sources import CONFIG_FIELD, SourceRows, check_licenses, load_kind, weighted
from rlhf_pipeline.stages.modeling.stage_context import StageContext

log = logging.getLogger("rlhf.stage")


def deduplicate(rows: list[dict[str, Any]], seen: set[str]) -> list[dict[str, Any]]:
    """The rows not seen before (in this source or an earlier one); `seen` is updated."""
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


def with_agreement(parts: list[SourceRows], min_agreement: float | None) -> dict[str, Any]:
    """Fleiss' kappa per aspect over every rated item; items whose raters agree less than `min_agreement` (mean
    over aspects of the share of agreeing rater pairs) are dropped from their source; each kept item gets
    `targets`, the raters' mean per aspect."""
    rows = [row for part in parts for row in part.rows]
    if not rows:
        return {}
    shapes = {f"data.rated[{part.index}] {part.source.path}": rating_shape(part.rows[0]) for part in parts}
    if len({str(shape) for shape in shapes.values()}) > 1:  # each source's items are alike (its format checks)
        raise InputError(f"data.rated: raters per aspect differ between the sources: {shapes}")
    aspects = sorted(rows[0]["ratings"])
    kappa = {a: round(fleiss_kappa(category_counts([r["ratings"][a] for r in rows])), 4) for a in aspects}
    dropped = 0
    for part in parts:
        kept = []
        for row in part.rows:
            counts = category_counts([row["ratings"][a] for a in aspects])
            agreement = sum(item_agreement(c) for c in counts) / len(aspects)
            if min_agreement is None or agreement >= min_agreement:
                targets = {a: sum(row["ratings"][a]) / len(row["ratings"][a]) for a in aspects}
                kept.append(row | {"targets": targets})
        dropped += len(part.rows) - len(kept)
        part.rows = kept
    return {"fleiss_kappa": kappa, "dropped_low_agreement": dropped}


def run(ctx: StageContext) -> dict[str, Any]:
    licenses = check_licenses(ctx.config)
    ctx.licenses |= set(licenses.values())
    metrics: dict[str, Any] = {"licenses": licenses}
    seed, eval_fraction = ctx.config.run.seed, ctx.config.prepare.eval_fraction
    for kind in CONFIG_FIELD:
        parts = load_kind(ctx.config, kind)
        agreement = with_agreement(parts, ctx.config.prepare.min_agreement) if kind == "rated" else {}
        seen: set[str] = set()
        train: list[dict[str, Any]] = []
        held_out: list[dict[str, Any]] = []
        counts = {"rows": 0, "duplicates": 0, "skipped": 0}
        reasons: dict[str, Any] = {}
        for part in parts:
            unique = deduplicate(part.rows, seen)
            part_train, part_eval = split(unique, eval_fraction, seed) if unique else ([], [])
            rng = random.Random(f"{seed}-{kind}-{part.index}")
            train += weighted(part_train, part.source.weight, rng)
            held_out += weighted(part_eval, min(part.source.weight, 1.0), rng)
            counts["rows"] += len(part.rows)
            counts["duplicates"] += len(part.rows) - len(unique)
            counts["skipped"] += part.skipped.count
            if part.skipped.count:
                log.info(
                    "prepare: data.%s[%d] %s: %s",
                    CONFIG_FIELD[kind],
                    part.index,
                    part.source.path,
                    part.skipped.summary(),
                )
                reasons[part.source.path] = part.skipped.as_metrics()["skipped_reasons"]
        if parts and not (train and held_out):
            raise InputError(
                f"data.{CONFIG_FIELD[kind]}: no {kind} rows left to {'train on' if not train else 'hold out'} "
                f"({counts['rows'] - counts['duplicates']} distinct rows, prepare.eval_fraction "
                f"{eval_fraction}, weights {[part.source.weight for part in parts]})"
            )
        write_jsonl(ctx.out_dir / f"{kind}_train.jsonl", train)
        write_jsonl(ctx.out_dir / f"{kind}_eval.jsonl", held_out)
        metrics[kind] = counts | {"train": len(train), "eval": len(held_out)} | agreement
        if reasons:
            metrics[kind]["skipped_reasons"] = reasons
    return metrics
