"""Stages as flow runs of their Prefect deployments, on whatever work pool the config names."""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Cancelled

from rlhf_pipeline.flows.launchers.launcher import (
    DAMAGED_INPUT_STATE,
    INPUT_ERROR_STATE,
    STAGE_FLOW,
    StageCrashed,
    StageInputDamaged,
    StageInputError,
)
from rlhf_pipeline.stages.core.config import DeployConfig
from rlhf_pipeline.stages.core.config_loading import read_config


class DeploymentLauncher:
    """Each stage as a flow run of its deployment `rlhf-stage/<stage>`, started with `run_deployment` and awaited.

    The child's final state decides: completed is success, a Failed state named InputError is not retried,
    anything else (failed, crashed, cancelled: a container that died) raises StageCrashed for the pipeline task
    to retry with backoff. A flow run that no worker starts within `deploy.start_timeout_seconds` is cancelled
    and is a crash too, with a message naming the work pool that has no worker.
    """

    def launch(
        self, stage: str, config_uri: str, logger: logging.Logger | logging.LoggerAdapter, label: str | None = None
    ) -> None:
        deploy = read_config(config_uri).deploy
        with get_client(sync_client=True) as client:
            pool_type = client.read_work_pool(deploy.work_pool).type
        variables = job_variables(pool_type, stage, deploy, config_uri)
        logger.info("running deployment %s/%s on %s pool %r", STAGE_FLOW, stage, pool_type, deploy.work_pool)
        flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # synchronous here: a FlowRun
            f"{STAGE_FLOW}/{stage}",
            parameters={"stage": stage, "config_uri": config_uri, "label": label or stage},
            job_variables=variables,
            timeout=0,  # returns once the flow run exists: waiting for it is below, with a start deadline
        )
        state = await_flow_run(flow_run, stage, deploy.work_pool, deploy.start_timeout_seconds)
        if state is not None and state.is_completed():
            logger.info("stage flow run %s completed: %s", flow_run.name, state.message)
            return
        if state is not None and state.name == INPUT_ERROR_STATE:
            raise StageInputError(state.message or f"{stage}: bad input")
        if state is not None and state.name == DAMAGED_INPUT_STATE:
            raise StageInputDamaged(state.message or f"{stage}: a damaged input")
        how = f"{state.type.value.lower()}: {state.message}" if state else "ended without a state"
        raise StageCrashed(f"stage {stage} flow run {flow_run.name} {how}")


def await_flow_run(flow_run, stage: str, pool: str, start_timeout: float, poll: float = 1.0):
    """The flow run's final state; a run still waiting for a worker after `start_timeout` s is cancelled."""
    state, started = flow_run.state, time.monotonic()
    with get_client(sync_client=True) as client:
        while state is None or not state.is_final():
            if (state is None or state.is_scheduled()) and time.monotonic() - started > start_timeout:
                client.set_flow_run_state(flow_run.id, Cancelled(message="no worker started it"), force=True)
                raise StageCrashed(
                    f"stage {stage}: no worker of work pool {pool!r} started its flow run {flow_run.name} within "
                    f"{start_timeout:g} s (start one: prefect worker start --pool {pool})"
                )
            time.sleep(poll)
            state = client.read_flow_run(flow_run.id).state
    return state


def job_variables(pool_type: str, stage: str, deploy: DeployConfig, config_uri: str) -> dict[str, Any]:
    """The stage's image and resources in the shape each work pool type's job template takes. A stage on several
    nodes is a Kubernetes indexed Job of as many pods, whose pods after the first run their node's processes of
    the stage's config (`docker/entrypoint.sh`); a Docker pool starts one container per stage."""
    resources = deploy.resources(stage)
    if resources.nodes > 1 and pool_type != "kubernetes":
        raise StageInputError(
            f"deploy.stages.{stage}.nodes: {resources.nodes} nodes need a kubernetes work pool (this one is "
            f"{pool_type}); elsewhere start the nodes after the first with `rlhf node` and deploy.launcher: process"
        )
    if pool_type == "docker":
        create: dict[str, Any] = {}
        if resources.gpus:
            create["device_requests"] = [{"count": resources.gpus, "capabilities": [["gpu"]]}]
        if resources.shm_size:
            create["shm_size"] = resources.shm_size
        if resources.cpus:
            create["nano_cpus"] = round(resources.cpus * 1e9)  # `docker run --cpus`: a cgroup quota
        return {"image": deploy.image(stage), "container_create_kwargs": create}
    if pool_type == "kubernetes":
        # Left out when not configured, so that the pool's defaults (its GPU-taint toleration) apply.
        placement = {"node_selector": resources.node_selector, "tolerations": resources.tolerations}
        sizes = {"image": deploy.image(stage), "gpus": resources.gpus, "work_storage": resources.work_storage}
        if resources.cpus:
            sizes |= {"cpu_request": f"{resources.cpus:g}", "cpu_limit": f"{resources.cpus:g}"}
        if resources.nodes > 1:
            sizes |= {"nodes": resources.nodes, "env": {"RLHF_NODE_CONFIG": config_uri}}
        return sizes | {k: v for k, v in placement.items() if v}
    return {}
