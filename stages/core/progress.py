"""Progress and training metrics as they happen, for whoever watches the stage's output.

A stage prints one `rlhf-event {json}` line per report on stdout; the orchestrator's launcher turns them into
Prefect progress and table artifacts and events (`flows/monitoring/stage_monitor.py`). Plain lines keep
Prefect out of the stage and work the same in a process, a container or a pod. Trainer-based stages report
through `modeling.trainer.ReportProgress`. The other way, a local launcher tells its stages its pid, so that a
stage whose launcher died stops instead of training on for nobody.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any

from rlhf_pipeline.stages.core.errors import EXIT_LAUNCHER_GONE

PREFIX = "rlhf-event "
METRICS_HISTORY: list[dict[str, float]] = []  # what this process reported; saved with its stage's artifact

log = logging.getLogger("rlhf.stage")


def emit(kind: str, stage: str, **fields: Any) -> None:
    clean = {k: v for k, v in fields.items() if not (isinstance(v, float) and not math.isfinite(v))}
    print(PREFIX + json.dumps({"kind": kind, "stage": stage, **clean}), file=sys.stdout, flush=True)


def is_main_process() -> bool:
    """Rank 0 of a stage's several processes (`torchrun` sets RANK), or its only process: the one that reports
    progress and metrics, tracks and publishes."""
    return int(os.environ.get("RANK", "0")) == 0


def report_progress(stage: str, step: int, total: int) -> None:
    if not is_main_process():
        return
    emit("progress", stage, step=step, total=total, percent=round(100 * step / max(total, 1), 1))


def report_metrics(stage: str, step: int, metrics: dict[str, Any]) -> None:
    if not is_main_process():
        return
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    METRICS_HISTORY.append({"step": step, **numbers})
    emit("metrics", stage, step=step, metrics=numbers)


LAUNCHER_PID = "RLHF_LAUNCHER_PID"  # set by the local launcher for the stage processes it starts


def stop_with_launcher(interval: float = 1.0) -> None:
    """Where a local launcher started this stage, end the stage when the launcher is gone (an orchestrator that
    was SIGKILLed cannot stop its children): no stage trains on for a run nobody watches. Every process of a
    multi-process stage watches for itself."""
    pid = int(os.environ.get(LAUNCHER_PID, "0"))
    if not pid:
        return

    parent = os.getppid()  # the launcher, or the warm interpreter a stage is forked from, or torchrun

    def watch() -> None:
        # A dead parent is seen at once (its children are handed to init); a dead launcher once it is reaped.
        while process_alive(pid) and os.getppid() == parent:
            time.sleep(interval)
        log.error("the launcher of this stage (pid %d) is gone: stopping", pid)
        logging.shutdown()
        os._exit(EXIT_LAUNCHER_GONE)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid > 0
