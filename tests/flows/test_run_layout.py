"""The steps a run runs, named once for the flow, its summary and the terminal."""

from rlhf_pipeline.flows.pipeline import run_layout, step_configs, step_labels
from rlhf_pipeline.stages.core.config_loading import load_config, read_config
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from rlhf_pipeline.stages.core.store import ArtifactStore


def test_one_method_runs_each_stage_once_from_the_runs_config(tmp_path):
    config = load_config(None)
    assert step_labels(config) == list(STAGE_NAMES)
    assert all(step.method is None and step.label == step.stage for step in run_layout(config))
    configs = step_configs(ArtifactStore.from_uri(str(tmp_path)), config, "the/run/config.yaml", "r1")
    assert list(configs) == [None] and configs[None].uri == "the/run/config.yaml"
    assert not (tmp_path / "runs").exists()


def test_several_methods_run_shared_stages_then_one_branch_per_method(tmp_path):
    config = load_config(None, ["rl.algorithm=[dpo, ppo]"])
    assert step_labels(config) == ["prepare", "sft", "reward", "rl:dpo", "evaluate:dpo", "rl:ppo", "evaluate:ppo"]
    assert [step.method for step in run_layout(config)] == [None, None, None, "dpo", "dpo", "ppo", "ppo"]
    store = ArtifactStore.from_uri(str(tmp_path))
    configs = step_configs(store, config, "the/run/config.yaml", "r1")
    assert list(configs) == [None, "dpo", "ppo"]
    for method in ("dpo", "ppo"):
        assert configs[method].uri == store.uri_of(f"runs/r1/config.{method}.yaml")
        assert read_config(configs[method].uri).rl.method == configs[method].config.rl.method == method
