"""Stages in local OS processes: a fresh `rlhf stage` (under `torchrun` for several processes), or a child forked
from a warm interpreter that has imported the training stack once (for several processes: torchrun run in that
child, forking its ranks from it)."""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import io
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, cast
from uuid import UUID

from prefect.logging.configuration import setup_logging
from prefect.logging.loggers import flow_run_logger
from setproctitle import setproctitle

from rlhf_pipeline.flows.launchers.launcher import StageCrashed, StageInputDamaged, StageInputError
from rlhf_pipeline.flows.monitoring.stage_monitor import StageMonitor
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import read_config
from rlhf_pipeline.stages.core.cpus import CPUS_ENV
from rlhf_pipeline.stages.core.errors import ERROR_PREFIX, EXIT_DAMAGED_ARTIFACT, EXIT_INPUT_ERROR, InputError
from rlhf_pipeline.stages.core.progress import LAUNCHER_PID
from rlhf_pipeline.stages.core.registry import ALGORITHM_MODULES, STAGE_MODULES, STAGE_NAMES

CLI = "rlhf_pipeline.flows.cli"
TORCHRUN = "rlhf_pipeline.stages.modeling.torchrun"  # torchrun, passing on a failed process's exit code
# Where the nodes of a stage on several nodes meet: host:port of the first node (the Kubernetes job template sets
# it to the first pod's name under the headless Service `rlhf-stages`).
NODE0_ADDRESS = "RLHF_NODE0_ADDRESS"
DEFAULT_NODE0_ADDRESS = "127.0.0.1:29500"
FLOW_RUN_ID = "PREFECT__FLOW_RUN_ID"  # what a Prefect worker tells a flow run's container, pod or process
# What the warm interpreter imports once, so that a forked stage starts training at once: this module (a forked
# child unpickles its target, run_forked, from it: Prefect's logging, 2-3 s to import on a CPU core), every
# stage's module (torch, transformers, TRL, datasets, peft) and what they import only when running (Llama,
# matplotlib).
PRELOADED_MODULES = [
    __name__,
    CLI,
    TORCHRUN,
    *STAGE_MODULES,
    *ALGORITHM_MODULES,
    "peft",
    "transformers.models.llama.modeling_llama",
    "matplotlib.figure",
]


def rlhf_command() -> list[str]:
    """The `rlhf` console script of this environment, else the one on PATH."""
    beside_python = Path(sys.executable).parent / "rlhf"
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("rlhf")
    return [found] if found else [sys.executable, "-m", CLI]


def stage_arguments(stage: str, config_uri: str) -> list[str]:
    return ["stage", stage, "--config", config_uri]


def torchrun_arguments(stage: str, config: PipelineConfig, node_rank: int = 0) -> list[str] | None:
    """torchrun's options for the stage's processes (one per GPU, NCCL; gloo on CPU), None for one process. On
    several nodes these are node `node_rank`'s: the nodes meet at the first one (NODE0_ADDRESS), whose processes
    take the first ranks, rank 0 (the one that reports and publishes) among them. torchrun's static rendezvous
    keeps that order; its c10d rendezvous would number the nodes by host name."""
    per_node, nodes = config.deploy.processes_per_node(stage), config.deploy.resources(stage).nodes
    if per_node * nodes == 1:
        return None
    torchrun = ["--nproc-per-node", str(per_node)]
    if nodes == 1:
        return [*torchrun, "--standalone"]
    host, _, port = os.environ.get(NODE0_ADDRESS, DEFAULT_NODE0_ADDRESS).rpartition(":")
    torchrun += ["--nnodes", str(nodes), "--node-rank", str(node_rank)]
    # The nodes wait for each other (a pod scheduled late, a large image pulled) as long as for a collective,
    # not the 600 s torchrun's static rendezvous gives them.
    waits = int(config.deploy.collective_timeout(stage).total_seconds())
    return [*torchrun, "--master-addr", host, "--master-port", port, "--rdzv-conf", f"timeout={waits}"]


def stage_command(stage: str, config: PipelineConfig, config_uri: str, node_rank: int = 0) -> list[str]:
    """`rlhf stage NAME --config URI`, under `torchrun` where the config gives the stage several processes."""
    arguments = stage_arguments(stage, config_uri)
    torchrun = torchrun_arguments(stage, config, node_rank)
    if torchrun is None:
        return [*rlhf_command(), *arguments]
    return [sys.executable, "-m", TORCHRUN, *torchrun, "-m", CLI, *arguments]


