"""Prefect deployments: `rlhf-stage/<stage>` for each stage and `rlhf-scheduled/<run.name>` for the whole
pipeline (with the config's cron schedule), on a work pool of type process, docker or kubernetes.

Stage deployments load their flow by module path (`rlhf_pipeline.flows.stage_flow.rlhf_stage`), so a process
pool runs them from this installation and a Docker or Kubernetes pool from the stage's image, where the package
is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound

from rlhf_pipeline.flows.launchers.launcher import STAGE_FLOW
from rlhf_pipeline.flows.pipeline import run_pipeline
from rlhf_pipeline.flows.stage_flow import rlhf_stage
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import dump_config, read_config
from rlhf_pipeline.stages.core.registry import STAGE_NAMES

# infra/ beside flows/: the repository's folder, or in an installed wheel the package data rlhf_pipeline/infra.
INFRA = Path(__file__).resolve().parents[1] / "infra"
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
S3_SECRETS = {"AWS_ACCESS_KEY_ID": "rlhf-s3-access-key-id", "AWS_SECRET_ACCESS_KEY": "rlhf-s3-secret-access-key"}


@flow(name="rlhf-scheduled")
def scheduled_pipeline(config_uri: str) -> dict[str, Any]:
    """The pipeline deployment's flow: a fresh run of the stored config, each stage on its own deployment."""
    config = read_config(config_uri)
    return run_pipeline(config, launcher="deployment")


def deploy(config: PipelineConfig, pool_type: str) -> list[str]:
    """Create the work pool if missing, then register (or update) every deployment; returns their names."""
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
    store = config.run.open_store()
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


def ensure_work_pool(name: str, pool_type: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        template = base_job_template(pool_type)
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))


def base_job_template(pool_type: str) -> dict[str, Any]:
    """The pool type's template; Kubernetes gets this project's (GPU limits, node selector, tolerations,
    S3 credentials from a Kubernetes Secret), Docker gets S3 credentials from Prefect Secret blocks and the
    host's network."""
    if pool_type == "kubernetes":
        return json.loads((INFRA / "kubernetes" / "base-job-template.json").read_text())
    if pool_type == "docker":
        from prefect_docker.worker import DockerWorker

        template = DockerWorker.get_default_base_job_template()
        variables = template["variables"]["properties"]
        variables["env"]["default"] = s3_environment()
        # Stage containers reach the store and the Prefect API where the worker does (infra/compose.yaml).
        variables["network_mode"]["default"] = "host"
        return template
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


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
