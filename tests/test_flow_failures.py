"""How the flow treats failures: a crashed stage process is retried with backoff, bad input is not, and the
run summary says which stage failed and why. Real child processes for the launcher; the flow runs on the
session's Prefect test server."""

from __future__ import annotations

import sys

import pytest

from flows import launchers, pipeline
from flows.launchers import ProcessLauncher, StageCrashed, StageInputError
from stages.config import dump_config, load_config
from stages.store import LocalStore


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
        (["run.device=cpu", "deploy.stages.sft.processes=2"], False),  # torchrun starts those
    ],
)
def test_which_stages_are_forked_from_the_warm_interpreter(overrides, forked):
    assert launchers.forks_stage("sft", load_config(None, overrides)) is forked


@pytest.mark.parametrize("start", ["fork", "exec"])
def test_a_real_stage_rejecting_its_input_is_an_input_error(tmp_path, start):
    """The real `rlhf stage sft` with no `prepare` artifact in the store exits 2, forked or exec'd alike."""
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(load_config(None, [f"run.store={tmp_path / 'store'}", f"run.stage_start={start}"])))
    log = _Log()
    with pytest.raises(StageInputError, match="stage sft: its input 'prepare' has not been produced yet"):
        ProcessLauncher().launch("sft", str(path), log)
    assert ("(forked from the warm interpreter)" in log.lines[0]) == (start == "fork")
    assert f"rlhf stage sft --config {path}" in log.lines[0]


def test_exit_code_2_is_an_input_error_with_the_stage_message(monkeypatch, config_file):
    _fake_stage(monkeypatch, "import sys; print('error: data.jsonl:3: missing field'); sys.exit(2)")
    log = _Log()
    with pytest.raises(StageInputError, match="data.jsonl:3: missing field"):
        ProcessLauncher().launch("sft", config_file, log)
    assert any("missing field" in line for line in log.lines)


def test_a_killed_process_is_a_crash(monkeypatch, config_file):
    _fake_stage(monkeypatch, "import os, signal; print('training'); os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(StageCrashed, match="killed by SIGKILL"):
        ProcessLauncher().launch("rl", config_file, _Log())


class _Counting:
    """A launcher that fails the `sft` stage, counting attempts."""

    calls = 0
    error: type[Exception] = StageCrashed

    def launch(self, stage, config_uri, logger):
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
    from stages.artifacts import publish_dir
    from stages.graph import plan_stage

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
