"""Stages as flow runs of their own Prefect deployments (`deploy.launcher: deployment`): a real process work
pool with a real worker against the session's Prefect server, the store on moto's S3 server; and the GPU
requests of the Docker and Kubernetes pools, rendered offline by the workers' own job configurations."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.filters import DeploymentFilter, WorkPoolFilter
from prefect.client.schemas.objects import FlowRun, WorkPool
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Completed, Crashed, Failed

from rlhf_pipeline.flows.deployments import INFRA, default_job_template, deploy, ensure_work_pool
from rlhf_pipeline.flows.launchers.deployment import DeploymentLauncher, job_variables
from rlhf_pipeline.flows.launchers.launcher import STAGE_FLOW, StageCrashed, StageInputError
from rlhf_pipeline.flows.launchers.process import FLOW_RUN_ID, NODE0_ADDRESS
from rlhf_pipeline.flows.pipeline import run_pipeline
from rlhf_pipeline.stages.core.config import DeployConfig
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from rlhf_pipeline.stages.core.store import ArtifactStore
from tests.conftest import TINY, stop

SHORT = ["sft.max_steps=10", "reward.max_steps=10", "rl.ppo.steps=2", "evaluate.prompts=8"]
CONFIG_URI = "s3://bucket/runs/r1/config.yaml"
ENTRYPOINT = INFRA.parent / "docker" / "entrypoint.sh"


@pytest.fixture
def process_pool(prefect_api, tmp_path):
    """A process work pool with a worker that polls every second; stopped by its PID."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_API_URL": prefect_api}
    command = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    log = (tmp_path / "worker.log").open("w")
    worker = None

    def start() -> None:
        nonlocal worker
        worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    yield pool, start
    if worker is not None:
        stop(worker)
    log.close()


def _stage_runs(pool: str, stage: str) -> list:
    """The flow runs of a stage's deployment on this test's pool."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{STAGE_FLOW}/{stage}")
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
            work_pool_filter=WorkPoolFilter(name={"any_": [pool]}),
        )


def test_each_stage_runs_as_a_flow_run_of_its_own_deployment(process_pool, s3_bucket):
    pool, start_worker = process_pool
    config = load_config(
        None,
        [
            *TINY,
            *SHORT,
            f"run.store=s3://{s3_bucket}/store",
            f"deploy.work_pool={pool}",
            "deploy.launcher=deployment",
            "deploy.schedule=0 2 * * 1",
        ],
    )
    names = deploy(config, "process")
    assert names == [*(f"rlhf-stage/{stage}" for stage in STAGE_NAMES), "rlhf-scheduled/demo"]
    with get_client(sync_client=True) as client:
        scheduled = client.read_deployment_by_name("rlhf-scheduled/demo")
    assert [schedule.schedule.cron for schedule in scheduled.schedules] == ["0 2 * * 1"]
    assert scheduled.parameters == {"config_uri": f"s3://{s3_bucket}/store/deployments/demo/config.yaml"}
    start_worker()
    summary = run_pipeline(config)

    assert summary["status"] == "completed", summary
    store = ArtifactStore.from_uri(config.run.store)
    for stage in STAGE_NAMES:
        result = summary["stages"][stage]
        assert result["status"] == "ran" and result["attempts"] == 1
        assert result["artifact"].startswith(f"s3://{s3_bucket}/store/artifacts/{stage}/")
        assert store.exists(f"{result['artifact'].removeprefix(store.uri + '/')}/manifest.json")
    assert summary["stages"]["reward"]["metrics"]["eval_accuracy"] > 0.5
    runs = {stage: _stage_runs(pool, stage) for stage in STAGE_NAMES}
    assert all(len(runs[stage]) == 1 for stage in STAGE_NAMES)
    children = [runs[stage][0] for stage in STAGE_NAMES]
    assert [run.name for run in children] == list(STAGE_NAMES)
    assert all(run.state.is_completed() and run.parent_task_run_id is not None for run in children)
    assert [run.state.message for run in children] == [summary["stages"][stage]["artifact"] for stage in STAGE_NAMES]
    pids = {run.infrastructure_pid for run in children}
    assert len(pids) == len(STAGE_NAMES) and None not in pids  # each stage in its own process

    scheduled_run = run_deployment("rlhf-scheduled/demo", timeout=300)  # as its schedule starts it
    assert scheduled_run.state.is_completed(), scheduled_run.state
    assert all(len(_stage_runs(pool, stage)) == 1 for stage in STAGE_NAMES)  # every stage cached


def test_deploy_gives_its_job_template_to_a_pool_a_worker_created(prefect_api, s3_endpoint, tmp_path):
    """Compose and Kubernetes start the worker before `rlhf deploy`: the worker creates the pool with its type's
    default template, which deploy kept (stage containers without the store's credentials or GPUs)."""
    pool = f"docker-{uuid.uuid4().hex[:8]}"
    command = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "docker"]
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while (created := _work_pool(pool)) is None and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            stop(worker, grace=5)  # it only had to create the pool
    assert created is not None, (tmp_path / "worker.log").read_text()
    assert created.base_job_template in ({}, default_job_template("docker"))
    ensure_work_pool(pool, "docker")
    variables = _work_pool(pool).base_job_template["variables"]["properties"]
    assert variables["network_mode"]["default"] == "host"
    assert variables["env"]["default"]["AWS_ACCESS_KEY_ID"] == "{{ prefect.blocks.secret.rlhf-s3-access-key-id }}"

    with pytest.raises(InputError, match=f"'{pool}' is a docker work pool, not kubernetes"):
        ensure_work_pool(pool, "kubernetes")
    edited = _work_pool(pool).base_job_template
    edited["variables"]["properties"]["network_mode"]["default"] = "bridge"
    with get_client(sync_client=True) as client:
        client.update_work_pool(pool, WorkPoolUpdate(base_job_template=edited))
    ensure_work_pool(pool, "docker")
    assert _work_pool(pool).base_job_template == edited  # an edited template is the user's


