"""The machine's work area for stages: one directory per stage process, `<tmp>/rlhf-work/<stage>-<pid>`, which
holds its inputs, checkpoints and artifact before upload, and tells the other stage processes on the machine
that it is running (`core.cpus` shares the CPUs among them)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rlhf_pipeline.stages.core.progress import process_alive

log = logging.getLogger("rlhf.stage")


def work_root() -> Path:
    return Path(tempfile.gettempdir()) / "rlhf-work"


def owner_alive(path: Path) -> bool:
    return process_alive(int(path.name.rpartition("-")[2] or 0))


def live_stage_processes(root: Path | None = None) -> list[Path]:
    """The work directories of the stage processes alive on this machine."""
    root = root or work_root()
    return [path for path in root.iterdir() if owner_alive(path)] if root.is_dir() else []


@contextlib.contextmanager
def work_directory(stage: str) -> Iterator[Path]:
    """The stage process's own work directory, removed when the stage ends. A killed stage cannot remove its
    own, so each stage first removes those of processes that are gone: a retry does not find the disk filled by
    the attempts before it."""
    root = work_root()
    root.mkdir(exist_ok=True)
    for leftover in root.iterdir():
        if not owner_alive(leftover):
            log.info("removing %s, left behind by a stage process that is gone", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    own = root / f"{stage}-{os.getpid()}"
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir()
    try:
        yield own
    finally:
        shutil.rmtree(own, ignore_errors=True)
