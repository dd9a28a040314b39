"""The demo pipeline as a scheduled deployment, its orchestrator and every stage in their own containers: images
built from docker/Dockerfile on a CPU base, a Docker work pool with a real Prefect Docker worker, the store on
moto's S3 server on the host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, WorkPoolFilter
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from rlhf_pipeline.flows.deployments import deploy
from rlhf_pipeline.flows.launchers.launcher import STAGE_FLOW
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


def test_the_scheduled_pipeline_runs_in_the_orchestrator_image_and_every_stage_in_its_own(
    stage_images, orchestrator_image, docker_pool, s3_bucket
):
    """As compose runs it: the worker first (it creates the pool), then `rlhf deploy`, then the scheduled
    pipeline's deployment, whose flow run starts in the orchestrator's container and each stage's in its image's."""
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
    start_worker()
    deadline = time.monotonic() + 60
    while not _pool_exists(pool):
        assert time.monotonic() < deadline, worker_log.read_text()[-3000:]
        time.sleep(0.5)
    deploy(config, "docker")
    scheduled = run_deployment(f"rlhf-scheduled/{config.run.name}", timeout=1500)
    assert scheduled.state.is_completed(), (scheduled.state, worker_log.read_text()[-3000:])

    store = ArtifactStore.from_uri(config.run.store)
    (run_id,) = store.list_children("runs")
    summary = store.read_json(f"runs/{run_id}/run.json")
    assert summary["status"] == "completed"
    for stage in STAGE_NAMES:
        artifact = summary["stages"][stage]["artifact"]
        assert store.exists(f"{artifact.removeprefix(store.uri + '/')}/manifest.json")
    assert summary["stages"]["reward"]["metrics"]["eval_accuracy"] > 0.5

    images = {orchestrator_image: _container_image(scheduled)}
    with get_client(sync_client=True) as client:
        for stage in STAGE_NAMES:
            deployment = client.read_deployment_by_name(f"{STAGE_FLOW}/{stage}")
            (run,) = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
                work_pool_filter=WorkPoolFilter(name={"any_": [pool]}),
            )
            assert run.state.is_completed()
            images[stage_images[stage]] = _container_image(run)
    assert all(image == expected for expected, image in images.items())


def _pool_exists(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            return False
    return True


def _container_image(run: FlowRun) -> str:
    """The image of the container the worker ran the flow run in."""
    container = run.infrastructure_pid.rsplit(":", 1)[-1]
    return docker("inspect", "--format", "{{.Config.Image}}", container).stdout.strip()