def _work_pool(name: str) -> WorkPool | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name)
        except ObjectNotFound:
            return None


def test_a_stage_that_rejects_its_input_fails_the_pipeline_without_retries(
    process_pool, s3_bucket, tmp_path, monkeypatch
):
    """Also: a process worker runs each flow run in a new temporary directory, and a relative data path means
    what it meant where `rlhf deploy` ran (the stage reads the file, and finds its broken line)."""
    pool, start_worker = process_pool
    monkeypatch.chdir(tmp_path)
    broken = Path("broken.jsonl")
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    config = load_config(
        None,
        [
            *TINY,
            f"run.store=s3://{s3_bucket}/store",
            f"deploy.work_pool={pool}",
            "deploy.launcher=deployment",
            f"data.sft={broken}",
        ],
    )
    deploy(config, "process")
    start_worker()
    summary = run_pipeline(config)

    assert summary["status"] == "failed"
    prepare = summary["stages"]["prepare"]
    assert prepare["status"] == "failed" and f"{broken}:2" in prepare["error"]
    children = _stage_runs(pool, "prepare")
    assert len(children) == 1 and children[0].state.name == "InputError"  # not retried
    # the scheduled pipeline's run fails too (it ended Completed): Prefect's notifications fire
    scheduled_run = run_deployment(f"rlhf-scheduled/{config.run.name}", timeout=300)
    assert scheduled_run.state.is_failed() and "stage prepare failed" in scheduled_run.state.message


@pytest.mark.parametrize(
    ("state", "error"),
    [
        (Crashed(message="container exited with 137"), StageCrashed),
        (Failed(message="flow run failed"), StageCrashed),
        (Failed(name="InputError", message="error: data.jsonl:3: missing field"), StageInputError),
        (Completed(message="s3://bucket/artifacts/sft/k"), None),
    ],
)
def test_the_child_flow_runs_final_state_decides_retry_or_fail_fast(prefect_api, monkeypatch, tmp_path, state, error):
    """run_deployment returns whatever the child's end: crashes and failures are retried, input errors not."""
    from rlhf_pipeline.flows.deployments import ensure_work_pool
    from rlhf_pipeline.flows.launchers import deployment

    pool = f"pool-{uuid.uuid4().hex[:8]}"
    ensure_work_pool(pool, "process")
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(load_config(None, [f"deploy.work_pool={pool}"])))
    calls = []

    def run_deployment(name, parameters, job_variables, timeout):
        calls.append((name, parameters))
        return SimpleNamespace(name="sft-run", state=state)

    monkeypatch.setattr(deployment, "run_deployment", run_deployment)
    launch = partial(DeploymentLauncher().launch, "sft", str(config), logging.getLogger("test"))
    if error is None:
        launch()
    else:
        with pytest.raises(error, match=state.message):
            launch()
    assert calls == [("rlhf-stage/sft", {"stage": "sft", "config_uri": str(config), "label": "sft"})]


