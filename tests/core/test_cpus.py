"""Stage processes share the machine's CPUs: each runs its share of the CPUs it may use (affinity, cgroup quota,
deploy.stages.<stage>.cpus) among the stage processes alive in the work area."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from rlhf_pipeline.stages.core import cpus
from rlhf_pipeline.stages.core.work_area import live_stage_processes, work_directory
from rlhf_pipeline.stages.modeling import threads


@pytest.fixture
def work_root(tmp_path, monkeypatch):
    """A private temporary directory, so that the work area holds only what the test puts there."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = tmp_path / "rlhf-work"
    root.mkdir()
    return root


@pytest.fixture
def sleepers():
    """Processes standing in for other stages: alive until the test ends."""
    started: list[subprocess.Popen] = []

    def start(count: int) -> list[subprocess.Popen]:
        for _ in range(count):
            started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        return started[-count:]

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("150000 100000\n", 1.5), ("max 100000\n", None), ("400000 100000", 4.0)]
)
def test_the_cgroup_v2_quota_is_read_as_cpus(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert cpus.cgroup_quota(tmp_path) == expected


def test_granted_cpus_is_the_smallest_of_affinity_quota_and_the_configured_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    monkeypatch.delenv(cpus.CPUS_ENV, raising=False)
    assert cpus.granted_cpus() == 16
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: 6.0)  # a pod limited to 6 CPUs on a 16-core node
    assert cpus.granted_cpus() == 6
    monkeypatch.setenv(cpus.CPUS_ENV, "4")
    assert cpus.granted_cpus() == 4


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    monkeypatch.delenv(cpus.CPUS_ENV, raising=False)
    monkeypatch.setattr(threads, "RECHECK_SECONDS", 0.0)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_stage_gives_threads_up_when_another_starts_and_takes_them_back_when_it_ends(work_root, sleepers, four_cpus):
    with work_directory("rl"):
        assert threads.take_cpu_share() == torch.get_num_threads() == 4
        (other,) = sleepers(1)
        (work_root / f"sft-{other.pid}").mkdir()
        assert threads.take_cpu_share() == torch.get_num_threads() == 2
        other.kill()
        other.wait()
        assert threads.take_cpu_share() == torch.get_num_threads() == 4


def test_threads_are_the_cpus_shared_among_live_stage_processes(work_root, sleepers, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpus, "cgroup_quota", lambda: None)
    monkeypatch.delenv(cpus.CPUS_ENV, raising=False)
    assert cpus.compute_threads(cpus.granted_cpus()) == 8  # no stage running: this process alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (work_root / f"sft-{dead.stdout.strip()}").mkdir()  # left behind by a stage that is gone: not counted
    for process in sleepers(2):
        (work_root / f"rl-{process.pid}").mkdir()
    with work_directory("sft") as own:
        assert own.parent == work_root and len(live_stage_processes()) == 3
        assert cpus.compute_threads(cpus.granted_cpus()) == 2  # 8 CPUs among 3 stage processes
        monkeypatch.setenv(cpus.CPUS_ENV, "2")
        assert cpus.compute_threads(cpus.granted_cpus()) == 1  # never fewer than one


def test_the_ranks_torchrun_started_on_this_node_share_its_cpus_before_they_register(work_root, monkeypatch):
    """A rank that starts before its siblings have made their work directories already takes only its share."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with work_directory("sft"):
        assert len(live_stage_processes()) == 1
        assert cpus.compute_threads(8.0) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpus.compute_threads(8.0) == 8
