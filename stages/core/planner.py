"""The stage graph, and how each stage's cache key follows from the artifacts upstream of it.

Both sides use this: the flow to decide whether a stage is cached, the stage process to find its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.stages.core.artifacts import Manifest, artifact_prefix, cache_key, read_manifest
from rlhf_pipeline.stages.core.code_version import code_version
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.errors import MissingInput
from rlhf_pipeline.stages.core.registry import ALGORITHMS, STAGES
from rlhf_pipeline.stages.core.store import ArtifactStore


def key_sections(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """The parts of the config a stage's output depends on: what goes into its cache key."""
    dumped = config.model_dump(mode="json")
    # Several data-parallel processes multiply the batch a Trainer's step trains on: a different model.
    processes = config.deploy.world_size(stage)
    if "rl" in STAGES[stage].sections:
        # Only the chosen algorithm's section, so that editing another's settings reruns nothing.
        method = config.rl.method
        rl = {"algorithm": method, method: dumped["rl"][method]}
        if ALGORITHMS[method].any_process_count:
            processes = 1  # keyed as one process: a run may resume, or be reused, on any number of them
        elif processes > 1 and config.rl.distributed.strategy != "ddp":  # sums in another order
            rl["distributed"] = dumped["rl"]["distributed"]
        dumped["rl"] = rl
    if stage in ("sft", "reward") and processes == 1:  # how several processes hold the model: moot for one
        dumped[stage].pop("distributed")
    sections = {"seed": config.run.seed} | {name: dumped[name] for name in STAGES[stage].sections}
    return sections | ({"processes": processes} if processes > 1 else {})


@dataclass(frozen=True)
class StagePlan:
    stage: str
    key: str
    code_version: str  # of the modules the stage runs
    inputs: dict[str, tuple[str, Manifest]]  # upstream stage -> (store prefix, manifest)

    @property
    def prefix(self) -> str:
        return artifact_prefix(self.stage, self.key)


def plan_stage(store: ArtifactStore, config: PipelineConfig, stage: str) -> StagePlan:
    """The stage's cache key and its complete inputs; fails if an upstream artifact is missing."""
    return _plan(store, config, stage, {})


def _plan(
    store: ArtifactStore, config: PipelineConfig, stage: str, known: dict[str, tuple[StagePlan, Manifest | None]]
) -> StagePlan:
    """plan_stage with the stages already planned on the way (`known`: each one's plan and manifest), so that
    a stage reached along two paths (sft, under reward and under rl) is planned and its manifest read once."""
    inputs: dict[str, tuple[str, Manifest]] = {}
    for upstream in STAGES[stage].inputs_for(config):
        if upstream not in known:
            plan = _plan(store, config, upstream, known)
            known[upstream] = (plan, read_manifest(store, plan.prefix))
        plan, manifest = known[upstream]
        if manifest is None:
            raise MissingInput(
                f"stage {stage}: its input {upstream!r} has not been produced yet (run {upstream} first)"
            )
        inputs[upstream] = (plan.prefix, manifest)
    digests = {name: manifest.digest for name, (_, manifest) in inputs.items()}
    code = code_version(STAGES[stage].modules_for(config))
    return StagePlan(stage, cache_key(stage, key_sections(config, stage), digests, code), code, inputs)
