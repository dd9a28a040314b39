"""Exact resume, every training stage: a stage SIGKILLed after its first checkpoint and run again ends with exactly
the artifact (the same digest: every file's sha256) of an uninterrupted run, on CPU. The uninterrupted run saves
no checkpoint at all (`run.checkpoint_every` is outside the cache key, so the artifact must not depend on it).

The killed attempt is a real stage process, forked from the launcher's warm interpreter; the uninterrupted run
and the resumed one run in this process, beside upstream artifacts computed once for the module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rlhf_pipeline.stages.core.config_loading import dump_config, load_config
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.runner import run_stage
from tests.conftest import TINY, kill_after_first_checkpoint

pytestmark = pytest.mark.e2e

GROUP_RL = ["num_generations=4", "batch_size=16", "max_steps=6", "lora.r=8", "generation.max_new_tokens=12"]
CASES: dict[str, tuple[str, list[str]]] = {
    "sft": ("sft", []),
    "reward": ("reward", []),
    "reward-multi-aspect": (
        "reward",
        [
            "reward.kind=multi_aspect",
            "data.rated=builtin:demo",
            "data.demo.rated_rows=400",
            "prepare.min_agreement=0.3",
        ],
    ),
    "reward-safety": ("reward", ["data.safety=builtin:demo", "data.demo.safety_rows=400"]),
    "ppo": ("rl", ["rl.algorithm=ppo"]),
    "ppo-lora-kept": ("rl", ["rl.algorithm=ppo", "rl.ppo.lora.r=8", "rl.ppo.lora.merge=false"]),
    "rejection-sampling": ("rl", ["rl.algorithm=rejection_sampling"]),
    "dpo": ("rl", ["rl.algorithm=dpo", "rl.dpo.max_steps=12", "rl.dpo.batch_size=16"]),
    "grpo": ("rl", ["rl.algorithm=grpo", *(f"rl.grpo.{setting}" for setting in GROUP_RL)]),
    "rloo": ("rl", ["rl.algorithm=rloo", *(f"rl.rloo.{setting}" for setting in GROUP_RL)]),
}
CHECKPOINT_EVERY = 3


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """One store for every case's upstream artifacts (content-keyed: each config finds its own)."""
    return tmp_path_factory.mktemp("upstream")


def _config(store: Path, overrides: list[str], checkpoint_every: int):
    return load_config(None, [*TINY, *overrides, f"run.store={store}", f"run.checkpoint_every={checkpoint_every}"])


@pytest.mark.parametrize("case", CASES)
def test_a_killed_and_resumed_stage_ends_with_the_bytes_of_an_uninterrupted_run(case, upstream, tmp_path):
    stage, overrides = CASES[case]
    for before in STAGE_NAMES[: STAGE_NAMES.index(stage)]:
        config = _config(upstream, overrides, 1000)
        run_stage(before, config, LocalStore(upstream))
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    for store in (uninterrupted, resumed):
        shutil.copytree(upstream, store)

    reference, _ = run_stage(stage, _config(uninterrupted, overrides, 1000), LocalStore(uninterrupted))
    config = _config(resumed, overrides, CHECKPOINT_EVERY)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(dump_config(config))
    killed_at = kill_after_first_checkpoint(stage, config_path, resumed / "checkpoints" / stage)
    again, cached = run_stage(stage, config, LocalStore(resumed))

    assert not cached and reference.resumed_from is None
    assert again.resumed_from == killed_at > 0
    assert again.cache_key == reference.cache_key
    assert again.digest == reference.digest, {
        f.path for f in again.files if f.sha256 != {r.path: r.sha256 for r in reference.files}.get(f.path)
    }
