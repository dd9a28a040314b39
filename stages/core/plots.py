"""PNG plots a person looks at instead of reading tables: a training stage's metric curves, the evaluation's
reward distributions, and the score/KL frontier of a run's alignment methods. Saved into the stage's artifact
(where: `core.artifacts`, outside its digest) or beside the run's summary; the orchestrator shows them in the
Prefect UI.

Drawn on matplotlib's `Figure` directly (no pyplot): no global state, no display needed. matplotlib is imported
only to draw: a stage with nothing to plot never loads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANEL_COLUMNS = 3
# Run-level summaries the Trainer logs once at the end, and bookkeeping that is not a training signal.
NOT_CURVES = {"epoch", "step", "total_flos", "num_tokens"}


def curve_series(rows: list[dict[str, float]]) -> dict[str, tuple[list[int], list[float]]]:
    """Each metric logged at two or more steps, as (steps, values)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name in NOT_CURVES or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    return {name: points for name, points in series.items() if len(points[0]) >= 2}


def save_curves(rows: list[dict[str, float]], title: str, path: Path) -> bool:
    """One panel per metric against the training step; False (and no file) when nothing was logged twice."""
    series = curve_series(rows)
    if not series:
        return False
    columns = min(PANEL_COLUMNS, len(series))
    lines = math.ceil(len(series) / columns)
    figure = _figure(4 * columns, 2.8 * lines, title)
    for index, (name, (steps, values)) in enumerate(sorted(series.items())):
        axes = figure.add_subplot(lines, columns, index + 1)
        axes.plot(steps, values, marker="." if len(steps) < 30 else None)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    _save(figure, path)
    return True


def save_distributions(panels: dict[str, dict[str, list[float]]], title: str, path: Path) -> None:
    """Overlaid histograms, one panel per score (e.g. reward model, judge), one colour per policy."""
    figure = _figure(5 * len(panels), 3.2, title)
    for index, (score, by_policy) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        everything = [value for values in by_policy.values() for value in values]
        low, high = min(everything), max(everything)
        bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 1
        for policy, values in by_policy.items():
            axes.hist(values, bins=bins, alpha=0.45, label=f"{policy} (mean {sum(values) / len(values):.2f})")
        axes.set_title(score, fontsize=10)
        axes.set_ylabel("responses")
        axes.legend(fontsize=8)
    _save(figure, path)


def save_frontier(points: dict[str, tuple[float, float]], x_label: str, y_label: str, path: Path) -> None:
    """One labelled point per policy: a score against the divergence paid for it."""
    figure = _figure(5.5, 4, "Score against divergence from SFT")
    axes = figure.add_subplot(1, 1, 1)
    for label, (x, y) in points.items():
        axes.scatter([x], [y], s=40)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    axes.margins(0.25)  # room for the labels
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    _save(figure, path)


def _figure(width: float, height: float, title: str) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    figure.suptitle(title)
    return figure


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
