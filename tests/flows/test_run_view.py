"""What `rlhf run` shows on a terminal (a live bar per stage) and in a log (a line per change); the end of a real
run (its table) is checked in tests/flows/test_monitoring.py."""

from __future__ import annotations

import io
import re

from rich.console import Console

from rlhf_pipeline.flows.monitoring.run_view import (
    key_numbers,
    print_summary,
    stage_finished,
    stage_progress,
    stage_started,
    watching,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _shown(terminal: bool) -> str:
    output = io.StringIO()
    with watching(console=Console(file=output, force_terminal=terminal, width=100)):
        stage_started("prepare")
        stage_finished("prepare", "cached")
        stage_started("sft")
        stage_progress("sft", 40.0)
    return ANSI.sub("", output.getvalue())


def test_on_a_terminal_each_stage_has_a_status_and_the_running_one_a_progress_bar():
    last_frame = _shown(terminal=True).split("\r")[-1].splitlines()
    lines = {line.split()[0]: line for line in last_frame if line.strip()}
    assert set(lines) == {"prepare", "sft", "reward", "rl", "evaluate"}
    assert "cached" in lines["prepare"] and "100%" in lines["prepare"]
    assert "running" in lines["sft"] and "40%" in lines["sft"] and "━" in lines["sft"]
    assert "waiting" in lines["reward"] and "0%" in lines["reward"]


def test_in_a_log_each_change_is_a_line():
    assert re.fullmatch(r"prepare: running\nprepare: cached in \d+\.\d s\nsft: running\n", _shown(terminal=False))


def test_without_a_view_reports_go_nowhere(capsys):
    stage_started("sft")
    stage_progress("sft", 50.0)
    stage_finished("sft", "ran")
    assert capsys.readouterr() == ("", "")


def test_key_numbers_show_trends_and_the_numbers_that_matter():
    metrics = {"first_loss": 3.9, "last_loss": 0.97, "eval_loss": 0.9672, "steps": 255, "win_rate_vs_sft": 0.789}
    assert key_numbers(metrics) == "loss 3.9 → 0.97, eval_loss 0.967, win_rate_vs_sft 0.789"


def test_a_run_that_died_before_its_first_stage_ended_prints_its_table():
    """`rlhf show` of a run found dead while its first stage ran: its summary has no stages yet."""
    output = io.StringIO()
    print_summary({"run_id": "demo-1", "status": "crashed", "store": "/s", "stages": {}}, file=output)
    assert output.getvalue().splitlines() == [
        "run demo-1: crashed (store /s)",
        "  stage     status   seconds tries  key numbers",
    ]
