"""What every launcher promises: `launch` returns when the stage succeeded, and says how it failed otherwise."""

from __future__ import annotations

import logging
from typing import Protocol

from rlhf_pipeline.stages.core.artifacts import Manifest, read_manifest
from rlhf_pipeline.stages.core.store import ArtifactStore

# The names of a stage flow run's Failed state when its input was rejected, or found damaged in the store.
INPUT_ERROR_STATE = "InputError"
DAMAGED_INPUT_STATE = "DamagedInput"
STAGE_FLOW = "rlhf-stage"


class StageInputError(Exception):
    """The stage rejected its config or data: retrying cannot help."""


class StageInputDamaged(Exception):
    """An input artifact of the stage failed verification and was set aside: its producer must run again
    first; retrying this stage cannot help."""


class StageCrashed(Exception):
    """The stage's process died (killed, OOM, a bug, a lost node): worth retrying, it resumes."""


class Launcher(Protocol):
    def launch(
        self, stage: str, config_uri: str, logger: logging.Logger | logging.LoggerAdapter, label: str | None = None
    ) -> None:
        """`label`: the step's name where it differs from the stage's (a method's branch: `rl:ppo`)."""
        ...


def published(store: ArtifactStore, stage: str, prefix: str) -> Manifest:
    """The manifest a stage that exited cleanly must have published: a launch that left none is a crash."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise StageCrashed(f"stage {stage} exited cleanly but published no artifact")
    return manifest
