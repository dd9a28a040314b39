"""How a stage's program gets started. The pipeline only needs `launch` to run `rlhf stage NAME --config URI`
somewhere and report how it ended; the process launcher is the local stand-in for a stage's container."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Protocol

EXIT_INPUT_ERROR = 2


class StageInputError(Exception):
    """The stage rejected its config or data: retrying cannot help."""


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


class ProcessLauncher:
    """Each stage in its own OS process; its output goes line by line to the stage run's logger."""

    def launch(self, stage: str, config_uri: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        command = [*rlhf_command(), "stage", stage, "--config", config_uri]
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        logger.info("launching: %s", " ".join(command))
        tail: deque[str] = deque(maxlen=5)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            logger.info("stage process pid %d", proc.pid)
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    tail.append(line)
                    logger.info(line)
            code = proc.wait()
        if code == 0:
            return
        if code == EXIT_INPUT_ERROR:
            raise StageInputError(tail[-1] if tail else f"{stage}: bad input")
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise StageCrashed(f"stage {stage} {how}: {tail[-1] if tail else 'no output'}")
