"""The pipeline as a Prefect flow: one task per stage, each launching the stage's own process.

Caching lives in the artifact store, keyed by each stage's inputs, config and code, so it holds across runs,
machines and Prefect servers: a stage whose artifact exists is `cached` without starting anything. A crashed
stage process is retried with backoff and resumes from its last checkpoint; a stage that rejects its input is
not retried. A stage whose input artifact turns out damaged in the store (set aside by the stage) is not
retried either: the run goes back to the stage that produces it, computes it again, and carries on.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Completed, Failed, State

from rlhf_pipeline.flows.launchers.deployment import DeploymentLauncher
from rlhf_pipeline.flows.launchers.launcher import Launcher, StageInputDamaged, StageInputError, published
from rlhf_pipeline.flows.launchers.process import ProcessLauncher
from rlhf_pipeline.flows.monitoring.heartbeats import RunHeartbeat, mark_dead_runs
from rlhf_pipeline.flows.monitoring.run_view import stage_finished, stage_started
from rlhf_pipeline.flows.monitoring.stage_monitor import png_data_uri, publish_markdown, publish_stage_pictures
from rlhf_pipeline.stages.core.artifacts import read_manifest, read_verified
from rlhf_pipeline.stages.core.comparison import (
    FRONTIER_FILE,
    compare_methods,
    comparison_markdown,
    save_comparison_frontier,
)
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import dump_config, read_config, with_data_digests
from rlhf_pipeline.stages.core.errors import InputError, MissingInput
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.registry import STAGE_NAMES, STAGES
from rlhf_pipeline.stages.core.store import ArtifactStore

LAUNCHERS: dict[str, type[Launcher]] = {"process": ProcessLauncher, "deployment": DeploymentLauncher}


def _retry_unless_input_error(task, task_run, state) -> bool:
    try:
        state.result()
    except (StageInputError, StageInputDamaged):
        return False
    except Exception:
        return True
    return True


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_unless_input_error)
def run_stage(stage: str, config_uri: str, launcher: str, label: str) -> dict[str, Any]:
    logger = get_run_logger()
    store, config = _load(config_uri)
    try:
        plan = plan_stage(store, config, stage)
    except MissingInput as exc:  # set aside by an earlier attempt of this stage
        raise StageInputDamaged(str(exc)) from None
    manifest = read_manifest(store, plan.prefix)
    status = "cached"
    if manifest is None:
        LAUNCHERS[launcher]().launch(stage, config_uri, logger, label)
        manifest = published(store, stage, plan.prefix)
        status = "ran"
    logger.info("%s %s: %s", label, status, store.uri_of(plan.prefix))
    publish_stage_pictures(store, stage, label, plan.prefix, manifest)
    return {
        "status": status,
        "artifact": store.uri_of(plan.prefix),
        "prefix": plan.prefix,  # the artifact's key in the store
        "attempts": task_run.run_count,
        "resumed_from": manifest.resumed_from if status == "ran" else None,
        "metrics": manifest.metrics,
    }


@flow(name="rlhf-pipeline", flow_run_name="{run_id}")
def rlhf_pipeline(config_uri: str, run_id: str, launcher: str = "process"):
    store, config = _load(config_uri)
    config_hash = hashlib.sha256(dump_config(config).encode()).hexdigest()[:12]
    resumes = next((dead["run_id"] for dead in mark_dead_runs(store) if dead["config_hash"] == config_hash), None)
    if resumes is not None:
        get_run_logger().info(
            "resuming run %s, which crashed: its finished stages are cached, the one it stopped in resumes from its "
            "checkpoint",
            resumes,
        )
    with RunHeartbeat(store, run_id, flow_run.id, config_hash) as heartbeat:
        summary = run_stages(store, config, config_uri, launcher, config_hash, heartbeat, run_id)
        summary = {"run_id": run_id, **summary, "resumes": resumes, "finished_at": datetime.now(UTC).isoformat()}
        store.write_json(f"runs/{run_id}/run.json", summary)
    if summary["status"] == "failed":
        return Failed(message=failure_of(summary), data=summary)
    return Completed(data=summary)


def failure_of(summary: dict[str, Any]) -> str:
    """A failed run's reason: its first failed stage and that stage's own words."""
    failed = next(name for name, stage in summary["stages"].items() if stage["status"] == "failed")
    return f"stage {failed} failed: {summary['stages'][failed]['error']}"


@dataclass(frozen=True)
class Step:
    """One stage as the run runs it. A run of several methods runs rl and evaluate once per method (`method`),
    each from its own config (`rl.algorithm: <method>`); the label names the step in the summary, the UI and
    the terminal."""

    label: str
    stage: str
    method: str | None  # None: a stage every method shares


def run_layout(config: PipelineConfig) -> list[Step]:
    """Every step of the run, in the run's order: each stage, or for several methods the shared stages and
    then each method's branch."""
    if len(config.rl.methods) == 1:
        return [Step(name, name, None) for name in STAGE_NAMES]
    shared = [Step(name, name, None) for name, stage in STAGES.items() if not stage.per_method]
    return shared + [
        Step(f"{name}:{method}", name, method)
        for method in config.rl.methods
        for name, stage in STAGES.items()
        if stage.per_method
    ]


