"""How the flow treats failures: a crashed stage process is retried with backoff, bad input is not, a damaged
input sends the run back to the stage that produces it, and the run summary says which stage failed and why.
Real child processes for the launcher; the flow runs on the session's Prefect test server."""

from __future__ import annotations

import errno
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rlhf_pipeline.flows import cli, pipeline
from rlhf_pipeline.flows.launchers import process as launchers
from rlhf_pipeline.flows.launchers.launcher import StageCrashed, StageInputDamaged, StageInputError
from rlhf_pipeline.flows.launchers.process import ProcessLauncher
from rlhf_pipeline.flows.monitoring import heartbeats
from rlhf_pipeline.flows.monitoring.heartbeats import (
    STALE_SECONDS,
    RunHeartbeat,
    heartbeat_key,
    mark_dead_runs,
    pid_namespace,
)
from rlhf_pipeline.flows.monitoring.stage_monitor import StageMonitor, publish_stage_pictures
from rlhf_pipeline.stages import runner
from rlhf_pipeline.stages.core.artifacts import publish_dir, read_manifest, set_aside
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config, read_config
from rlhf_pipeline.stages.core.errors import DamagedArtifact
from rlhf_pipeline.stages.core.planner import plan_stage
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from rlhf_pipeline.stages.core.store import LocalStore
from rlhf_pipeline.stages.runner import run_stage


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, message, *args):
        self.lines.append(message % args if args else message)


def _fake_stage(monkeypatch, script: str) -> None:
    monkeypatch.setattr(launchers, "rlhf_command", lambda: [sys.executable, "-c", script])


@pytest.fixture
def config_file(tmp_path) -> str:
    """Fake stages are commands, so they are exec'd, not forked from the warm interpreter."""
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(load_config(None, ["run.stage_start=exec"])))
    return str(path)


@pytest.mark.parametrize(
    ("overrides", "forked"),
    [
        (["run.device=cpu"], True),
        (["run.device=cpu", "run.stage_start=exec"], False),
        (["run.device=cuda"], False),  # CUDA initialises in a fresh process only
        (["run.device=cpu", "deploy.stages.sft.processes=2"], True),  # torchrun, forking its processes
    ],
)
def test_which_stages_are_forked_from_the_warm_interpreter(overrides, forked):
    assert launchers.forks_stage("sft", load_config(None, overrides)) is forked


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("start", ["fork", "exec"])
def test_a_real_stage_rejecting_its_input_is_an_input_error(tmp_path, start, processes):
    """The real `rlhf stage sft` with no `prepare` artifact in the store exits 2, forked or exec'd alike, and
    so does it under torchrun (which itself would end with 1: a crash, retried), with the stage's message."""
    path = tmp_path / "config.yaml"
    overrides = [f"run.store={tmp_path / 'store'}", f"run.stage_start={start}", "run.device=cpu"]
    path.write_text(dump_config(load_config(None, [*overrides, f"deploy.stages.sft.processes={processes}"])))
    log = _Log()
    with pytest.raises(StageInputError, match="^error: stage sft: its input 'prepare' has not been produced yet"):
        ProcessLauncher().launch("sft", str(path), log)
    assert ("(forked from the warm interpreter)" in log.lines[0]) == (start == "fork")
    assert f"rlhf_pipeline.flows.cli stage sft --config {path}" in log.lines[0] or processes == 1
    assert f"rlhf stage sft --config {path}" in log.lines[0] or processes == 2
    assert sum("failed first, exit code 2" in line for line in log.lines) == (processes == 2)


def test_exit_code_2_is_an_input_error_with_the_stage_message(monkeypatch, config_file):
    _fake_stage(monkeypatch, "import sys; print('error: data.jsonl:3: missing field'); sys.exit(2)")
    log = _Log()
    with pytest.raises(StageInputError, match="data.jsonl:3: missing field"):
        ProcessLauncher().launch("sft", config_file, log)
    assert any("missing field" in line for line in log.lines)


