"""The demo pipeline with every stage in its own container: stage images built from docker/Dockerfile on a CPU
base, a Docker work pool with a real Prefect Docker worker, the store on moto's S3 server on the host."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, WorkPoolFilter

from rlhf_pipeline.flows.deployments import deploy
from rlhf_pipeline.flows.launchers.launcher import STAGE_FLOW
from rlhf_pipeline.flows.pipeline import run_pipeline
from rlhf_pipeline.stages.core.config_loading import load_config
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from rlhf_pipeline.stages.core.store import ArtifactStore
from tests.conftest import TINY, stop
from tests.containers.conftest import IMAGE_TAG, docker

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

SHORT = ["sft.max_steps=20", "reward.max_steps=20", "rl.ppo.steps=3", "evaluate.prompts=16"]


@pytest.fixture
def docker_pool(prefect_api, docker_host, tmp_path):
    """A Docker work pool's worker on the host, polling every second; stopped by its PID."""
    pool = f"docker-{uuid.uuid4().hex[:8]}"
    env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_API_URL": prefect_api}
    command = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "docker"]
    log_path = tmp_path / "worker.log"
    workers = []

    def start() -> None:
        workers.append(subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env))

    yield pool, start, log_path
    for worker in workers:
        stop(worker)


def test_demo_pipeline_runs_every_stage_in_its_own_container(stage_images, docker_pool, s3_bucket):
    pool, start_worker, worker_log = docker_pool
    config = load_config(
        None,
        [
            *TINY,
            *SHORT,
            f"run.store=s3://{s3_bucket}/store",
            "deploy.launcher=deployment",
            f"deploy.work_pool={pool}",
            f"deploy.image_tag={IMAGE_TAG}",
        ],
    )
    deploy(config, "docker")
    start_worker()
    summary = run_pipeline(config)
    assert summary["status"] == "completed", (summary, worker_log.read_text()[-3000:])

    store = ArtifactStore.from_uri(config.run.store)
    for stage in STAGE_NAMES:
        artifact = summary["stages"][stage]["artifact"]
        assert store.exists(f"{artifact.removeprefix(store.uri + '/')}/manifest.json")
    assert summary["stages"]["reward"]["metrics"]["eval_accuracy"] > 0.5

    containers = {}
    with get_client(sync_client=True) as client:
        for stage in STAGE_NAMES:
            deployment = client.read_deployment_by_name(f"{STAGE_FLOW}/{stage}")
            (run,) = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
                work_pool_filter=WorkPoolFilter(name={"any_": [pool]}),
            )
            assert run.state.is_completed()
            containers[stage] = run.infrastructure_pid.rsplit(":", 1)[-1]
    assert len(set(containers.values())) == len(STAGE_NAMES)
    for stage, container in containers.items():
        image = docker("inspect", "--format", "{{.Config.Image}}", container).stdout.strip()
        assert image == stage_images[stage]