def forked_program(stage: str, config: PipelineConfig, config_uri: str, node_rank: int = 0) -> tuple[str, list[str]]:
    """What a forked stage runs, as the module whose `main` takes these arguments: the CLI's `rlhf stage ...`,
    or for several processes torchrun itself (stage_command's), starting its ranks by forking (each a copy of
    the warm child) and running the CLI in each (`--run-path`: its file in the same interpreter)."""
    arguments = stage_arguments(stage, config_uri)
    torchrun = torchrun_arguments(stage, config, node_rank)
    if torchrun is None:
        return CLI, arguments
    cli_file = importlib.util.find_spec(CLI).origin  # type: ignore[union-attr]  # CLI is installed
    return TORCHRUN, [*torchrun, "--start-method", "fork", "--run-path", str(cli_file), *arguments]


def stage_environment(stage: str, config: PipelineConfig) -> dict[str, str]:
    """The launcher's environment, unbuffered, with its pid (a stage stops when its launcher is gone) and the
    stage's CPUs where the config sets them (core/cpus.py)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", LAUNCHER_PID: str(os.getpid())}
    if (cpus := config.deploy.resources(stage).cpus) is not None:
        env[CPUS_ENV] = f"{cpus:g}"
    return env


def gpu_visible() -> bool:
    """Whether `run.device: auto` will find a GPU, judged without importing torch: an NVIDIA or ROCm driver
    with devices, and CUDA_VISIBLE_DEVICES not hiding them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()


def forks_stage(stage: str, config: PipelineConfig) -> bool:
    """Fork from the warm interpreter only where that is safe and worth it: on a Linux CPU. CUDA must be
    initialised in a fresh process, and on a GPU the import is a small part of a stage."""
    if config.run.stage_start != "fork" or sys.platform != "linux":
        return False
    return config.run.device == "cpu" or (config.run.device == "auto" and not gpu_visible())


def warm_interpreter() -> multiprocessing.context.ForkServerContext:
    """multiprocessing's fork server with PRELOADED_MODULES imported: one per orchestrator process, started on
    first use (in the background: it imports while the caller goes on) and gone when that process ends."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED_MODULES)
    multiprocessing.forkserver.ensure_running()
    return context


def run_forked(module: str, arguments: list[str], env: dict[str, str], output: Connection) -> None:
    """`python -m MODULE ARGUMENTS` in a process forked from the launcher's warm interpreter: the module's `main`
    (looked up by name: the CLI imports this module, and flows never imports torch), its exit status the
    process's; output into the launcher's pipe, line-buffered; the launcher's environment; the command line
    `ps` would show (`rlhf stage ...`, `torchrun ...`); exit handlers run at exit (a forked child leaves with
    os._exit)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(output.fileno(), sys.stdout.fileno())
    os.dup2(output.fileno(), sys.stderr.fileno())
    output.close()
    cast(io.TextIOWrapper, sys.stdout).reconfigure(line_buffering=True)
    program = "rlhf" if module == CLI else "torchrun"
    setproctitle(" ".join([program, *arguments]))  # before the environment changes: it needs the original block
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [program, *arguments]
    try:
        sys.exit(importlib.import_module(module).main(arguments))
    finally:
        atexit._run_exitfuncs()


class ForkedStage:
    """A stage (forked_program) as a child of the warm interpreter, with what the launcher uses of a Popen:
    `pid`, its output as `stdout`, `wait()` with the same exit codes (negative: killed by that signal)."""

    def __init__(self, module: str, arguments: list[str], env: dict[str, str]) -> None:
        context = warm_interpreter()
        reader, writer = context.Pipe(duplex=False)
        self._process = context.Process(target=run_forked, args=(module, arguments, env, writer))
        self._process.start()
        writer.close()
        self.pid = self._process.pid
        self.stdout: IO[str] = open(os.dup(reader.fileno()), encoding="utf-8", errors="replace")  # noqa: SIM115
        reader.close()

    def wait(self) -> int:
        self._process.join()
        assert self._process.exitcode is not None  # joined
        return self._process.exitcode

    def __enter__(self) -> ForkedStage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stdout.close()
        self.wait()
        self._process.close()


