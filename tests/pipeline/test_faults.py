"""Faults a long run meets, done for real: the S3 server restarted under a running stage (localbucket keeps its
objects on disk, so it comes back with them), with and without the store's retries; two runs of one config at
once on one store."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from rlhf_pipeline.stages.core.artifacts import fetch_dir, read_manifest
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from tests.conftest import RLHF, TINY, LocalBucketServer, artifact_key, rlhf, tiny_args

pytestmark = pytest.mark.e2e

OUTAGE_SECONDS = 6


def _stage_config(tmp_path: Path, bucket: str, *overrides: str):
    config = load_config(
        None, [*TINY, f"run.store=s3://{bucket}/faults", "run.checkpoint_every=5", "sft.max_steps=30", *overrides]
    )
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    return config, path


def _restart_during_checkpoints(server: LocalBucketServer, bucket: str, sft: subprocess.Popen) -> bool:
    """Stop the server once the stage has saved its first checkpoint, start it again OUTAGE_SECONDS later;
    whether the stage was still running when the server came back."""
    checkpoints = server.data_dir / bucket / "faults" / "checkpoints" / "sft"
    deadline = time.monotonic() + 300
    while not checkpoints.exists() and sft.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoints.exists(), "the stage saved no checkpoint"
    server.stop()
    time.sleep(OUTAGE_SECONDS)
    running = sft.poll() is None
    server.start()
    return running


@pytest.mark.parametrize(("retries", "completes"), [(10, True), (1, False)])
def test_a_stage_rides_out_an_s3_server_restart(localbucket, localbucket_bucket, tmp_path, retries, completes):
    """With the store's retries the `sft` stage waits for the server and publishes an artifact that verifies;
    with one attempt per request (no retries) the same outage kills the stage."""
    config, path = _stage_config(tmp_path, localbucket_bucket, f"run.store_retries={retries}")
    assert rlhf("stage", "prepare", "--config", str(path)).returncode == 0
    sft = subprocess.Popen(
        [RLHF, "stage", "sft", "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        still_running = _restart_during_checkpoints(localbucket, localbucket_bucket, sft)
        output, _ = sft.communicate(timeout=300)
    finally:
        if sft.poll() is None:
            sft.kill()
    store = config.run.open_store()
    prefix = plan_stage(store, config, "sft").prefix
    if completes:
        assert still_running, output[-3000:]
        assert sft.returncode == 0, output[-3000:]
        manifest = fetch_dir(store, prefix, tmp_path / "sft")  # every file verifies
        assert manifest.metrics["steps"] == 30
    else:
        assert sft.returncode != 0 and "endpoint URL" in output, output[-3000:]  # connection refused or cut
        assert read_manifest(store, prefix) is None


RACE = ("sft.max_steps=40", "reward.max_steps=20", "rl.ppo.steps=4", "run.checkpoint_every=5")


def test_two_runs_of_one_config_at_once_both_finish_on_one_artifact_each(prefect_api, tmp_path, localbucket_bucket):
    """Two users start the same run on one store at the same moment: both stage processes train and race to
    publish (checkpoints too). Both runs complete with the same artifacts; each artifact holds one attempt's
    files only (the loser removed its upload), every file verifies, and no checkpoint is left behind. On an S3
    server; what differs between stores, the atomic create of a manifest, is raced on each in test_store."""
    uri = f"s3://{localbucket_bucket}/race"
    command = [RLHF, "run", "--store", uri, "--json", *tiny_args(*RACE)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    for run, (_, stderr), summary in zip(runs, outputs, summaries, strict=True):
        assert run.returncode == 0 and summary["status"] == "completed", stderr[-3000:]
    artifacts = [{name: s["artifact"] for name, s in summary["stages"].items()} for summary in summaries]
    assert artifacts[0] == artifacts[1]
    both_ran = [n for n in STAGE_NAMES if all(s["stages"][n]["status"] == "ran" for s in summaries)]
    assert "sft" in both_ran  # they did race: each trained sft and published it
    config = load_config(None, [*TINY, *RACE, f"run.store={uri}"])
    store = config.run.open_store()
    for stage in STAGE_NAMES:
        prefix = artifact_key(store, artifacts[0][stage])
        manifest = fetch_dir(store, prefix, tmp_path / "fetched" / stage)  # every file verifies
        assert sorted(store.list_children(prefix)) == sorted([manifest.files_at, "manifest.json"])
    assert store.list_children("checkpoints/sft") == store.list_children("checkpoints/rl") == []
