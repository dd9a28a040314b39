"""What a stage reports while it runs, shown in the Prefect UI: a progress artifact updated live, its logged
metrics as a table artifact and as `rlhf.metrics` events (for automations, e.g. on a KL that explodes), its
metric curves as a picture, and the evaluation report (with its score distributions) as a Markdown artifact.

Stages print `rlhf-event {json}` lines (`stages/core/progress.py`); the launcher hands each line to a StageMonitor.
Monitoring never stops training: a malformed event line, or a Prefect API that fails or is away, is logged
and skipped, and the launcher keeps draining the stage's output.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event

from rlhf_pipeline.flows.monitoring.run_view import stage_progress
from rlhf_pipeline.stages.core.artifacts import CURVES_FILE, PLOTS_DIR, Manifest, read_verified
from rlhf_pipeline.stages.core.errors import DamagedArtifact
from rlhf_pipeline.stages.core.progress import PREFIX
from rlhf_pipeline.stages.core.store import ArtifactStore

log = logging.getLogger("rlhf.monitoring")

PROGRESS_INTERVAL_S = 2.0  # at most one progress update per interval (and always 100 %): each is an API call


class StageMonitor:
    def __init__(self, label: str) -> None:
        self.label = label  # the step's name: its stage, and its method in a run of several (`rl:ppo`)
        self.progress_id: Any = None  # the progress artifact's id, once created
        self.progress_updated = 0.0
        self.rows: list[dict[str, Any]] = []

    @classmethod
    def in_run_context(cls, label: str) -> StageMonitor | None:
        """A monitor where artifacts have a Prefect run to belong to, else None."""
        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return None
        return cls(label)

    def handle(self, line: str) -> bool:
        """Consume a stage's event line; False for any other output."""
        if not line.startswith(PREFIX):
            return False
        try:
            event = json.loads(line.removeprefix(PREFIX))
            kind = event["kind"]
            if kind == "progress":
                forward = partial(self.progress, float(event["percent"]))
            else:
                forward = partial(self.metrics, int(event["step"]), dict(event["metrics"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: malformed event line skipped (%r): %.200s", self.label, exc, line)
            return True
        self._guarded(forward, kind)
        return True

    def _guarded(self, forward: Callable[[], None], what: str) -> None:
        # Any failure of the Prefect API (unreachable, an error status, a timeout) must not reach the launcher.
        try:
            forward()
        except Exception as exc:
            log.warning("%s: could not forward %s to Prefect (%s); training goes on", self.label, what, exc)

    def progress(self, percent: float) -> None:
        stage_progress(self.label, percent)
        now = time.monotonic()
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(
                percent,
                key=artifact_key(self.label, "progress"),
                description=f"{self.label}: percent of training steps done",
            )
        elif percent >= 100 or now - self.progress_updated >= PROGRESS_INTERVAL_S:
            update_progress_artifact(self.progress_id, percent)
        else:
            return
        self.progress_updated = now

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})
        emit_event(
            event="rlhf.metrics",
            resource={"prefect.resource.id": f"rlhf.stage.{self.label}", "prefect.resource.name": self.label},
            payload={"step": step, **metrics},
        )

    def finish(self) -> None:
        self._guarded(self._publish_table, "the metrics table")

    def _publish_table(self) -> None:
        if self.rows:
            columns = sorted({key for row in self.rows for key in row} - {"step"})
            table = [{"step": row["step"], **{c: row.get(c) for c in columns}} for row in self.rows]
            create_table_artifact(
                table,
                key=artifact_key(self.label, "metrics"),
                description=f"{self.label}: metrics at each logging step",
            )


IMAGE_LINK = re.compile(rf"!\[([^\]]*)\]\(({PLOTS_DIR}/[\w.-]+\.png)\)")


def artifact_key(label: str, what: str) -> str:
    """A Prefect artifact key for a step's `what` (keys take lowercase letters, digits and dashes only):
    `rl-progress`, `rl-rejection-sampling-progress` for that method's branch of a run of several."""
    return re.sub(r"[^a-z0-9]+", "-", f"{label}-{what}".lower())


def publish_markdown(markdown: str, key: str, description: str) -> None:
    create_markdown_artifact(markdown, key=key, description=description)


def publish_stage_pictures(store: ArtifactStore, stage: str, label: str, prefix: str, manifest: Manifest) -> None:
    """A finished stage's curves (and an evaluation's report) in the UI. A picture that cannot be read is
    logged and left out: a damaged figure (outside the digest) would otherwise fail the stage, on every run."""
    try:
        publish_curves(store, label, prefix, manifest)
        if stage == "evaluate":
            publish_report(store, prefix, label)
    except DamagedArtifact as exc:
        log.warning("%s: not shown in the UI: %s", label, exc)


def publish_report(store: ArtifactStore, prefix: str, label: str = "evaluate") -> None:
    """The evaluation's report.md (headline numbers, score distributions, side-by-side answers) as the run's
    Markdown artifact, its pictures inlined: the UI cannot reach the store. One per method's branch, where
    there are several (`evaluation-report-ppo`)."""
    report = read_verified(store, prefix, "report.md").decode()
    inlined = IMAGE_LINK.sub(lambda link: image_markdown(store, prefix, link[2], link[1]), report)
    key = artifact_key(label.replace("evaluate", "evaluation", 1), "report")  # evaluation-report, evaluation-ppo-report
    publish_markdown(inlined, key, f"RLHF evaluation ({label})")


def publish_curves(store: ArtifactStore, label: str, prefix: str, manifest: Manifest) -> None:
    """A training stage's metric curves as a Markdown artifact, where the stage drew them."""
    if any(entry.path == CURVES_FILE for entry in manifest.files):
        picture = image_markdown(store, prefix, CURVES_FILE, f"{label} training metrics")
        publish_markdown(picture, artifact_key(label, "curves"), f"{label}: metrics against the step")


def png_data_uri(picture: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(picture).decode()}"


def image_markdown(store: ArtifactStore, prefix: str, path: str, caption: str) -> str:
    return f"![{caption}]({png_data_uri(read_verified(store, prefix, path))})"
