"""A run as a person watches it. `rlhf ui` starts a real Prefect server (`prefect server start`, with its UI) on
127.0.0.1; one tiny `rlhf run` against it is then read back through the API (stage runs tagged with the config's
hash and the model, live progress, metrics tables, `rlhf.metrics` events, metric curves, the evaluation report
with its pictures), its terminal output is checked (live stage lines, the final table), its flow-run page is
opened in headless Chromium (a screenshot is kept in .test-artifacts/), and `rlhf runs`/`rlhf show` read it
from the store. The server is stopped by its PID."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import REPO, RLHF, free_port, rlhf, stop, tiny_args, wait_for_health

SHORT = ["sft.max_steps=20", "reward.max_steps=20", "rl.ppo.steps=4", "evaluate.prompts=16"]
TRAINING_STAGES = ("sft", "reward", "rl")
ARTIFACTS = Path(os.environ.get("RLHF_TEST_ARTIFACTS", REPO / ".test-artifacts"))
PNG_DATA = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def ui_server(postgres, tmp_path_factory):
    """`rlhf ui` on a free port with its own Prefect home and its own PostgreSQL database; stopped by its PID."""
    home = tmp_path_factory.mktemp("prefect-ui")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.database("prefect_ui"),
    }
    output = (home / "ui.log").open("w")
    server = subprocess.Popen([RLHF, "ui", "--port", str(port)], stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(f"{url}/api", server, home / "ui.log")
        yield url, (home / "ui.log")
    finally:
        stop(server)
        output.close()


@pytest.fixture(scope="module")
def watched(ui_server, tmp_path_factory):
    """One tiny `rlhf run` reporting to the `rlhf ui` server; its summary, terminal output and API client."""
    url, _ = ui_server
    store = tmp_path_factory.mktemp("watched") / "store"
    env = os.environ | {"PREFECT_API_URL": f"{url}/api"}
    started = datetime.now(UTC).isoformat()
    result = rlhf("run", "--json", "--store", str(store), *tiny_args(*SHORT), env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
        yield {"summary": summary, "result": result, "store": store, "started": started, "url": url}


def _files(artifact: str) -> Path:
    """Where a local store's artifact keeps its files: the folder its manifest names."""
    return Path(artifact) / json.loads((Path(artifact) / "manifest.json").read_text())["files_at"]


def _artifacts_by_key(flow_run_id) -> dict[str, list]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id={"any_": [flow_run_id]}))
    by_key: dict[str, list] = {}
    for artifact in artifacts:
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def _flow_run(run_id: str):
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name={"any_": [run_id]}))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
    return flow_run, {run.name: run for run in task_runs}


def test_rlhf_ui_serves_prefects_api_and_ui_on_localhost(ui_server):
    url, log = ui_server
    assert f"Prefect UI at {url}" in log.read_text()
    assert f"export PREFECT_API_URL={url}/api" in log.read_text()
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200 and "<title>Prefect" in response.read().decode()


def test_a_run_shows_progress_metrics_events_curves_and_the_report(watched):
    summary = watched["summary"]
    flow_run, stages = _flow_run(summary["run_id"])
    assert flow_run.state.is_completed()
    assert set(stages) == {"prepare", "sft", "reward", "rl", "evaluate"}
    assert all("model:builtin:tiny-llama" in run.tags for run in stages.values())
    assert all(any(tag.startswith("config:") for tag in run.tags) for run in stages.values())

    by_key = _artifacts_by_key(flow_run.id)
    for stage in TRAINING_STAGES:
        (progress,) = by_key[f"{stage}-progress"]
        assert progress.type == "progress" and float(progress.data) == 100.0
        assert progress.task_run_id == stages[stage].id
        (table,) = by_key[f"{stage}-metrics"]
        rows = json.loads(table.data)
        assert rows and all("step" in row for row in rows)
        (curves,) = by_key[f"{stage}-curves"]
        assert curves.type == "markdown" and curves.task_run_id == stages[stage].id
        (picture,) = PNG_DATA.findall(curves.data)
        assert base64.b64decode(picture).startswith(b"\x89PNG\r\n\x1a\n")
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
    (distributions,) = PNG_DATA.findall(report.data)  # the score distributions, inlined from the artifact
    evaluation = _files(summary["stages"]["evaluate"]["artifact"])
    assert base64.b64decode(distributions) == (evaluation / "plots" / "rewards.png").read_bytes()

    events = _events_named("rlhf.metrics", since=watched["started"], expected=len(sft_rows) + len(rl_rows))
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


