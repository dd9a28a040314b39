"""One stage as its own Prefect flow: what a stage deployment runs in the stage's container, pod or process.

The flow starts the stage's program (`rlhf stage NAME --config URI`); its Completed state's message is the
URI of the artifact the stage published, which the pipeline's launcher reads back.
A stage that rejects its config or data ends in a Failed state named `InputError`, which the pipeline does not
retry (nor `DamagedInput`: an input failed verification, and its producer runs again first); any other
failure, or a container that dies, is retried by the pipeline and resumes from a checkpoint.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from rlhf_pipeline.flows.launchers.launcher import (
    DAMAGED_INPUT_STATE,
    INPUT_ERROR_STATE,
    STAGE_FLOW,
    StageInputDamaged,
    StageInputError,
    published,
)
from rlhf_pipeline.flows.launchers.process import ProcessLauncher
from rlhf_pipeline.stages.core.config_loading import read_config
from rlhf_pipeline.stages.core.planner import plan_stage


def _flow_run_name() -> str:
    return flow_run.parameters.get("label") or flow_run.parameters["stage"]


@flow(name=STAGE_FLOW, flow_run_name=_flow_run_name, persist_result=False)
def rlhf_stage(stage: str, config_uri: str, label: str | None = None):
    """`label`: the step's name in the pipeline where it differs from the stage's (a method's branch: `rl:ppo`)."""
    try:
        ProcessLauncher(warm=False).launch(stage, config_uri, get_run_logger(), label)
    except StageInputError as exc:
        return Failed(name=INPUT_ERROR_STATE, message=str(exc))
    except StageInputDamaged as exc:
        return Failed(name=DAMAGED_INPUT_STATE, message=str(exc))
    config = read_config(config_uri)
    store = config.run.open_store()
    prefix = plan_stage(store, config, stage).prefix
    published(store, stage, prefix)
    return Completed(message=store.uri_of(prefix))
