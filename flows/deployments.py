"""Prefect deployments: `rlhf-stage/<stage>` for each stage and `rlhf-scheduled/<run.name>` for the whole
pipeline (with the config's cron schedule), on a work pool of type process, docker or kubernetes.

Stage deployments load their flow by module path (`rlhf_pipeline.flows.stage_flow.rlhf_stage`), so a process
pool runs them from this installation and a Docker or Kubernetes pool from the stage's image, where the package
is installed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.states import Failed, State
from prefect.workers.base import BaseWorker

from rlhf_pipeline.flows.launchers.launcher import STAGE_FLOW
from rlhf_pipeline.flows.pipeline import failure_of, run_pipeline
from rlhf_pipeline.flows.stage_flow import rlhf_stage
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import dump_config, read_config
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.registry import STAGE_NAMES

# infra/ beside flows/: the repository's folder, or in an installed wheel the package data rlhf_pipeline/infra.
INFRA = Path(__file__).resolve().parents[1] / "infra"
log = logging.getLogger("rlhf.deploy")
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
S3_SECRETS = {"AWS_ACCESS_KEY_ID": "rlhf-s3-access-key-id", "AWS_SECRET_ACCESS_KEY": "rlhf-s3-secret-access-key"}


@flow(name="rlhf-scheduled")
def scheduled_pipeline(config_uri: str) -> dict[str, Any] | State:
    """The pipeline deployment's flow: a fresh run of the stored config, each stage on its own deployment. A run
    that did not complete ends Failed (its summary as the state's data), so that Prefect's notifications and
    automations see it (the summary returned as a value ended it Completed)."""
    summary = run_pipeline(read_config(config_uri), launcher="deployment")
    if summary["status"] == "failed":
        return Failed(message=f"run {summary['run_id']}: {failure_of(summary)}", data=summary)
    return summary


def deploy(config: PipelineConfig, pool_type: str) -> list[str]:
    """Create the work pool if missing, then register (or update) every deployment; returns their names."""
    if config.deploy.schedule is not None:
        check_schedule(config.deploy.schedule)
    store = config.run.open_store()
    store.check_access()
    pool = config.deploy.work_pool
    ensure_work_pool(pool, pool_type)
    image_pool = pool_type != "process"
    # A process worker runs each flow run in a new temporary directory: relative paths in the config (a local
    # store, data files) mean what they meant where `rlhf deploy` ran.
    job_variables = None if image_pool else {"working_dir": str(Path.cwd())}
    names = []
    for stage in STAGE_NAMES:
        rlhf_stage.deploy(
            name=stage,
            work_pool_name=pool,
            image=config.deploy.image(stage) if image_pool else None,
            build=False,
            push=False,
            parameters={"stage": stage},
            job_variables=job_variables,
            entrypoint_type=EntrypointType.MODULE_PATH,
            print_next_steps=False,
        )
        names.append(f"{STAGE_FLOW}/{stage}")
    config_key = f"deployments/{config.run.name}/config.yaml"
    store.write_bytes(config_key, dump_config(config).encode())
    scheduled_pipeline.deploy(
        name=config.run.name,
        work_pool_name=pool,
        image=f"{config.deploy.image_prefix}orchestrator:{config.deploy.image_tag}" if image_pool else None,
        build=False,
        push=False,
        parameters={"config_uri": store.uri_of(config_key)},
        cron=config.deploy.schedule,
        job_variables=job_variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
        print_next_steps=False,
    )
    names.append(f"rlhf-scheduled/{config.run.name}")
    return names


def check_schedule(cron: str) -> None:
    """A `deploy.schedule` Prefect would refuse is an input error, not a traceback from inside Prefect."""
    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise InputError(f"deploy.schedule: {cron!r} is not a cron expression (five fields: 0 2 * * 1)") from None


def ensure_work_pool(name: str, pool_type: str) -> None:
    """The pool with this project's job template. A pool of another type is refused. A worker started before
    the first `rlhf deploy` (compose's, Kubernetes') created the pool with its type's default template, which
    lacks the store's credentials, GPUs and nodes: that one gets the project's; a template someone edited is
    left as it is."""
    template = base_job_template(pool_type)
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            return
        if pool.type != pool_type:
            raise InputError(
                f"deploy.work_pool: {name!r} is a {pool.type} work pool, not {pool_type} (rlhf deploy --pool-type)"
            )
        if pool.base_job_template in ({}, default_job_template(pool_type)):  # {}: the worker fills in the default
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        elif pool.base_job_template != template:
            log.warning("work pool %r keeps its own job template (not this project's, nor its type's default)", name)


def base_job_template(pool_type: str) -> dict[str, Any]:
    """The pool type's template; Kubernetes gets this project's (GPU limits, node selector, tolerations,
    S3 credentials from a Kubernetes Secret), Docker gets S3 credentials from Prefect Secret blocks and the
    host's network."""
    if pool_type == "kubernetes":
        return json.loads((INFRA / "kubernetes" / "base-job-template.json").read_text())
    template = default_job_template(pool_type)
    if pool_type == "docker":
        variables = template["variables"]["properties"]
        variables["env"]["default"] = s3_environment()
        # Stage containers reach the store and the Prefect API where the worker does (infra/compose.yaml).
        variables["network_mode"]["default"] = "host"
    return template


def default_job_template(pool_type: str) -> dict[str, Any]:
    """The template a worker of the type creates its pool with."""
    worker = BaseWorker.get_worker_class_from_type(pool_type)
    assert worker is not None, pool_type  # the flows extra installs the worker of every type `--pool-type` offers
    return worker.get_default_base_job_template()


def s3_environment() -> dict[str, str]:
    """The store's settings for stage containers: endpoint and region as values, the keys as references to
    Prefect Secret blocks (saved here from this environment), which the worker resolves when it starts a job."""
    from prefect.blocks.system import Secret

    env = {name: os.environ[name] for name in S3_SETTINGS if name in os.environ}
    for variable, block in S3_SECRETS.items():
        if variable in os.environ:
            Secret(value=os.environ[variable]).save(block, overwrite=True)
            env[variable] = f"{{{{ prefect.blocks.secret.{block} }}}}"
    return env
