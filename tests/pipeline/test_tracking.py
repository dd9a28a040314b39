"""`run.report_to`: the training stages report to experiment trackers as the HF Trainer does; TensorBoard's event
files land in the artifact, hold the same numbers as the stage's metrics, and change no cache key."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_pipeline.stages.core.artifacts import FileEntry, Manifest
from rlhf_pipeline.stages.core.config import PipelineConfig
from rlhf_pipeline.stages.core.config_loading import load_config
from rlhf_pipeline.stages.core.errors import InputError
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.progress import PREFIX
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.runner import run_stage
from tests.conftest import TINY

SHORT = ["sft.max_steps=20", "sft.logging_steps=5", "reward.max_steps=8", "rl.ppo.steps=3"]


def _scalars(logs: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files of one directory: {tag: {step: value}}."""
    events = EventAccumulator(str(logs))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _reported(output: str, stage: str) -> dict[int, dict[str, float]]:
    """The metrics a stage printed for the orchestrator's metrics table: {step: metrics}."""
    events = [json.loads(line.removeprefix(PREFIX)) for line in output.splitlines() if line.startswith(PREFIX)]
    reported: dict[int, dict[str, float]] = {}
    for event in events:
        if event["kind"] == "metrics" and event["stage"] == stage:
            reported.setdefault(event["step"], {}).update(event["metrics"])
    return reported


def _config(store: LocalStore, *overrides: str) -> PipelineConfig:
    return load_config(None, [*TINY, *SHORT, f"run.store={store.uri}", *overrides])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[LocalStore, dict[str, Manifest], str]:
    """prepare, sft and the reward model of the tiny pipeline reporting to TensorBoard, and what they printed."""
    store = LocalStore(tmp_path_factory.mktemp("tracking") / "store")
    config = _config(store, "run.report_to=[tensorboard]")
    with contextlib.redirect_stdout(io.StringIO()) as output:
        manifests = {stage: run_stage(stage, config, store)[0] for stage in ("prepare", "sft", "reward")}
    return store, manifests, output.getvalue()


def _files_of(store: LocalStore, manifest) -> Path:
    """Where a local store keeps the artifact's files: the folder of the attempt that published it."""
    return store.root / "artifacts" / manifest.stage / manifest.cache_key / manifest.files_at


def test_trainer_events_land_in_the_artifact_and_match_the_metrics_table(tracked):
    store, manifests, output = tracked
    sft = _scalars(_files_of(store, manifests["sft"]) / "logs")
    losses = {step: m["loss"] for step, m in _reported(output, "sft").items() if "loss" in m}
    assert sorted(losses) == [5, 10, 15, 20]
    assert sft["train/loss"] == pytest.approx(losses, abs=1e-6)
    assert sft["train/loss"][5] == pytest.approx(manifests["sft"].metrics["first_loss"], abs=1e-4)
    assert sft["eval/loss"] == {20: pytest.approx(manifests["sft"].metrics["eval_loss"], abs=1e-4)}
    reward = _scalars(_files_of(store, manifests["reward"]) / "logs")
    assert reward["eval/loss"] == {8: pytest.approx(manifests["reward"].metrics["eval_loss"], abs=1e-4)}
    # The stage's eval_accuracy is measured through the scoring path every later stage uses, pair by pair;
    # TRL's logged accuracy is a mean of per-batch means over the same pairs, so the two differ only slightly.
    assert reward["eval/accuracy"][8] == pytest.approx(manifests["reward"].metrics["eval_accuracy"], abs=0.03)


def test_ppo_steps_reach_tensorboard_and_trackers_change_no_cache_key(tracked):
    store = tracked[0]
    plain, config = _config(store), _config(store, "run.report_to=[tensorboard]")
    manifest = run_stage("rl", config, store)[0]
    rl_dir = _files_of(store, manifest)
    history = [json.loads(line) for line in (rl_dir / "ppo_history.jsonl").read_text().splitlines()]
    ppo = _scalars(rl_dir / "logs")
    for key in ("score", "kl", "policy_loss", "value_loss"):
        assert ppo[f"train/{key}"] == pytest.approx({h["step"]: h[key] for h in history}, abs=1e-4)
    for stage in ("prepare", "sft", "reward", "rl"):
        assert plan_stage(store, plain, stage).key == plan_stage(store, config, stage).key
    assert run_stage("rl", plain, store)[1]  # cached: trackers are no part of what a stage produces


def test_rejection_sampling_reports_each_round(tracked):
    store = tracked[0]
    config = _config(store, "run.report_to=[tensorboard]", "rl.algorithm=rejection_sampling")
    rl_dir = _files_of(store, run_stage("rl", config, store)[0])
    rounds = [json.loads(line) for line in (rl_dir / "rounds.jsonl").read_text().splitlines()]
    scalars = _scalars(rl_dir / "logs")
    assert scalars["train/score"] == pytest.approx({r["round"]: r["score"] for r in rounds}, abs=1e-6)
    assert scalars["train/best_score"] == pytest.approx({r["round"]: r["best_score"] for r in rounds}, abs=1e-6)
    assert scalars["train/samples_kept"] == {1: 16, 2: 16}


def test_logs_are_outside_the_digest_downstream_stages_key_on():
    model = FileEntry(path="model.safetensors", size=1, sha256="x")
    events = FileEntry(path="logs/events.out.tfevents.1.host", size=1, sha256="y")
    plain = Manifest(stage="sft", cache_key="k", code_version="c", config={}, files=[model])
    tracked = Manifest(stage="sft", cache_key="k", code_version="c", config={}, files=[model, events])
    assert plain.digest == tracked.digest


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_without_its_package_stops_the_stage_before_training(tmp_path):
    store = LocalStore(tmp_path / "store")
    config = load_config(None, [*TINY, f"run.store={store.uri}", "run.report_to=[wandb]"])
    run_stage("prepare", config, store)
    with pytest.raises(InputError, match=r"run.report_to: wandb not installed"):
        run_stage("sft", config, store)
