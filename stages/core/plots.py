"""PNG plots a person looks at instead of reading tables: a training stage's metric curves, the evaluation's
reward distributions, and the score/KL frontier of a run's alignment methods. Saved into the stage's artifact
(where: `core.artifacts`, outside its digest) or beside the run's summary; the orchestrator shows them in the
Prefect UI.

Drawn on matplotlib's `Figure` directly (no pyplot): no global state, no display needed. matplotlib is imported
only to draw: a stage with nothing to plot never loads it. The panels sit on a fixed grid with margins in inches
and carry at most a handful of ticks: matplotlib's constrained layout measures every label to place them, which
cost more than a tiny stage's training (docs/monitoring.md: 0.45x the time for PPO's twenty curves).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_COLUMNS = 3
TICKS = 5
# Room, in inches, for the title above the panels, each panel's title, its tick labels and axis labels.
MARGIN_TOP = 0.6
MARGIN_BOTTOM = 0.5
MARGIN_LEFT = 0.75
MARGIN_RIGHT = 0.2
GAP_BETWEEN_ROWS = 0.85
GAP_BETWEEN_COLUMNS = 0.8
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
    figure, panels = _figure(title, len(series), min(PANEL_COLUMNS, len(series)), (4, 2.8), whole_x=True)
    for axes, (name, (steps, values)) in zip(panels, sorted(series.items()), strict=True):
        axes.plot(steps, values, marker="." if len(steps) < 30 else None)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    _save(figure, path)
    return True


def save_distributions(panels: dict[str, dict[str, list[float]]], title: str, path: Path) -> None:
    """Overlaid histograms, one panel per score (e.g. reward model, judge), one colour per policy."""
    figure, grid = _figure(title, len(panels), len(panels), (5, 3.2), whole_y=True)
    for axes, (score, by_policy) in zip(grid, panels.items(), strict=True):
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
    figure, (axes,) = _figure("Score against divergence from SFT", 1, 1, (5.5, 4))
    for label, (x, y) in points.items():
        axes.scatter([x], [y], s=40)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    axes.margins(0.25)  # room for the labels
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    _save(figure, path)


def _figure(
    title: str, count: int, columns: int, cell: tuple[float, float], whole_x: bool = False, whole_y: bool = False
) -> tuple[Figure, list[Axes]]:
    """A titled figure of `count` panels, `columns` to a row, each with a `cell` (width, height) in inches of
    the figure, margins included; `whole_x`, `whole_y`: ticks at whole numbers only (steps, counts)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    lines = math.ceil(count / columns)
    width, height = cell[0] * columns, cell[1] * lines
    figure = Figure(figsize=(width, height))
    figure.suptitle(title, y=1 - 0.15 / height, verticalalignment="top")
    panel_width = (width - MARGIN_LEFT - MARGIN_RIGHT - (columns - 1) * GAP_BETWEEN_COLUMNS) / columns
    panel_height = (height - MARGIN_TOP - MARGIN_BOTTOM - (lines - 1) * GAP_BETWEEN_ROWS) / lines
    grid = figure.add_gridspec(
        lines,
        columns,
        left=MARGIN_LEFT / width,
        right=1 - MARGIN_RIGHT / width,
        top=1 - MARGIN_TOP / height,
        bottom=MARGIN_BOTTOM / height,
        wspace=GAP_BETWEEN_COLUMNS / panel_width,
        hspace=GAP_BETWEEN_ROWS / panel_height,
    )
    panels = [figure.add_subplot(grid[index // columns, index % columns]) for index in range(count)]
    for axes in panels:
        axes.xaxis.set_major_locator(MaxNLocator(TICKS, integer=whole_x))
        axes.yaxis.set_major_locator(MaxNLocator(TICKS, integer=whole_y))
    return figure, panels


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
