"""The stage's torch compute threads held at its share of the machine's CPUs (`core.cpus`): set when torch
starts and taken again as the stage trains, so that a stage started alone gives threads up when another stage
starts beside it, and takes them back when that one ends."""

from __future__ import annotations

import logging
import time

import torch

from rlhf_pipeline.stages.core.cpus import compute_threads, granted_cpus

RECHECK_SECONDS = 1.0  # counting the stage processes costs a directory listing: not at every tiny step

log = logging.getLogger("rlhf.stage")
_last_check = -RECHECK_SECONDS


def take_cpu_share() -> int:
    """Set torch's compute threads to this process's share (at most once a second); the threads it runs."""
    global _last_check
    now = time.monotonic()
    if now - _last_check >= RECHECK_SECONDS:
        _last_check = now
        cpus = granted_cpus()
        threads = compute_threads(cpus)
        if threads != torch.get_num_threads():
            log.info("compute threads: %d (of %g CPUs this process may use)", threads, cpus)
            torch.set_num_threads(threads)
    return torch.get_num_threads()