def test_a_real_stage_whose_input_is_damaged_sets_it_aside_and_exits_3(tmp_path):
    """`rlhf stage sft` on a `prepare` artifact with a flipped byte: no training on it, the artifact set aside."""
    path = tmp_path / "config.yaml"
    config = load_config(None, [f"run.store={tmp_path / 'store'}", "data.demo.sft_rows=40"])
    path.write_text(dump_config(config))
    store = config.run.open_store()
    prepared, _ = run_stage("prepare", config, store)
    damaged = tmp_path / "store" / prepared.location(plan_stage(store, config, "prepare").prefix, "sft_train.jsonl")
    damaged.write_bytes(damaged.read_bytes().replace(b"the", b"The", 1))
    with pytest.raises(StageInputDamaged, match="sha256 of sft_train.jsonl does not match the manifest; set aside"):
        ProcessLauncher().launch("sft", str(path), _Log())
    assert read_manifest(store, plan_stage(store, config, "prepare").prefix) is None
    assert prepared is not None and damaged.exists()


def test_monitoring_failures_never_stop_the_stage(monkeypatch, config_file, caplog):
    """Malformed event lines and a Prefect API that fails: logged and skipped, the stage's output still drained."""
    lines = ["rlhf-event {not json", 'rlhf-event {"kind": "metrics"}', 'rlhf-event {"kind": "progress", "percent": 50}']
    _fake_stage(monkeypatch, "; ".join([*(f"print({line!r})" for line in lines), "print('trained to the end')"]))

    class PrefectAway(StageMonitor):
        def progress(self, percent):
            raise ConnectionError("the Prefect API is unreachable")

    monkeypatch.setattr(StageMonitor, "in_run_context", classmethod(lambda cls, stage: PrefectAway(stage)))
    log = _Log()
    ProcessLauncher().launch("sft", config_file, log)  # exits 0: no exception
    assert log.lines[-1] == "trained to the end"
    assert caplog.text.count("malformed event line skipped") == 2
    assert "could not forward progress to Prefect (the Prefect API is unreachable); training goes on" in caplog.text


def test_a_damaged_figure_is_left_out_of_the_ui_not_a_failed_stage(tmp_path, caplog):
    """The curves are outside the digest, so nothing sets their artifact aside: failing on them failed the
    stage on every run."""
    store = LocalStore(tmp_path / "store")
    (tmp_path / "out" / "logs").mkdir(parents=True)
    (tmp_path / "out" / "logs" / "curves.png").write_bytes(b"\x89PNG picture")
    manifest = publish_dir(store, tmp_path / "out", "artifacts/sft/k", {"stage": "sft", "cache_key": "k", "config": {}})
    store.write_bytes(manifest.location("artifacts/sft/k", "logs/curves.png"), b"\x89PNG damaged")
    publish_stage_pictures(store, "sft", "sft", "artifacts/sft/k", manifest)
    assert "sft: not shown in the UI: " in caplog.text and "logs/curves.png" in caplog.text


def test_a_full_disk_is_reported_as_such(monkeypatch, config_file, capsys):
    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/rlhf-work/sft-1/artifact/model.safetensors")

    monkeypatch.setattr(runner, "run_stage", no_space)
    assert cli.main(["stage", "sft", "--config", config_file]) == 1
    message = capsys.readouterr().err
    assert message.startswith("error: no space left on the device writing /tmp/rlhf-work/sft-1/artifact/model.")
    assert "Traceback" not in message and "work_storage" in message


def test_a_killed_process_is_a_crash(monkeypatch, config_file):
    _fake_stage(monkeypatch, "import os, signal; print('training'); os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(StageCrashed, match="killed by SIGKILL"):
        ProcessLauncher().launch("rl", config_file, _Log())


class _Counting:
    """A launcher that fails the `sft` stage, counting attempts."""

    calls = 0
    error: type[Exception] = StageCrashed

    def launch(self, stage, config_uri, logger, label=None):
        if stage != "sft":
            raise AssertionError("the flow must not go past the failed stage")
        type(self).calls += 1
        raise self.error(f"stage {stage} failed on attempt {type(self).calls}")


@pytest.fixture
def stored_config(tmp_path):
    store = LocalStore(tmp_path / "store")
    config = load_config(None, [f"run.store={store.uri}", "run.retries=2", "run.retry_delay_seconds=0"])
    store.write_bytes("runs/r/config.yaml", dump_config(config).encode())
    # `prepare` is already complete, so the flow reaches `sft` without training anything.
    from rlhf_pipeline.stages.core.artifacts import publish_dir
    from rlhf_pipeline.stages.core.planner import plan_stage

    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "x.jsonl").write_text("{}\n")
    plan = plan_stage(store, config, "prepare")
    publish_dir(store, tmp_path / "prepared", plan.prefix, {"stage": "prepare", "cache_key": plan.key, "config": {}})
    return store


