"""How many compute threads a stage process runs: the CPUs it is given, shared with the other stage processes
running on the same machine.

torch starts one compute thread per core it sees, in every process. Two stages side by side on one machine (two
`rlhf run`s, parallel branches) then run twice as many threads as there are cores, and OpenMP's threads spin at
every barrier while the other process's threads wait for a core: a PPO step of the demo went from 1.2 s to 29 s.
So each stage process takes its share: the CPUs it may use (its affinity mask, the cgroup CPU quota of its
container or pod, at most `deploy.stages.<stage>.cpus`) divided among the stage processes alive in this machine's
work area (`core.work_area`: one directory per process, every rank of a multi-process stage included), and
never among fewer than the ranks `torchrun` started on this node (`LOCAL_WORLD_SIZE`), which may not have made
their directories yet when this one starts. Stages re-take their share as they go, so that one started alone
gives up threads when another one starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from rlhf_pipeline.stages.core.work_area import live_stage_processes

CPUS_ENV = "RLHF_STAGE_CPUS"  # set by the local launcher from deploy.stages.<stage>.cpus
CGROUP = Path("/sys/fs/cgroup")


def own_cgroup() -> Path:
    """This process's cgroup v2 directory (in a container with its own cgroup namespace: the root)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return CGROUP
    unified = next((line.partition("::")[2] for line in lines if line.startswith("0::")), "/")
    return CGROUP / unified.lstrip("/")


def cgroup_quota(cgroup: Path | None = None) -> float | None:
    """The CPUs the cgroup quota allows (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), None without a quota."""
    try:
        limit, period = ((cgroup or own_cgroup()) / "cpu.max").read_text().split()
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((CGROUP / "cpu" / "cpu.cfs_quota_us").read_text())
        quota_period = int((CGROUP / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / quota_period


def granted_cpus() -> float:
    """The CPUs this process may use: its affinity mask, capped by the cgroup quota and by CPUS_ENV."""
    limits = [float(len(os.sched_getaffinity(0)))]
    if (quota := cgroup_quota()) is not None:
        limits.append(quota)
    if os.environ.get(CPUS_ENV):
        limits.append(float(os.environ[CPUS_ENV]))
    return min(limits)


def compute_threads(cpus: float, root: Path | None = None) -> int:
    """This process's share of `cpus` (those it may use: `granted_cpus`), at least one thread."""
    sharing = max(len(live_stage_processes(root)), int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, math.floor(cpus / sharing))