def start_stage(
    stage: str, config: PipelineConfig, config_uri: str, env: dict[str, str], forked: bool, node_rank: int = 0
) -> ForkedStage | subprocess.Popen[str]:
    """The stage's processes of node `node_rank` (all of them on one node), forked from the warm interpreter or
    a fresh program, their output and errors as one text stream (`stdout`)."""
    if forked:
        return ForkedStage(*forked_program(stage, config, config_uri, node_rank), env)
    command = stage_command(stage, config, config_uri, node_rank)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


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

    def launch(
        self, stage: str, config_uri: str, logger: logging.Logger | logging.LoggerAdapter, label: str | None = None
    ) -> None:
        config = read_config(config_uri)
        command = stage_command(stage, config, config_uri)
        env = stage_environment(stage, config)
        forked = self.warm and forks_stage(stage, config)
        logger.info("launching%s: %s", " (forked from the warm interpreter)" if forked else "", " ".join(command))
        tail: deque[str] = deque(maxlen=5)
        message = None  # the stage's own, of its last process to give one
        monitor = StageMonitor.in_run_context(label or stage)
        with start_stage(stage, config, config_uri, env, forked) as proc:
            logger.info("stage process pid %d", proc.pid)
            assert proc.stdout is not None  # piped
            for line in proc.stdout:
                line = line.rstrip()
                if not line or (monitor is not None and monitor.handle(line)):
                    continue
                tail.append(line)
                if line.startswith(ERROR_PREFIX):
                    message = line
                logger.info(line)
            code = proc.wait()
        if monitor is not None:
            monitor.finish()
        if code == 0:
            return
        if code == EXIT_INPUT_ERROR:
            raise StageInputError(message or f"{stage}: bad input")
        if code == EXIT_DAMAGED_ARTIFACT:
            raise StageInputDamaged(message or f"{stage}: a damaged input")
        nodes = config.deploy.resources(stage).nodes
        where = f" (node 0 of {nodes}: the others log to the stage's flow run)" if nodes > 1 else ""
        raise StageCrashed(f"stage {stage}{where} {ending(code)}: {tail[-1] if tail else 'no output'}")


def run_node(stage: str, config_uri: str, node_rank: int) -> int:
    """One node's processes of a stage on several nodes (`rlhf node`: a Kubernetes pod after the first, or a
    machine of your own), started as the first node's are (forked on CPU); their output line by line, and how
    they ended, on this process's output and, in a pod of the stage's flow run, in that flow run's logs; their
    exit code."""
    config = read_config(config_uri)
    nodes = config.deploy.resources(stage).nodes
    if not 0 <= node_rank < nodes:
        raise InputError(f"--node-rank {node_rank}: deploy.stages.{stage}.nodes is {nodes} (ranks 0 to {nodes - 1})")
    env = stage_environment(stage, config)
    say = node_output(stage, node_rank)
    with start_stage(stage, config, config_uri, env, forks_stage(stage, config), node_rank) as node:
        assert node.stdout is not None  # piped
        for line in node.stdout:
            if line := line.rstrip():
                say(logging.INFO, line)
        code = node.wait()
    say(logging.INFO if code == 0 else logging.ERROR, f"node {node_rank} of stage {stage} {ending(code)}")
    return code


def node_output(stage: str, node_rank: int) -> Callable[[int, str], None]:
    """Where a node after the first puts its processes' lines (`say(level, line)`): in a pod of the stage's
    flow run (the worker gives every pod of the stage's Kubernetes Job the flow run's id), that flow run's logs
    as well as the pod's own output, for the worker streams the first pod's only; elsewhere its own output."""
    flow_run_id = os.environ.get(FLOW_RUN_ID)
    if not flow_run_id:
        return lambda _level, line: print(line, flush=True)
    setup_logging()  # Prefect's handlers: the console's, and the one that sends to its API
    return flow_run_logger(flow_run_id=UUID(flow_run_id), flow_run_name=f"{stage} node {node_rank}").log


def ending(code: int) -> str:
    """How a process that exited with `code` ended (negative: killed by that signal)."""
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
