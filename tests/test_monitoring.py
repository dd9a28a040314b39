"""What a watched run shows in Prefect, read back through the API of the session's Prefect server: stage task
runs tagged with the config's hash and the model, live progress and metrics tables per training stage,
`rlhf.metrics` events, and the evaluation report as Markdown."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter

from flows.pipeline import run_pipeline
from stages.config import load_config
from tests.conftest import TINY, rlhf

SHORT = ["sft.max_steps=20", "reward.max_steps=20", "rl.ppo.steps=4", "evaluate.prompts=16"]


def test_a_run_shows_progress_metrics_events_and_the_report(prefect_api, tmp_path):
    config = load_config(None, [*TINY, *SHORT, f"run.store={tmp_path / 'store'}"])
    started = datetime.now(UTC).isoformat()
    summary = run_pipeline(config)
    assert summary["status"] == "completed"

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name={"any_": [summary["run_id"]]}))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id={"any_": [flow_run.id]}))
    stages = {run.name: run for run in task_runs}
    assert set(stages) == {"prepare", "sft", "reward", "rl", "evaluate"}
    assert all("model:builtin:tiny-llama" in run.tags for run in stages.values())
    assert all(any(tag.startswith("config:") for tag in run.tags) for run in stages.values())

    by_key = {}
    for artifact in artifacts:
        by_key.setdefault(artifact.key, []).append(artifact)
    for stage in ("sft", "reward", "rl"):
        (progress,) = by_key[f"{stage}-progress"]
        assert progress.type == "progress" and float(progress.data) == 100.0
        assert progress.task_run_id == stages[stage].id
        (table,) = by_key[f"{stage}-metrics"]
        rows = json.loads(table.data)
        assert rows and all("step" in row for row in rows)
    sft_rows = json.loads(by_key["sft-metrics"][0].data)
    losses = [row["loss"] for row in sft_rows if row.get("loss") is not None]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # the table shows SFT learning
    rl_rows = json.loads(by_key["rl-metrics"][0].data)
    assert [row["step"] for row in rl_rows] == [1, 2, 3, 4] and all("kl" in row for row in rl_rows)
    (report,) = by_key["evaluation-report"]
    assert report.type == "markdown"
    win_rate = summary["stages"]["evaluate"]["metrics"]["win_rate_vs_sft"]
    headlines = [f"win rate of RL over SFT: **{win_rate:.3f}**", "reward model held-out accuracy", "## Side by side"]
    assert all(headline in report.data for headline in headlines)

    events = _events_named("rlhf.metrics", since=started, expected=len(sft_rows) + len(rl_rows))
    resources = {event["resource"]["prefect.resource.id"] for event in events}
    assert {"rlhf.stage.sft", "rlhf.stage.reward", "rlhf.stage.rl"} <= resources
    rl_events = [event for event in events if event["resource"]["prefect.resource.id"] == "rlhf.stage.rl"]
    assert rl_events and all("kl" in event["payload"] for event in rl_events)


def _events_named(name: str, since: str, expected: int, timeout: float = 30) -> list[dict]:
    """Events are persisted asynchronously by the server; poll until at least `expected` arrived."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            response = client.request(
                "POST",
                "/events/filter",
                json={"filter": {"event": {"name": [name]}, "occurred": {"since": since}}, "limit": 50},
            )
        events = response.json()["events"]
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(1)


def test_runs_and_show_read_the_runs_of_a_store(prefect_api, tmp_path):
    store = tmp_path / "store"
    config = load_config(None, [*TINY, *SHORT, f"run.store={store}"])
    summary = run_pipeline(config)
    accuracy = summary["stages"]["reward"]["metrics"]["eval_accuracy"]
    win_rate = summary["stages"]["evaluate"]["metrics"]["win_rate_vs_sft"]

    listed = rlhf("runs", "--store", str(store), timeout=60)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert line.startswith(summary["run_id"]) and " completed " in line
    assert f"reward accuracy {accuracy:.3f}, win rate vs SFT {win_rate:.3f}" in line

    shown = rlhf("show", summary["run_id"], "--store", str(store), "--json", timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout) == summary
    missing = rlhf("show", "no-such-run", "--store", str(store), timeout=60)
    assert missing.returncode == 2 and "no finished run 'no-such-run'" in missing.stderr
    assert "Traceback" not in missing.stderr
