"""Cache keys: a stage's name, resolved config, inputs' digests and code version, and nothing else."""

import shutil
from pathlib import Path

import pytest

from rlhf_pipeline.stages.core import code_version
from rlhf_pipeline.stages.core.artifacts import FileEntry, Manifest, cache_key
from rlhf_pipeline.stages.core.config_loading import load_config, with_data_digests
from rlhf_pipeline.stages.core.planner import key_sections
from rlhf_pipeline.stages.core.registry import STAGE_NAMES, STAGES


def test_key_depends_on_every_ingredient():
    base = cache_key("sft", {"lr": 1}, {"prepare": "d1"}, "code")
    assert base == cache_key("sft", {"lr": 1}, {"prepare": "d1"}, "code")
    assert base != cache_key("reward", {"lr": 1}, {"prepare": "d1"}, "code")
    assert base != cache_key("sft", {"lr": 2}, {"prepare": "d1"}, "code")
    assert base != cache_key("sft", {"lr": 1}, {"prepare": "d2"}, "code")
    assert base != cache_key("sft", {"lr": 1}, {"prepare": "d1"}, "other-code")


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the stages package whose files a test may edit; code versions are read from it."""
    root = tmp_path / "stages"
    shutil.copytree(code_version.ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_version, "ROOT", root)
    code_version.imported_modules.cache_clear()
    yield root
    code_version.imported_modules.cache_clear()


def versions(config) -> dict[str, str]:
    code_version.imported_modules.cache_clear()
    return {name: code_version.code_version(STAGES[name].modules_for(config)) for name in STAGE_NAMES}


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit\n")


@pytest.mark.parametrize(
    ("edited", "changed"),
    [
        ("tools/chat.py", set()),
        ("tools/validate.py", set()),
        ("core/plots.py", set()),  # figures and model cards lie outside the digest
        ("modeling/model_card.py", set()),
        ("rlhf/ppo_math.py", {"rl"}),  # evaluate then reruns on the new rl artifact's digest
        ("rlhf/grpo_rloo.py", set()),  # the config's algorithm is ppo
        ("rlhf/dpo.py", set()),
        ("data/formats/imdb.py", {"prepare"}),
        ("sft.py", {"sft"}),
        ("core/config.py", set(STAGE_NAMES)),
    ],
)
def test_an_edit_changes_the_code_version_of_the_stages_that_run_it(package_copy, edited, changed):
    config = load_config(None)
    before = versions(config)
    edit(package_copy / edited)
    after = versions(config)
    assert {name for name in STAGE_NAMES if before[name] != after[name]} == changed


def test_flows_is_in_no_stage_code_version(package_copy):
    closure = code_version.import_closure(
        m for name in STAGE_NAMES for m in STAGES[name].modules_for(load_config(None))
    )
    assert all(module.startswith("rlhf_pipeline.stages") for module in closure)
    assert "rlhf_pipeline.stages.tools.chat" not in closure
    assert {"rlhf_pipeline.stages.rlhf.ppo", "rlhf_pipeline.stages.core.config"} <= closure


def test_the_algorithm_chosen_decides_which_module_is_in_the_rl_version(package_copy):
    grpo = load_config(None, ["rl.algorithm=grpo"])
    before = versions(grpo)
    edit(package_copy / "rlhf/grpo_rloo.py")
    assert versions(grpo)["rl"] != before["rl"]
    before = versions(grpo)
    edit(package_copy / "rlhf/ppo.py")
    assert versions(grpo) == before


def test_a_stage_keys_only_on_its_own_sections():
    ppo = load_config(None)
    rejection = load_config(None, ["rl.algorithm=rejection_sampling"])
    for stage in ("prepare", "sft", "reward"):
        assert key_sections(ppo, stage) == key_sections(rejection, stage)
    assert key_sections(ppo, "rl") != key_sections(rejection, "rl")
    moved_store = load_config(None, ["run.store=/elsewhere", "run.checkpoint_every=7"])
    assert all(key_sections(ppo, s) == key_sections(moved_store, s) for s in ("prepare", "sft", "rl"))
    assert key_sections(ppo, "sft") != key_sections(load_config(None, ["run.seed=1"]), "sft")


def test_a_data_file_changed_in_place_is_prepared_again(tmp_path):
    """prepare's key holds its sources' paths; the config a run stores for its stages (`with_data_digests`)
    adds each local file's digest, so that new bytes under the old name are not taken for the rows prepared
    before. The same bytes elsewhere (another machine's copy, under the same path) keep the key."""
    rows = tmp_path / "sft.jsonl"
    row = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "%s"}]}\n'
    config = load_config(None, [f"data.sft={rows}"])

    def prepare_key() -> dict:
        return key_sections(with_data_digests(config), "prepare")

    rows.write_text(row % "a")
    before = prepare_key()
    assert prepare_key() == before
    rows.write_text(row % "b")
    assert prepare_key() != before
    rows.write_text(row % "a")
    assert prepare_key() == before
    assert with_data_digests(config).data.prompts[0].digest is None  # builtin:demo


