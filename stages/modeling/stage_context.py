"""What a stage program receives from the runner: its config and plan, its inputs fetched and verified, its work
and output directories, its checkpoints in the store, and, on first use, its torch device."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_pipeline.stages.core.artifacts import Manifest
from rlhf_pipeline.stages.core.checkpoints import CheckpointStore
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.planner import StagePlan

if TYPE_CHECKING:
    import torch


@dataclass
class StageContext:
    """Everything a stage's `run` needs; it writes its artifact's files into `out_dir`."""

    stage: str
    config: PipelineConfig
    plan: StagePlan
    work_dir: Path
    out_dir: Path
    inputs: dict[str, Path]
    checkpoints: CheckpointStore
    resumed_from: int | None = field(default=None)
    licenses: set[str] = field(default_factory=set)

    @cached_property
    def device(self) -> torch.device:
        """Opened on first use, so that torch is imported only by the stages that train or generate (not
        `prepare`): loading imports it."""
        from rlhf_pipeline.stages.modeling.loading import init_torch

        return init_torch(self.config.run)

    @property
    def collective_timeout(self) -> timedelta:
        return self.config.deploy.collective_timeout(self.stage)

    def input_manifest(self, name: str) -> Manifest:
        return self.plan.inputs[name][1]
