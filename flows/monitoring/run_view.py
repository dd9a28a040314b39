"""What the terminal shows of a run: while `rlhf run` runs, each stage's status, the running stage's progress bar
and elapsed time (a live display on a terminal, a line per change otherwise); at the end, a short table of the
stage results and the headline numbers.

The pipeline and the stage monitors report to the active view, if any, through `stage_started`,
`stage_progress` and `stage_finished`; with no view (a deployment's flow run, a test) they do nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

from rlhf_pipeline.stages.core.comparison import FRONTIER_FILE, comparison_markdown
from rlhf_pipeline.stages.core.registry import STAGE_NAMES

TRENDS = ("loss", "score", "kl")  # shown as first → last where a stage logs both
KEY_NUMBERS = ("eval_loss", "eval_accuracy", "samples_kept", "win_rate_vs_sft", "kl_rl_sft")


class RunView:
    def __init__(self, console: Console, labels: list[str]) -> None:
        self.console = console
        self.labels = labels  # a row each: the stages, and per method where a run compares several
        self.started: dict[str, float] = {}
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RunView:
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn(f"{{task.description:<{max(map(len, self.labels))}}}"),
                TextColumn("{task.fields[status]:<8}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.tasks = {
                name: self.progress.add_task(name, total=100, start=False, status="waiting") for name in self.labels
            }
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def started_stage(self, stage: str) -> None:
        self.started[stage] = time.monotonic()
        if self.progress is None:
            self.console.print(f"{stage}: running")
            return
        self.progress.start_task(self.tasks[stage])
        self.progress.update(self.tasks[stage], status="running")

    def progressed(self, stage: str, percent: float) -> None:
        if self.progress is not None:
            self.progress.update(self.tasks[stage], completed=percent)

    def finished_stage(self, stage: str, status: str) -> None:
        if self.progress is None:
            self.console.print(f"{stage}: {status} in {time.monotonic() - self.started[stage]:.1f} s")
            return
        completed = 100 if status != "failed" else None
        self.progress.update(self.tasks[stage], status=status, completed=completed)
        self.progress.stop_task(self.tasks[stage])


_active: RunView | None = None


@contextmanager
def watching(labels: list[str] | None = None, console: Console | None = None) -> Iterator[RunView]:
    """Show the run that happens inside this block (on standard error, so standard output stays the result):
    a row per label (`flows.pipeline.step_labels`), by default one per stage."""
    global _active
    with RunView(console or Console(stderr=True), labels or list(STAGE_NAMES)) as view:
        _active = view
        try:
            yield view
        finally:
            _active = None


def stage_started(stage: str) -> None:
    if _active is not None:
        _active.started_stage(stage)


def stage_progress(stage: str, percent: float) -> None:
    if _active is not None:
        _active.progressed(stage, percent)


def stage_finished(stage: str, status: str) -> None:
    if _active is not None:
        _active.finished_stage(stage, status)


def print_summary(summary: dict[str, Any], file=None) -> None:
    """The run's stages as a table (status, seconds, attempts, key numbers), then its headline."""
    file = file or sys.stdout
    print(f"run {summary['run_id']}: {summary['status']} (store {summary['store']})", file=file)
    if summary.get("resumes"):
        print(f"  resumes run {summary['resumes']}, which crashed", file=file)
    width = max([9, *map(len, summary["stages"])])
    print(f"  {'stage':<{width}} {'status':<7} {'seconds':>8} {'tries':>5}  key numbers", file=file)
    for name, stage in summary["stages"].items():
        attempts = stage.get("attempts") or "-"
        numbers = stage.get("error") or key_numbers(stage["metrics"])
        print(f"  {name:<{width}} {stage['status']:<7} {stage['seconds']:8.1f} {attempts:>5}  {numbers}", file=file)
    line = headline({name: stage["metrics"] for name, stage in summary["stages"].items()})
    if line:
        print(line, file=file)
    if "comparison" in summary:
        print("", comparison_markdown(summary["comparison"], frontier=None), sep="\n", end="", file=file)
        print(f"frontier plot: {summary['store'].rstrip('/')}/runs/{summary['run_id']}/{FRONTIER_FILE}", file=file)


def key_numbers(metrics: dict[str, Any]) -> str:
    parts = [
        f"{name} {metrics[f'first_{name}']:.3g} → {metrics[f'last_{name}']:.3g}"
        for name in TRENDS
        if f"first_{name}" in metrics and f"last_{name}" in metrics
    ]
    parts += [f"{name} {metrics[name]:.3g}" for name in KEY_NUMBERS if isinstance(metrics.get(name), int | float)]
    return ", ".join(parts)


def headline(metrics: dict[str, dict]) -> str:
    """The numbers that say whether a run worked: the reward model's accuracy, RL's win rate over SFT and the
    mean rewards of the three policies; for a run of several methods, each one's win rate over SFT."""
    parts = []
    if "eval_accuracy" in metrics.get("reward", {}):
        parts.append(f"reward accuracy {metrics['reward']['eval_accuracy']:.3f}")
    evaluation = metrics.get("evaluate", {})
    if "win_rate_vs_sft" in evaluation:
        parts.append(f"win rate vs SFT {evaluation['win_rate_vs_sft']:.3f}")
    if "mean_reward" in evaluation:
        parts.append("mean reward " + " / ".join(f"{k} {v:.3f}" for k, v in evaluation["mean_reward"].items()))
    methods = {
        label.removeprefix("evaluate:"): numbers["win_rate_vs_sft"]
        for label, numbers in metrics.items()
        if label.startswith("evaluate:") and "win_rate_vs_sft" in numbers
    }
    if methods:
        parts.append("win rate vs SFT " + " / ".join(f"{m} {rate:.3f}" for m, rate in methods.items()))
    return ", ".join(parts)