def test_rl_keys_only_on_the_chosen_algorithms_section():
    ppo = load_config(None)
    assert key_sections(ppo, "rl") == key_sections(load_config(None, ["rl.grpo.learning_rate=0.5"]), "rl")
    assert key_sections(ppo, "rl") != key_sections(load_config(None, ["rl.ppo.learning_rate=0.5"]), "rl")
    assert set(key_sections(ppo, "rl")["rl"]) == {"algorithm", "ppo"}


def test_digest_covers_content_not_timestamps():
    files = [FileEntry(path="a", size=1, sha256="x")]
    first = Manifest(stage="s", cache_key="k", code_version="c", config={}, files=files, created_at="2020")
    second = Manifest(stage="s", cache_key="k", code_version="c", config={}, files=files, created_at="2030")
    changed = Manifest(
        stage="s", cache_key="k", code_version="c", config={}, files=[FileEntry(path="a", size=1, sha256="y")]
    )
    assert first.digest == second.digest != changed.digest


def test_digest_leaves_out_logs_figures_and_the_model_card():
    files = [FileEntry(path="model.safetensors", size=1, sha256="x")]
    extra = [FileEntry(path=path, size=1, sha256="y") for path in ("logs/curves.png", "plots/rewards.png", "README.md")]
    bare = Manifest(stage="s", cache_key="k", config={}, files=files)
    documented = Manifest(stage="s", cache_key="k", config={}, files=files + extra)
    nested_card = FileEntry(path="per_aspect/README.md", size=1, sha256="y")
    nested = Manifest(stage="s", cache_key="k", config={}, files=[*files, nested_card])
    assert bare.digest == documented.digest != nested.digest


def test_a_methods_branch_keys_as_a_run_of_that_method_alone():
    several = load_config(None, ["rl.algorithm=[ppo, dpo]", "rl.dpo.beta=0.2"])
    for method in ("ppo", "dpo"):
        alone = load_config(None, [f"rl.algorithm={method}", "rl.dpo.beta=0.2"])
        for stage in ("rl", "evaluate"):
            assert key_sections(several.for_method(method), stage) == key_sections(alone, stage)
            assert STAGES[stage].modules_for(several.for_method(method)) == STAGES[stage].modules_for(alone)
    for stage in ("prepare", "sft", "reward"):  # shared: keyed as in a run of one method
        assert key_sections(several, stage) == key_sections(load_config(None, []), stage)


def test_ppo_is_keyed_alike_on_any_number_of_processes_and_a_trainers_batch_is_not():
    """PPO trains the one-process model on any number of processes, nodes or shards (the same rollouts, sums in
    another order): one key, so that a run resumes, or is reused, on another count. A Trainer's batch is per
    process: more processes train another model."""

    def key(stage: str, *overrides: str) -> dict:
        return key_sections(load_config(None, list(overrides)), stage)

    one = key("rl")
    for layout in (["processes=2"], ["processes=2", "nodes=2"], ["gpus=8"]):
        several = [f"deploy.stages.rl.{setting}" for setting in layout]
        assert key("rl", *several) == key("rl", *several, "rl.distributed.strategy=fsdp") == one
    dpo = "rl.algorithm=dpo"
    assert key("rl", dpo, "deploy.stages.rl.processes=2")["processes"] == 2
    assert key("rl", dpo, "deploy.stages.rl.processes=2", "deploy.stages.rl.nodes=2")["processes"] == 4
    assert key("sft", "deploy.stages.sft.processes=4") == key(
        "sft", "deploy.stages.sft.processes=2", "deploy.stages.sft.nodes=2"
    )
    assert "processes" not in key("sft")  # the keys of one-process runs are what they were
