"""A stage in several data-parallel processes (`deploy.stages.<stage>.processes`): `torchrun` starts
them (gloo on CPU here, NCCL on GPUs), TRL's trainer splits the batches, and only the main process publishes."""

from __future__ import annotations

import os

import pytest

from rlhf_pipeline.flows.launchers.process import ProcessLauncher
from rlhf_pipeline.stages.core.artifacts import read_manifest
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.runner import run_stage
from tests.conftest import TINY


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message, *args):
        self.lines.append(message % args if args else message)


def test_sft_in_two_processes_trains_twice_the_tokens_per_step_and_publishes_once(tmp_path):
    store = LocalStore(tmp_path / "store")
    overrides = [*TINY, f"run.store={store.uri}", "run.device=cpu", "sft.max_steps=20", "sft.logging_steps=5"]
    single = load_config(None, overrides)
    distributed = load_config(None, [*overrides, "deploy.stages.sft.processes=2"])
    run_stage("prepare", single, store)
    store.write_bytes("runs/ddp/config.yaml", dump_config(distributed).encode())
    log = _Log()
    ProcessLauncher().launch("sft", store.uri_of("runs/ddp/config.yaml"), log)

    # two ranks trained, each on its share of the machine's cores
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)
    assert sum(f"INFO running on cpu, compute threads: {threads}" in line for line in log.lines) == 2
    assert sum("rlhf.stage INFO sft: done" in line for line in log.lines) == 1  # one published
    ddp = read_manifest(store, plan_stage(store, distributed, "sft").prefix)
    one = run_stage("sft", single, store)[0]
    assert ddp.cache_key != one.cache_key
    assert ddp.metrics["processes"] == 2 and "processes" not in one.metrics
    assert ddp.metrics["steps"] == one.metrics["steps"] == 20
    assert ddp.metrics["train_tokens"] == pytest.approx(2 * one.metrics["train_tokens"], rel=0.1)
    assert ddp.metrics["last_loss"] < ddp.metrics["first_loss"]
    assert ddp.metrics["eval_loss"] < one.metrics["eval_loss"] + 0.5


def test_a_stage_given_fewer_cpus_than_the_machine_runs_that_many_compute_threads(tmp_path):
    """deploy.stages.<stage>.cpus caps a local stage process as a cgroup quota caps one in a container."""
    assert len(os.sched_getaffinity(0)) >= 2  # the cap must be below what the process could use
    store = LocalStore(tmp_path / "store")
    config = load_config(None, [*TINY, f"run.store={store.uri}", "sft.max_steps=2", "deploy.stages.sft.cpus=1"])
    run_stage("prepare", config, store)
    store.write_bytes("runs/capped/config.yaml", dump_config(config).encode())
    log = _Log()
    ProcessLauncher().launch("sft", store.uri_of("runs/capped/config.yaml"), log)
    assert sum("INFO running on cpu, compute threads: 1" in line for line in log.lines) == 1


def test_stages_that_train_in_one_process_refuse_several():
    with pytest.raises(Exception, match="deploy.stages.rl: this stage trains in one process"):
        load_config(None, ["deploy.stages.rl.gpus=4"])
    config = load_config(None, ["deploy.stages.rl.gpus=4", "deploy.stages.rl.processes=1"])
    assert config.deploy.processes("rl") == 1
    assert load_config(None, ["deploy.stages.sft.gpus=8"]).deploy.processes("sft") == 8