def test_training_artifacts_keep_their_metric_history_and_curves(watched):
    for stage in TRAINING_STAGES:
        artifact = _files(watched["summary"]["stages"][stage]["artifact"])
        rows = [json.loads(line) for line in (artifact / "logs" / "metrics-history.jsonl").read_text().splitlines()]
        assert len(rows) >= 2 and all("step" in row for row in rows)
        assert (artifact / "logs" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_rlhf_run_shows_each_stage_and_ends_with_a_table(watched):
    summary, result = watched["summary"], watched["result"]
    for stage in ("prepare", "sft", "reward", "rl", "evaluate"):
        assert f"{stage}: running" in result.stderr
        assert re.search(rf"^{stage}: ran in \d+\.\d s$", result.stderr, re.MULTILINE)
    table = result.stdout.strip().splitlines()[:-1]  # the last line stays the JSON summary
    assert table[0] == f"run {summary['run_id']}: completed (store {summary['store']})"
    reward = summary["stages"]["reward"]["metrics"]
    assert any(
        line.split()[:2] == ["reward", "ran"] and f"eval_accuracy {reward['eval_accuracy']:.3g}" in line
        for line in table
    )
    win_rate = summary["stages"]["evaluate"]["metrics"]["win_rate_vs_sft"]
    assert f"win rate vs SFT {win_rate:.3f}" in table[-1] and "mean reward base" in table[-1]


def test_the_flow_run_page_renders_in_headless_chromium(watched):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is needed (make test installs it)"
    flow_run, stages = _flow_run(watched["summary"]["run_id"])
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "flow-run.png"
    page = _render(chromium, f"{watched['url']}/runs/flow-run/{flow_run.id}", screenshot)
    assert watched["summary"]["run_id"] in page and "Completed" in page
    assert f"{len(stages)} Task runs" in page  # the run graph itself is a canvas: see the screenshot
    assert screenshot.stat().st_size > 20_000
    (report,) = _artifacts_by_key(flow_run.id)["evaluation-report"]
    page = _render(chromium, f"{watched['url']}/artifacts/artifact/{report.id}", ARTIFACTS / "report.png")
    assert "win rate of RL over SFT" in page and 'src="data:image/png;base64,' in page


def _render(chromium: str, url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1600",
        "--virtual-time-budget=20000",
    ]
    shot = subprocess.run(
        [chromium, *flags, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120
    )
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-2000:]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def test_runs_and_show_read_the_run_from_the_store(watched):
    summary, store = watched["summary"], str(watched["store"])
    accuracy = summary["stages"]["reward"]["metrics"]["eval_accuracy"]
    win_rate = summary["stages"]["evaluate"]["metrics"]["win_rate_vs_sft"]

    listed = rlhf("runs", "--store", store, timeout=60)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    assert line.startswith(summary["run_id"]) and " completed " in line
    assert f"reward accuracy {accuracy:.3f}, win rate vs SFT {win_rate:.3f}" in line

    shown = rlhf("show", summary["run_id"], "--store", store, "--json", timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout) == summary
    table = rlhf("show", summary["run_id"], "--store", store, timeout=60)
    assert table.returncode == 0 and table.stdout.splitlines()[0].startswith(f"run {summary['run_id']}: completed")
    missing = rlhf("show", "no-such-run", "--store", store, timeout=60)
    assert missing.returncode == 2 and "no finished run 'no-such-run'" in missing.stderr
    assert "Traceback" not in missing.stderr