def test_a_stage_flow_run_no_worker_starts_times_out_naming_the_pool(prefect_api, tmp_path):
    """A deployment on a pool without a worker: cancelled after deploy.start_timeout_seconds, not waited on for
    ever, and the message says which pool needs a worker."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    config = load_config(None, [f"deploy.work_pool={pool}", "deploy.start_timeout_seconds=3"])
    deploy(config, "process")
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    started = time.monotonic()
    with pytest.raises(StageCrashed, match=f"no worker of work pool '{pool}' started its flow run .* within 3 s"):
        DeploymentLauncher().launch("sft", str(path), logging.getLogger("test"))
    assert time.monotonic() - started < 30
    (run,) = _stage_runs(pool, "sft")
    assert run.state.is_cancelled()


def test_docker_pool_gets_gpu_device_requests_shared_memory_and_a_cpu_quota():
    stages = {"sft": {"gpus": 2, "shm_size": "16g", "cpus": 3.5}}
    deploy = DeployConfig.model_validate({"image_tag": "0.1", "stages": stages})
    assert job_variables("docker", "sft", deploy, CONFIG_URI) == {
        "image": "rlhf-sft:0.1",
        "container_create_kwargs": {
            "device_requests": [{"count": 2, "capabilities": [["gpu"]]}],
            "shm_size": "16g",
            "nano_cpus": 3_500_000_000,
        },
    }
    assert job_variables("docker", "prepare", deploy, CONFIG_URI) == {
        "image": "rlhf-prepare:0.1",
        "container_create_kwargs": {},
    }
    assert job_variables("process", "sft", deploy, CONFIG_URI) == {}


def test_docker_pool_passes_s3_keys_as_secret_blocks_not_values(prefect_api, s3_endpoint):
    from prefect.blocks.system import Secret

    from rlhf_pipeline.flows.deployments import base_job_template

    template = base_job_template("docker")
    env = template["variables"]["properties"]["env"]["default"]
    assert env["AWS_ENDPOINT_URL"] == s3_endpoint
    assert env["AWS_SECRET_ACCESS_KEY"] == "{{ prefect.blocks.secret.rlhf-s3-secret-access-key }}"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(template)
    assert Secret.load("rlhf-s3-secret-access-key").get() == os.environ["AWS_SECRET_ACCESS_KEY"]
    assert template["variables"]["properties"]["network_mode"]["default"] == "host"


def test_kubernetes_job_template_renders_gpu_and_cpu_limits_node_selector_and_tolerations(prefect_api):
    """Rendered by prefect-kubernetes from this project's base job template, as its worker does, no cluster."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((INFRA / "kubernetes" / "base-job-template.json").read_text())
    rl_resources = {"gpus": 8, "cpus": 32, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    deploy = DeployConfig.model_validate({"stages": {"rl": rl_resources}})

    def render(stage: str) -> dict:
        values = job_variables("kubernetes", stage, deploy, CONFIG_URI)
        configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
        return configuration.job_manifest["spec"]["template"]["spec"]

    rl, prepare = render("rl"), render("prepare")
    container = rl["containers"][0]
    assert container["image"] == "rlhf-rl:latest"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    # a CPU limit is a cgroup quota in the pod: the stage's compute threads follow it (core/cpus.py)
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"] == "32"
    assert rl["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in rl["tolerations"]
    assert container["envFrom"] == [{"secretRef": {"name": "rlhf-s3"}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # The work directory (inputs, checkpoints, the artifact before upload) has disk of its own, bounded.
    assert container["resources"]["requests"]["ephemeral-storage"] == "50Gi"
    assert {"name": "work", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "work", "emptyDir": {"sizeLimit": "50Gi"}} in rl["volumes"]
    assert prepare["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0
    assert "cpu" not in prepare["containers"][0]["resources"]["limits"]
    assert prepare["containers"][0]["image"] == "rlhf-prepare:latest"


def test_a_stage_on_two_nodes_is_an_indexed_kubernetes_job_whose_pods_find_the_first(prefect_api):
    """Two pods with the stage's GPUs each, numbered (an indexed Job), named under the headless Service of
    worker.yaml; every pod knows where the first one is, the config the others run their node of, and the flow
    run they send their output to."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((INFRA / "kubernetes" / "base-job-template.json").read_text())
    deploy = DeployConfig.model_validate({"stages": {"sft": {"gpus": 8, "nodes": 2}}})
    values = job_variables("kubernetes", "sft", deploy, CONFIG_URI)
    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    flow_run = FlowRun(flow_id=uuid.uuid4(), name="sft")
    configuration.prepare_for_flow_run(flow_run)  # as the worker does
    job = configuration.job_manifest
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["rlhf-stage-pod"] == "true" and pod["spec"]["subdomain"] == "rlhf-stages"
    service = next(
        d for d in yaml.safe_load_all((INFRA / "kubernetes" / "worker.yaml").read_text()) if d["kind"] == "Service"
    )
    assert service["metadata"]["name"] == "rlhf-stages" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"rlhf-stage-pod": "true"}
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8  # per pod: per node
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["RLHF_NODE_CONFIG"]["value"] == CONFIG_URI
    job_name = "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["RLHF_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == job_name
    assert env[NODE0_ADDRESS]["value"] == "$(RLHF_JOB_NAME)-0.rlhf-stages:29500"
    assert env[FLOW_RUN_ID]["value"] == str(flow_run.id)  # where every pod's `rlhf node` sends its output
    names = [entry["name"] for entry in container["env"]]
    assert names.index("RLHF_JOB_NAME") < names.index(NODE0_ADDRESS)  # Kubernetes expands earlier variables only
    one_node = job_variables("kubernetes", "reward", deploy, CONFIG_URI)
    assert "nodes" not in one_node and "env" not in one_node
    rendered = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, one_node))
    assert rendered.job_manifest["spec"]["completions"] == 1


def test_a_docker_pool_refuses_a_stage_on_several_nodes():
    deploy = DeployConfig.model_validate({"stages": {"rl": {"gpus": 8, "nodes": 2}}})
    with pytest.raises(StageInputError, match="deploy.stages.rl.nodes: 2 nodes need a kubernetes work pool"):
        job_variables("docker", "rl", deploy, CONFIG_URI)


@pytest.mark.parametrize(
    ("index", "runs"),
    [
        ("0", "prefect flow-run execute"),  # the first pod: the stage's flow run, which starts the first node
        ("1", "rlhf node sft --config s3://bucket/runs/r1/config.yaml --node-rank 1"),
        (None, "prefect flow-run execute"),  # a stage on one node: not an indexed Job's pod
    ],
)
def test_the_stage_image_runs_the_flow_in_the_first_pod_and_a_node_in_the_others(tmp_path, index, runs):
    env = {"RLHF_STAGE": "sft", "RLHF_NODE_CONFIG": CONFIG_URI}
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = index
    else:
        del env["RLHF_NODE_CONFIG"]
    assert _entrypoint_runs(tmp_path, env, ["prefect", "flow-run", "execute"]) == runs


def _entrypoint_runs(tmp_path: Path, env: dict[str, str], arguments: list[str]) -> str:
    """What an image's entrypoint runs for these arguments, with `prefect` and `rlhf` that print themselves."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("prefect", "rlhf"):
        (bin_dir / program).write_text(f'#!/bin/sh\necho {program} "$@"\n')
        (bin_dir / program).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"} | env
    return subprocess.run(["sh", str(ENTRYPOINT), *arguments], env=env, capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize(
    ("stage", "arguments", "runs"),
    [
        ("sft", ["--config", CONFIG_URI], f"rlhf stage sft --config {CONFIG_URI}"),
        (None, ["runs", "--store", "s3://bucket/x"], "rlhf runs --store s3://bucket/x"),
        (None, ["prefect", "flow-run", "execute"], "prefect flow-run execute"),  # the scheduled pipeline
    ],
)
def test_each_image_runs_its_command_or_a_workers(tmp_path, stage, arguments, runs):
    """The orchestrator image's entrypoint was `rlhf`: the Docker and Kubernetes workers' `prefect flow-run
    execute` became `rlhf prefect ...`, and the scheduled pipeline never started."""
    assert _entrypoint_runs(tmp_path, {"RLHF_STAGE": stage} if stage else {}, arguments) == runs


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "error", str(INFRA.parent / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
