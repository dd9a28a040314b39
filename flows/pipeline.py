"""The pipeline as a Prefect flow: one task per stage, each launching the stage's own process.

Caching lives in the artifact store, keyed by each stage's inputs, config and code, so it holds across runs,
machines and Prefect servers: a stage whose artifact exists is `cached` without starting anything. A crashed
stage process is retried with backoff and resumes from its last checkpoint; a stage that rejects its input is
not retried. A stage whose input artifact turns out damaged in the store (set aside by the stage) is not
retried either: the run goes back to the stage that produces it, computes it again, and carries on.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Completed, Failed

from rlhf_pipeline.flows.launchers.deployment import DeploymentLauncher
from rlhf_pipeline.flows.launchers.launcher import Launcher, StageInputDamaged, StageInputError, published
from rlhf_pipeline.flows.launchers.process import ProcessLauncher
from rlhf_pipeline.flows.monitoring.heartbeats import RunHeartbeat, mark_dead_runs
from rlhf_pipeline.flows.monitoring.run_view import stage_finished, stage_started
from rlhf_pipeline.flows.monitoring.stage_monitor import publish_curves, publish_report
from rlhf_pipeline.stages.core.artifacts import read_manifest
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import dump_config, read_config
from rlhf_pipeline.stages.core.errors import InputError, MissingInput
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
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
def run_stage(stage: str, config_uri: str, launcher: str) -> dict[str, Any]:
    logger = get_run_logger()
    store, config = _load(config_uri)
    try:
        plan = plan_stage(store, config, stage)
    except MissingInput as exc:  # set aside by an earlier attempt of this stage
        raise StageInputDamaged(str(exc)) from None
    manifest = read_manifest(store, plan.prefix)
    status = "cached"
    if manifest is None:
        LAUNCHERS[launcher]().launch(stage, config_uri, logger)
        manifest = published(store, stage, plan.prefix)
        status = "ran"
    logger.info("%s %s: %s", stage, status, store.uri_of(plan.prefix))
    publish_curves(store, stage, plan.prefix, manifest)
    if stage == "evaluate":
        publish_report(store, plan.prefix)
    return {
        "status": status,
        "artifact": store.uri_of(plan.prefix),
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
        summary = run_stages(store, config, config_uri, launcher, config_hash, heartbeat)
        summary = {"run_id": run_id, **summary, "resumes": resumes, "finished_at": datetime.now(UTC).isoformat()}
        store.write_json(f"runs/{run_id}/run.json", summary)
    if summary["status"] == "failed":
        failed = next(name for name, s in summary["stages"].items() if s["status"] == "failed")
        return Failed(message=f"stage {failed} failed: {summary['stages'][failed]['error']}", data=summary)
    return Completed(data=summary)


def run_stages(
    store: ArtifactStore,
    config: PipelineConfig,
    config_uri: str,
    launcher: str,
    config_hash: str,
    heartbeat: RunHeartbeat,
) -> dict[str, Any]:
    """Each stage in order, as a task; a stage whose input turned out damaged sends the run back to the
    stage that produces it. The heartbeat carries the stages done so far."""
    tags = [f"config:{config_hash}", f"model:{config.model.base}"]
    stages: dict[str, Any] = {}
    recomputed: list[dict[str, str]] = []
    index = 0
    while index < len(STAGE_NAMES):
        stage = STAGE_NAMES[index]
        started = time.monotonic()
        task = run_stage.with_options(
            name=stage,
            task_run_name=stage,
            tags=tags,
            retries=config.run.retries,
            retry_delay_seconds=[config.run.retry_delay_seconds * 2**i for i in range(config.run.retries)],
        )
        stage_started(stage)
        state = task(stage, config_uri, launcher, return_state=True)
        seconds = round(time.monotonic() - started, 2)
        if state.is_completed():
            stages[stage] = state.result() | {"seconds": seconds}
            stage_finished(stage, stages[stage]["status"])
            heartbeat.update(stages)
            index += 1
            continue
        redo = _damaged_upstream(store, config, stage, state)
        if redo is not None and len(recomputed) < len(STAGE_NAMES):
            get_run_logger().warning("%s: %s; computing %s again", stage, _error_of(state), redo)
            recomputed.append({"stage": redo, "because": _error_of(state)})
            index = STAGE_NAMES.index(redo)
            continue
        stage_finished(stage, "failed")
        stages[stage] = {
            "status": "failed",
            "artifact": None,
            "seconds": seconds,
            "attempts": None,
            "resumed_from": None,
            "metrics": {},
            "error": _error_of(state),
        }
        break
    status = "completed" if all(s["status"] != "failed" for s in stages.values()) else "failed"
    return {"status": status, "store": store.uri, "stages": stages, "recomputed": recomputed}


def run_pipeline(config: PipelineConfig, launcher: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline for a validated config and return the run summary. The launcher defaults to
    `deploy.launcher`: stage processes here, or flow runs of the stage deployments."""
    launcher = launcher or config.deploy.launcher
    store = config.run.open_store()
    _warm_up(store, config, launcher)  # now, so that its imports overlap Prefect's start
    run_id = f"{config.run.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    config_key = f"runs/{run_id}/config.yaml"
    store.write_bytes(config_key, dump_config(config).encode())
    rlhf_pipeline(store.uri_of(config_key), run_id, launcher, return_state=True)
    return store.read_json(f"runs/{run_id}/run.json")


def _warm_up(store: ArtifactStore, config: PipelineConfig, launcher: str) -> None:
    """Start the warm interpreter that local stage processes are forked from, unless no stage will run."""
    if launcher != "process":
        return
    try:
        cached = read_manifest(store, plan_stage(store, config, STAGE_NAMES[-1]).prefix) is not None
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