@pytest.mark.parametrize(("error", "attempts"), [(StageCrashed, 3), (StageInputError, 1)])
def test_crashes_are_retried_and_input_errors_are_not(prefect_api, monkeypatch, stored_config, error, attempts):
    _Counting.calls = 0
    _Counting.error = error
    monkeypatch.setitem(pipeline.LAUNCHERS, "counting", _Counting)
    state = pipeline.rlhf_pipeline(stored_config.uri_of("runs/r/config.yaml"), "r", "counting", return_state=True)
    assert state.is_failed()
    assert _Counting.calls == attempts
    summary = stored_config.read_json("runs/r/run.json")
    assert summary["status"] == "failed"
    assert summary["stages"]["prepare"]["status"] == "cached"
    assert summary["stages"]["sft"]["status"] == "failed"
    assert summary["stages"]["sft"]["error"] == f"stage sft failed on attempt {attempts}"
    assert state.message == f"stage sft failed: stage sft failed on attempt {attempts}"  # the UI's run message


def test_an_error_of_the_flow_itself_reaches_rlhf_run_as_it_was_raised(prefect_api, monkeypatch, tmp_path, capsys):
    """Raised outside any stage (here: a damaged artifact found while planning), before the run summary is
    written: `rlhf run` used to say only that run.json was not found."""

    def damaged(*args):
        raise DamagedArtifact("artifacts/sft/k: manifest.json cannot be parsed")

    monkeypatch.setattr(pipeline, "run_stages", damaged)
    assert cli.main(["run", "--store", str(tmp_path / "store")]) == 3
    assert capsys.readouterr().err.strip().endswith("error: artifacts/sft/k: manifest.json cannot be parsed")


class _Publishing:
    """A launcher whose stages publish a small artifact at once; the first `sft` finds `prepare` damaged and sets
    it aside, as the real stage does."""

    launched: list[str] = []

    def launch(self, stage, config_uri, logger, label=None):
        config = read_config(config_uri)
        store = config.run.open_store()
        type(self).launched.append(stage)
        if stage == "sft" and type(self).launched.count("sft") == 1:
            set_aside(store, plan_stage(store, config, "prepare").prefix, "a flipped byte")
            raise StageInputDamaged("artifacts/prepare/...: sha256 of sft_train.jsonl does not match the manifest")
        plan = plan_stage(store, config, stage)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "report.md").write_text(f"# {stage}")
            publish_dir(store, Path(tmp), plan.prefix, {"stage": stage, "cache_key": plan.key, "config": {}})


def test_a_damaged_input_is_computed_again_and_the_run_completes(prefect_api, monkeypatch, stored_config):
    _Publishing.launched = []
    monkeypatch.setitem(pipeline.LAUNCHERS, "publishing", _Publishing)
    state = pipeline.rlhf_pipeline(stored_config.uri_of("runs/r/config.yaml"), "r", "publishing", return_state=True)
    assert state.is_completed(), state.message
    # sft is not retried on the damaged input: the run goes back to prepare, then on through every stage.
    assert _Publishing.launched == ["sft", "prepare", *STAGE_NAMES[1:]]
    summary = stored_config.read_json("runs/r/run.json")
    assert summary["status"] == "completed"
    assert summary["recomputed"] == [
        {"stage": "prepare", "because": "artifacts/prepare/...: sha256 of sft_train.jsonl does not match the manifest"}
    ]
    assert summary["stages"]["prepare"]["status"] == "ran" and summary["stages"]["sft"]["attempts"] == 1


