"""Experiment trackers (`run.report_to`): TensorBoard, MLflow and Weights & Biases, as the HF Trainer reports.

The Trainer-based stages hand the names to their Trainer (`report_to`); the loops written here (PPO, rejection
sampling's rounds) log through accelerate's tracker classes, the maintained tracker code for custom loops.
TensorBoard's event files go into the artifact's `logs/`, so `tensorboard --logdir` works on a downloaded
artifact; MLflow and W&B are configured by their own environment variables (MLFLOW_TRACKING_URI, WANDB_MODE, ...).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_pipeline.stages.core.artifacts import LOGS_DIR
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.progress import is_main_process
from rlhf_pipeline.stages.modeling.stage_context import StageContext

LogMetrics = Callable[[dict[str, float], int], None]
# The keyword by which each accelerate tracker class takes its run's name (TensorBoard's runs are directories).
RUN_NAME_KEYWORD = {"mlflow": "run_name", "wandb": "name"}


def report_to(ctx: StageContext) -> list[str]:
    """The configured trackers; refused (exit 2) where one's package is missing, before any training."""
    missing = [name for name in ctx.config.run.report_to if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(
            f"run.report_to: {', '.join(missing)} not installed in this stage's environment "
            "(pip install 'rlhf-pipeline[tracking]')"
        )
    return list(ctx.config.run.report_to)


def run_name(ctx: StageContext) -> str:
    """The stage's run in MLflow and W&B: the pipeline run's name, the stage and the start of its artifact's key."""
    return f"{ctx.config.run.name}-{ctx.stage}-{ctx.plan.key[:8]}"


def logs_dir(ctx: StageContext, out_dir: Path | None = None) -> Path:
    """The artifact's `logs/`; for a model saved in a subdirectory (reward's `safety/`), `logs/<that>/`."""
    return ctx.out_dir / LOGS_DIR / (out_dir or ctx.out_dir).relative_to(ctx.out_dir)


@contextmanager
def trackers(ctx: StageContext) -> Iterator[LogMetrics]:
    """A function that logs a step's metrics (as `train/<name>`, like the Trainer) to every configured tracker;
    of several processes, the main one's."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    # accelerate names W&B's project (MLflow's experiment unless MLFLOW_EXPERIMENT_NAME is set) after this:
    # the Trainer stages' W&B project, so that a run's stages land together.
    project = os.environ.get("WANDB_PROJECT", "huggingface")
    logs = logs_dir(ctx)
    started = []
    for name in report_to(ctx) if is_main_process() else []:
        tracker_class = LOGGER_TYPE_TO_CLASS[name]
        # A directory tracker (TensorBoard) writes into <directory>/<name>: here, the artifact's logs/ itself.
        if tracker_class.requires_logging_directory:
            tracker = tracker_class(logs.name, logs.parent)
        else:
            tracker = tracker_class(project, **{RUN_NAME_KEYWORD[name]: run_name(ctx)})
        tracker.start()
        started.append(tracker)

    def log(metrics: dict[str, float], step: int) -> None:
        for tracker in started:
            tracker.log({f"train/{key}": value for key, value in metrics.items()}, step=step)

    try:
        yield log
    finally:
        for tracker in started:
            tracker.finish()
