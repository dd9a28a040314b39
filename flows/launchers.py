"""How a stage's program gets started. The pipeline only needs `launch` to run `rlhf stage NAME --config URI`
somewhere and report how it ended: in a local process (`process`), or as a flow run of the stage's Prefect
deployment on a process, Docker or Kubernetes work pool (`deployment`), with the GPUs the config asks for."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from flows.cli import run_forked
from flows.monitoring import StageMonitor
from stages import STAGE_NAMES
from stages.errors import EXIT_DAMAGED_ARTIFACT, EXIT_INPUT_ERROR
from stages.progress import LAUNCHER_PID

if TYPE_CHECKING:
    from stages.config import DeployConfig, PipelineConfig

# The names of a stage flow run's Failed state when its input was rejected, or found damaged in the store.
INPUT_ERROR_STATE = "InputError"
DAMAGED_INPUT_STATE = "DamagedInput"
STAGE_FLOW = "rlhf-stage"
# What the warm interpreter imports once, so that a forked stage starts training at once: every stage's module
# (torch, transformers, TRL, datasets, peft) and what they import only when running (Llama, matplotlib).
PRELOADED_MODULES = [
    "flows.cli",
    "stages.runner",
    *(f"stages.{name}" for name in ("prepare", "sft", "reward", "rl", "evaluate")),
    *(f"stages.{name}" for name in ("ppo", "rejection_sampling", "dpo", "group_rl", "multi_aspect")),
    "peft",
    "transformers.models.llama.modeling_llama",
    "matplotlib.figure",
]


class StageInputError(Exception):
    """The stage rejected its config or data: retrying cannot help."""


class StageInputDamaged(Exception):
    """An input artifact of the stage failed verification and was set aside: its producer must run again
    first; retrying this stage cannot help."""


class StageCrashed(Exception):
    """The stage's process died (killed, OOM, a bug, a lost node): worth retrying, it resumes."""


class Launcher(Protocol):
    def launch(self, stage: str, config_uri: str, logger: logging.Logger | logging.LoggerAdapter) -> None: ...


def rlhf_command() -> list[str]:
    """The `rlhf` console script of this environment, else the one on PATH."""
    beside_python = Path(sys.executable).parent / "rlhf"
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("rlhf")
    return [found] if found else [sys.executable, "-m", "flows.cli"]


def stage_arguments(stage: str, config_uri: str) -> list[str]:
    return ["stage", stage, "--config", config_uri]


def stage_command(stage: str, config: PipelineConfig, config_uri: str) -> list[str]:
    """`rlhf stage NAME --config URI`; under `torchrun` (DDP, one process per GPU, NCCL; gloo on CPU) where the
    config gives the stage several processes."""
    arguments = stage_arguments(stage, config_uri)
    processes = config.deploy.processes(stage)
    if processes == 1:
        return [*rlhf_command(), *arguments]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [sys.executable, *torchrun, "-m", "flows.cli", *arguments]


def gpu_visible() -> bool:
    """Whether `run.device: auto` will find a GPU, judged without importing torch: an NVIDIA or ROCm driver
    with devices, and CUDA_VISIBLE_DEVICES not hiding them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()


def forks_stage(stage: str, config: PipelineConfig) -> bool:
    """Fork from the warm interpreter only where that is safe and worth it: one process on a Linux CPU. CUDA
    must be initialised in a fresh process, and on a GPU the import is a small part of a stage."""
    if config.run.stage_start != "fork" or sys.platform != "linux" or config.deploy.processes(stage) > 1:
        return False
    return config.run.device == "cpu" or (config.run.device == "auto" and not gpu_visible())


def warm_interpreter() -> multiprocessing.context.ForkServerContext:
    """multiprocessing's fork server with PRELOADED_MODULES imported: one per orchestrator process, started on
    first use (in the background: it imports while the caller goes on) and gone when that process ends."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED_MODULES)
    multiprocessing.forkserver.ensure_running()
    return context


class ForkedStage:
    """`rlhf stage ...` as a child of the warm interpreter, with what the launcher uses of a Popen: `pid`, its
    output as `stdout`, `wait()` with the same exit codes (negative: killed by that signal)."""

    def __init__(self, arguments: list[str], env: dict[str, str]) -> None:
        context = warm_interpreter()
        reader, writer = context.Pipe(duplex=False)
        self._process = context.Process(target=run_forked, args=(arguments, env, writer))
        self._process.start()
        writer.close()
        self.pid = self._process.pid
        self.stdout: IO[str] = open(os.dup(reader.fileno()), encoding="utf-8", errors="replace")  # noqa: SIM115
        reader.close()

    def wait(self) -> int:
        self._process.join()
        return self._process.exitcode

    def __enter__(self) -> ForkedStage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stdout.close()
        self.wait()
        self._process.close()