def _heartbeat(store: LocalStore, run_id: str, host: str, pid: int, seconds_ago: float, pids: str = "") -> None:
    """A run's heartbeat on `host`, its process `pid` in the pid namespace `pids` (this process's on this host)."""
    beat_at = (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()
    pids = pids or (pid_namespace() if host == platform.node() else "elsewhere")
    record = {"run_id": run_id, "flow_run_id": None, "config_hash": "c", "host": host, "pid": pid}
    record["pid_namespace"] = pids
    store.write_json(heartbeat_key(run_id), record | {"stages": {"prepare": {"status": "ran"}}, "beat_at": beat_at})


def test_runs_whose_heartbeat_stopped_are_marked_crashed_and_live_ones_are_left(tmp_path):
    """Dead: its process gone (this host, this pid namespace), or no heartbeat for STALE_SECONDS (any host). Alive
    otherwise, also a run in a container on this host whose pid means nothing here (compose's orchestrator, with
    the host's network and name): it was marked crashed while it ran."""
    store = LocalStore(tmp_path / "store")
    gone = subprocess.Popen(["true"])
    gone.wait()
    here, stale = platform.node(), STALE_SECONDS + 5
    _heartbeat(store, "killed-here", here, gone.pid, 1)
    _heartbeat(store, "lost-machine", "elsewhere", 1, stale)
    _heartbeat(store, "alive-elsewhere", "elsewhere", 1, 1)
    _heartbeat(store, "alive-here", here, os.getpid(), 1)
    _heartbeat(store, "alive-in-a-container-here", here, gone.pid, 1, pids=f"{here} boot pid:[4026599999]")
    _heartbeat(store, "finished", "elsewhere", 1, stale)
    store.write_json("runs/finished/run.json", {"status": "completed"})
    dead = mark_dead_runs(store)
    assert sorted(h["run_id"] for h in dead) == ["killed-here", "lost-machine"]
    for run_id in ("killed-here", "lost-machine"):
        record = store.read_json(f"runs/{run_id}/run.json")
        assert record["status"] == "crashed" and record["stages"] == {"prepare": {"status": "ran"}}
        assert "no heartbeat since" in record["error"] and not store.exists(heartbeat_key(run_id))
    for run_id in ("alive-elsewhere", "alive-here", "alive-in-a-container-here"):
        assert store.exists(heartbeat_key(run_id)) and not store.exists(f"runs/{run_id}/run.json")
    assert store.read_json("runs/finished/run.json") == {"status": "completed"}
    assert mark_dead_runs(store) == []


def test_an_unreadable_heartbeat_is_left_as_it_is_and_listed_without_a_traceback(tmp_path, capsys):
    store = LocalStore(tmp_path / "store")
    store.write_bytes(heartbeat_key("garbled"), b'{"host": "elsewhere"')
    store.write_json(heartbeat_key("no-beat"), {"host": "elsewhere", "pid": 1})
    assert mark_dead_runs(store) == []
    assert store.exists(heartbeat_key("garbled")) and not store.exists("runs/garbled/run.json")
    assert cli.main(["runs", "--store", str(tmp_path / "store")]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert listed == {"garbled": "stopped", "no-beat": "stopped"}


def test_a_run_keeps_its_heartbeat_fresh_and_removes_it_when_it_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(heartbeats, "BEAT_SECONDS", 0.05)
    store = LocalStore(tmp_path / "store")
    with RunHeartbeat(store, "r", None, "c") as heartbeat:
        first = store.read_json(heartbeat_key("r"))["beat_at"]
        time.sleep(0.3)
        assert store.read_json(heartbeat_key("r"))["beat_at"] > first
        heartbeat.update({"prepare": {"status": "ran"}})
        assert store.read_json(heartbeat_key("r"))["stages"] == {"prepare": {"status": "ran"}}
    assert not store.exists(heartbeat_key("r"))
    with pytest.raises(RuntimeError), RunHeartbeat(store, "broken", None, "c"):
        raise RuntimeError("the flow itself failed")
    assert store.exists(heartbeat_key("broken"))  # for the next run to find and mark
