"""The stage graph, and how each stage's cache key follows from the artifacts upstream of it.

Both sides use this: the flow to decide whether a stage is cached, the stage process to find its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.artifacts import Manifest, artifact_prefix, cache_key, read_manifest
from stages.config import PipelineConfig
from stages.errors import MissingInput
from stages.store import ArtifactStore

STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "sft": ("prepare",),
    "reward": ("prepare", "sft"),
    "rl": ("prepare", "sft", "reward"),
    "evaluate": ("prepare", "sft", "reward", "rl"),
}
# Algorithms that learn from preferences directly: their policy does not depend on the reward model.
REWARD_FREE = ("dpo",)


def stage_inputs(config: PipelineConfig, stage: str) -> tuple[str, ...]:
    if stage == "rl" and config.rl.algorithm in REWARD_FREE:
        return ("prepare", "sft")
    return STAGE_INPUTS[stage]


@dataclass(frozen=True)
class StagePlan:
    stage: str
    key: str
    inputs: dict[str, tuple[str, Manifest]]  # upstream stage -> (store prefix, manifest)

    @property
    def prefix(self) -> str:
        return artifact_prefix(self.stage, self.key)


def plan_stage(store: ArtifactStore, config: PipelineConfig, stage: str) -> StagePlan:
    """The stage's cache key and its complete inputs; fails if an upstream artifact is missing."""
    inputs: dict[str, tuple[str, Manifest]] = {}
    for upstream in stage_inputs(config, stage):
        plan = plan_stage(store, config, upstream)
        manifest = read_manifest(store, plan.prefix)
        if manifest is None:
            raise MissingInput(
                f"stage {stage}: its input {upstream!r} has not been produced yet (run {upstream} first)"
            )
        inputs[upstream] = (plan.prefix, manifest)
    digests = {name: manifest.digest for name, (_, manifest) in inputs.items()}
    return StagePlan(stage, cache_key(stage, config.stage_sections(stage), digests), inputs)
