"""Runs one stage inside its own process: find inputs, skip if cached, train, publish the artifact.

This is what `rlhf stage NAME` executes, locally or in the stage's container.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from rlhf_pipeline.stages.core.artifacts import (
    CURVES_FILE,
    LOGS_DIR,
    InputRef,
    Manifest,
    publish_dir,
    read_manifest,
)
from rlhf_pipeline.stages.core.checkpoints import CheckpointStore
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.planner import StagePlan, key_sections, plan_stage
from rlhf_pipeline.stages.core.plots import save_curves
from rlhf_pipeline.stages.core.progress import METRICS_HISTORY, is_main_process
from rlhf_pipeline.stages.core.registry import STAGES
from rlhf_pipeline.stages.core.store import ArtifactStore
from rlhf_pipeline.stages.core.work_area import work_directory
from rlhf_pipeline.stages.modeling.lora import fetch_artifacts
from rlhf_pipeline.stages.modeling.model_card import write_model_card
from rlhf_pipeline.stages.modeling.stage_context import StageContext

log = logging.getLogger("rlhf.stage")


def base_model_dir(config: PipelineConfig, work_dir: Path) -> str:
    """The base model as a local directory, for a kept adapter that names it; loading imports torch, which
    only such stages pay."""
    from rlhf_pipeline.stages.modeling.loading import materialize_base

    return materialize_base(config.model, config.run.seed, work_dir)


def published_artifact(store: ArtifactStore, config: PipelineConfig, stage: str, plan: StagePlan) -> Manifest | None:
    """The stage's artifact if the store holds it. Of several processes, each finds what the main one found
    (`data_parallel.main_process_decides`, which imports torch: only such stages pay for it)."""
    existing = read_manifest(store, plan.prefix)
    if not several_processes():
        return existing
    from rlhf_pipeline.stages.modeling.data_parallel import main_process_decides

    if not main_process_decides(f"{stage}/cached", existing is not None, config.deploy.collective_timeout(stage)):
        return None
    return existing or read_manifest(store, plan.prefix)  # published after this process looked


def save_metrics_history(stage: str, out_dir: Path) -> None:
    """The metrics the stage reported while training, as rows and as curves, kept in its artifact."""
    if not METRICS_HISTORY:
        return
    (out_dir / LOGS_DIR).mkdir(exist_ok=True)
    with (out_dir / LOGS_DIR / "metrics-history.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in METRICS_HISTORY)
    save_curves(METRICS_HISTORY, f"{stage}: training metrics", out_dir / CURVES_FILE)


def stage_context(
    stage: str, config: PipelineConfig, store: ArtifactStore, plan: StagePlan, work_dir: Path
) -> StageContext:
    """The stage's inputs downloaded (and verified) into `work_dir`, kept adapters pointed at their bases."""
    inputs = fetch_artifacts(
        {name: (store, prefix) for name, (prefix, _) in plan.inputs.items()},
        work_dir / "inputs",
        lambda: base_model_dir(config, work_dir),
    )
    ctx = StageContext(
        stage=stage,
        config=config,
        plan=plan,
        work_dir=work_dir,
        out_dir=work_dir / "artifact",
        inputs=inputs,
        checkpoints=CheckpointStore(store, stage, plan.key, config.run.keep_checkpoints),
        licenses={license for _, m in plan.inputs.values() for license in m.licenses},
    )
    ctx.out_dir.mkdir()
    return ctx


def several_processes() -> bool:
    """Whether this is one of a stage's several processes (under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_stage(stage: str, config: PipelineConfig, store: ArtifactStore) -> tuple[Manifest | None, bool]:
    """Returns the stage's manifest and whether it was already in the store (cached). Of several training
    processes only the main one publishes; the others return no manifest. The exception that ends one of them
    is recorded for torchrun (torch's `record`, which imports torch: only such stages pay for it), whose report
    of the process that failed first then names it (`modeling.torchrun`)."""
    if not several_processes():
        return run_stage_here(stage, config, store)
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(run_stage_here)(stage, config, store)


def run_stage_here(stage: str, config: PipelineConfig, store: ArtifactStore) -> tuple[Manifest | None, bool]:
    plan = plan_stage(store, config, stage)
    existing = published_artifact(store, config, stage, plan)
    if existing is not None:
        log.info("%s: cached at %s", stage, store.uri_of(plan.prefix))
        return existing, True
    module = importlib.import_module(STAGES[stage].program)
    with work_directory(stage) as tmp:
        ctx = stage_context(stage, config, store, plan, tmp)
        log.info("%s: running, artifact %s", stage, store.uri_of(plan.prefix))
        METRICS_HISTORY.clear()
        metrics: dict[str, Any] = module.run(ctx)
        if not is_main_process():
            return None, False
        save_metrics_history(stage, ctx.out_dir)
        write_model_card(config, plan, ctx.out_dir, metrics)
        manifest = publish_dir(
            store,
            ctx.out_dir,
            plan.prefix,
            {
                "stage": stage,
                "cache_key": plan.key,
                "code_version": plan.code_version,
                "config": key_sections(config, stage),
                "inputs": {
                    name: InputRef(uri=store.uri_of(prefix), digest=m.digest)
                    for name, (prefix, m) in plan.inputs.items()
                },
                "metrics": metrics,
                "resumed_from": ctx.resumed_from,
                "licenses": sorted(ctx.licenses),
            },
        )
        ctx.checkpoints.clear()
    log.info("%s: done, metrics %s", stage, metrics)
    return manifest, False