def step_labels(config: PipelineConfig) -> list[str]:
    """What the terminal shows a row for."""
    return [step.label for step in run_layout(config)]


@dataclass(frozen=True)
class StepConfig:
    """The config a step runs from, and where its stage process reads it."""

    uri: str
    config: PipelineConfig


def step_configs(
    store: ArtifactStore, config: PipelineConfig, config_uri: str, run_id: str
) -> dict[str | None, StepConfig]:
    """The run's config for the shared stages (None) and, when there are several methods, each method's,
    written beside the run's."""
    configs: dict[str | None, StepConfig] = {None: StepConfig(config_uri, config)}
    if len(config.rl.methods) > 1:
        for method in config.rl.methods:
            key = f"runs/{run_id}/config.{method}.yaml"
            method_config = config.for_method(method)
            store.write_bytes(key, dump_config(method_config).encode())
            configs[method] = StepConfig(store.uri_of(key), method_config)
    return configs


class RunRecord:
    """The results of a run's steps as they finish, from the branches' threads too; each change goes into the
    heartbeat, which carries the stages done so far."""

    def __init__(self, heartbeat: RunHeartbeat, recompute_budget: int) -> None:
        self.heartbeat = heartbeat
        self.stages: dict[str, Any] = {}
        self.recomputed: list[dict[str, str]] = []
        self.recompute_budget = recompute_budget
        self.lock = threading.Lock()

    def finished(self, label: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.stages[label] = result
            self.heartbeat.update(self.stages)

    def may_recompute(self, stage: str, because: str) -> bool:
        with self.lock:
            if len(self.recomputed) >= self.recompute_budget:
                return False
            self.recomputed.append({"stage": stage, "because": because})
            return True

    @property
    def failed(self) -> bool:
        return any(result["status"] == "failed" for result in self.stages.values())


def run_steps(
    store: ArtifactStore,
    steps: list[Step],
    configs: dict[str | None, StepConfig],
    launcher: str,
    tags: list[str],
    record: RunRecord,
) -> str | None:
    """Each step in order, as a task; a step whose input turned out damaged sends the run back to the step that
    produces it. Returns the stage to compute again where that is not among these steps (a branch's shared input)."""
    index = 0
    while index < len(steps):
        step = steps[index]
        run = configs[step.method]
        started, started_at = time.monotonic(), datetime.now(UTC).isoformat()
        task = run_stage.with_options(
            name=step.stage,
            task_run_name=step.label,
            tags=tags,
            retries=run.config.run.retries,
            retry_delay_seconds=[run.config.run.retry_delay_seconds * 2**i for i in range(run.config.run.retries)],
        )
        stage_started(step.label)
        state = task(step.stage, run.uri, launcher, step.label, return_state=True)
        timing = {"seconds": round(time.monotonic() - started, 2), "started_at": started_at}
        if state.is_completed():
            record.finished(step.label, state.result() | timing)
            stage_finished(step.label, record.stages[step.label]["status"])
            index += 1
            continue
        redo = _damaged_upstream(store, run.config, step.stage, state)
        if redo is not None and record.may_recompute(redo, _error_of(state)):
            get_run_logger().warning("%s: %s; computing %s again", step.label, _error_of(state), redo)
            stages = [s.stage for s in steps]
            if redo not in stages:
                return redo
            index = stages.index(redo)
            continue
        stage_finished(step.label, "failed")
        failure: dict[str, Any] = {
            "status": "failed",
            "artifact": None,
            "prefix": None,
            "attempts": None,
            "resumed_from": None,
            "metrics": {},
        }
        record.finished(step.label, failure | timing | {"error": _error_of(state)})
        break
    return None


def run_stages(
    store: ArtifactStore,
    config: PipelineConfig,
    config_uri: str,
    launcher: str,
    config_hash: str,
    heartbeat: RunHeartbeat,
    run_id: str,
) -> dict[str, Any]:
    """The shared stages in order, then each method's branch (rl, evaluate) side by side, each in its own thread
    of task runs, and the methods' comparison. A branch whose shared input turned out damaged sends the run
    back to the shared stage that produces it; the branches then run again (what they finished is cached)."""
    tags = [f"config:{config_hash}", f"model:{config.model.base}"]
    layout = run_layout(config)
    configs = step_configs(store, config, config_uri, run_id)
    shared = [step for step in layout if step.method is None]
    branches = {m: [step for step in layout if step.method == m] for m in configs if m is not None}
    record = RunRecord(heartbeat, recompute_budget=len(STAGE_NAMES))
    start = 0
    while True:
        run_steps(store, shared[start:], configs, launcher, tags, record)
        if record.failed or not branches:
            break
        with ThreadPoolExecutor(max_workers=len(branches), thread_name_prefix="rlhf-method") as pool:
            # Each thread runs in a copy of this flow run's context, as Prefect's own task runner does.
            futures = [
                pool.submit(copy_context().run, run_steps, store, steps, configs, launcher, tags, record)
                for steps in branches.values()
            ]
            redos = [future.result() for future in futures]
        redo = next((stage for stage in redos if stage is not None), None)
        if record.failed or redo is None:
            break
        start = [step.stage for step in shared].index(redo)
    status = "failed" if record.failed else "completed"
    stages = {step.label: record.stages[step.label] for step in layout if step.label in record.stages}
    summary = {"status": status, "store": store.uri, "stages": stages, "recomputed": record.recomputed}
    if branches and status == "completed":
        evaluations = {m: stages[steps[-1].label]["prefix"] for m, steps in branches.items()}
        summary["comparison"] = publish_comparison(store, run_id, evaluations)
    return summary


def publish_comparison(store: ArtifactStore, run_id: str, evaluations: dict[str, str]) -> dict[str, Any]:
    """The methods side by side, from each one's evaluation report (`evaluations`: its artifact's key):
    comparison.json, comparison.md and the frontier plot beside the run's summary in the store, and a Markdown
    artifact in the Prefect UI."""
    reports = {
        method: json.loads(read_verified(store, prefix, "report.json")) for method, prefix in evaluations.items()
    }
    comparison = compare_methods(reports)
    with tempfile.TemporaryDirectory() as scratch:
        frontier = Path(scratch) / FRONTIER_FILE
        save_comparison_frontier(comparison, frontier)
        picture = frontier.read_bytes()
    store.write_bytes(f"runs/{run_id}/{FRONTIER_FILE}", picture)
    store.write_json(f"runs/{run_id}/comparison.json", comparison)
    store.write_bytes(f"runs/{run_id}/comparison.md", comparison_markdown(comparison).encode())
    publish_markdown(
        comparison_markdown(comparison, png_data_uri(picture)), "method-comparison", "alignment methods compared"
    )
    return comparison


def run_pipeline(config: PipelineConfig, launcher: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline for a validated config and return the run summary. The launcher defaults to
    `deploy.launcher`: stage processes here, or flow runs of the stage deployments."""
    launcher = launcher or config.deploy.launcher
    store = config.run.open_store()
    _warm_up(store, config, launcher)  # now, so that its imports overlap Prefect's start
    run_id = f"{config.run.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    config_key = f"runs/{run_id}/config.yaml"
    store.write_bytes(config_key, dump_config(with_data_digests(config)).encode())
    state = cast(State, rlhf_pipeline(store.uri_of(config_key), run_id, launcher, return_state=True))  # not async
    summary = store.read_json_if_present(f"runs/{run_id}/run.json")
    if summary is None:  # the flow itself raised, before the summary: its own error, not "run.json not found"
        state.result()
        raise RuntimeError(f"run {run_id}: the pipeline flow ended {state.name} without a summary: {state.message}")
    return summary


def _warm_up(store: ArtifactStore, config: PipelineConfig, launcher: str) -> None:
    """Start the warm interpreter that local stage processes are forked from, unless no stage will run."""
    if launcher != "process":
        return
    try:
        cached = all(
            read_manifest(store, plan_stage(store, config.for_method(method), STAGE_NAMES[-1]).prefix) is not None
            for method in config.rl.methods
        )
    except InputError:
        cached = False
    if not cached:
        ProcessLauncher.warm_up(config)


def _damaged_upstream(store: ArtifactStore, config: PipelineConfig, stage: str, state) -> str | None:
    """Where the stage failed on a damaged input (now set aside), the first stage whose artifact is missing."""
    if not isinstance(state.result(raise_on_failure=False), StageInputDamaged):
        return None
    for upstream in STAGE_NAMES[: STAGE_NAMES.index(stage)]:
        try:
            if read_manifest(store, plan_stage(store, config, upstream).prefix) is None:
                return upstream
        except MissingInput:
            return upstream
    return None


def _error_of(state) -> str:
    """The stage's own words (its exception's message: the process's last line of output), without Prefect's
    wrapping or a traceback."""
    error = state.result(raise_on_failure=False)
    return str(error) if isinstance(error, BaseException) else state.message or state.name


def _load(config_uri: str) -> tuple[ArtifactStore, PipelineConfig]:
    config = read_config(config_uri)
    return config.run.open_store(), config
