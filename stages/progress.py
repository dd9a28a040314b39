"""Progress and training metrics as they happen, for whoever watches the stage's output.

A stage prints one `rlhf-event {json}` line per report on stdout; the orchestrator's launcher turns them into
Prefect progress and table artifacts and events (`flows/monitoring.py`). Plain lines keep Prefect out of the
stage and work the same in a process, a container or a pod. Trainer-based stages report through
`stages.training.ReportProgress`.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

PREFIX = "rlhf-event "
METRICS_HISTORY: list[dict[str, float]] = []  # what this process reported; saved with its stage's artifact


def emit(kind: str, stage: str, **fields: Any) -> None:
    clean = {k: v for k, v in fields.items() if not (isinstance(v, float) and not math.isfinite(v))}
    print(PREFIX + json.dumps({"kind": kind, "stage": stage, **clean}), file=sys.stdout, flush=True)


def report_progress(stage: str, step: int, total: int) -> None:
    emit("progress", stage, step=step, total=total, percent=round(100 * step / max(total, 1), 1))


def report_metrics(stage: str, step: int, metrics: dict[str, Any]) -> None:
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    METRICS_HISTORY.append({"step": step, **numbers})
    emit("metrics", stage, step=step, metrics=numbers)