class ProcessLauncher:
    """Each stage in its own OS process (or processes); its output goes line by line to the stage run's logger.
    With `warm` (the pipeline's several stages) a CPU stage is forked from the warm interpreter
    (`run.stage_start`); otherwise, and where one stage is all a process runs, it is a fresh `rlhf stage`."""

    def __init__(self, warm: bool = True) -> None:
        self.warm = warm

    @staticmethod
    def warm_up(config: PipelineConfig) -> None:
        """Start the warm interpreter's imports now, beside whatever the caller does next (Prefect starting)."""
        if any(forks_stage(stage, config) for stage in STAGE_NAMES):
            warm_interpreter()

    def launch(self, stage: str, config_uri: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        from stages.config import read_config

        config = read_config(config_uri)
        command = stage_command(stage, config, config_uri)
        env = os.environ | {"PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())}
        forked = self.warm and forks_stage(stage, config)
        logger.info("launching%s: %s", " (forked from the warm interpreter)" if forked else "", " ".join(command))
        tail: deque[str] = deque(maxlen=5)
        monitor = StageMonitor.in_run_context(stage)
        if forked:
            started = ForkedStage(stage_arguments(stage, config_uri), env)
        else:
            started = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        with started as proc:
            logger.info("stage process pid %d", proc.pid)
            for line in proc.stdout:
                line = line.rstrip()
                if not line or (monitor is not None and monitor.handle(line)):
                    continue
                tail.append(line)
                logger.info(line)
            code = proc.wait()
        if monitor is not None:
            monitor.finish()
        if code == 0:
            return
        if code == EXIT_INPUT_ERROR:
            raise StageInputError(tail[-1] if tail else f"{stage}: bad input")
        if code == EXIT_DAMAGED_ARTIFACT:
            raise StageInputDamaged(tail[-1] if tail else f"{stage}: a damaged input")
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise StageCrashed(f"stage {stage} {how}: {tail[-1] if tail else 'no output'}")


class DeploymentLauncher:
    """Each stage as a flow run of its deployment `rlhf-stage/<stage>`, started with `run_deployment` and awaited.

    The child's final state decides: completed is success, a Failed state named InputError is not retried,
    anything else (failed, crashed, cancelled: a container that died) raises StageCrashed for the pipeline task
    to retry with backoff. A flow run that no worker starts within `deploy.start_timeout_seconds` is cancelled
    and is a crash too, with a message naming the work pool that has no worker.
    """

    def launch(self, stage: str, config_uri: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        from stages.config import read_config

        deploy = read_config(config_uri).deploy
        with get_client(sync_client=True) as client:
            pool_type = client.read_work_pool(deploy.work_pool).type
        variables = job_variables(pool_type, stage, deploy)
        logger.info("running deployment %s/%s on %s pool %r", STAGE_FLOW, stage, pool_type, deploy.work_pool)
        flow_run = run_deployment(
            f"{STAGE_FLOW}/{stage}",
            parameters={"stage": stage, "config_uri": config_uri},
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
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

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


def job_variables(pool_type: str, stage: str, deploy: DeployConfig) -> dict[str, Any]:
    """The stage's image and resources in the shape each work pool type's job template takes."""
    resources = deploy.resources(stage)
    if pool_type == "docker":
        create: dict[str, Any] = {}
        if resources.gpus:
            create["device_requests"] = [{"count": resources.gpus, "capabilities": [["gpu"]]}]
        if resources.shm_size:
            create["shm_size"] = resources.shm_size
        return {"image": deploy.image(stage), "container_create_kwargs": create}
    if pool_type == "kubernetes":
        # Left out when not configured, so that the pool's defaults (its GPU-taint toleration) apply.
        placement = {"node_selector": resources.node_selector, "tolerations": resources.tolerations}
        sizes = {"image": deploy.image(stage), "gpus": resources.gpus, "work_storage": resources.work_storage}
        return sizes | {k: v for k, v in placement.items() if v}
    return {}
