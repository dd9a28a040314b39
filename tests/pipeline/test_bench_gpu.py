"""The GPU benchmark's dry run on CPU: every training stage reports the tokens and seconds it trained, so the
script that measures tokens/s and MFU on a GPU machine keeps working between the sessions that have one."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_benchmark_dry_run_reports_throughput_per_training_stage(tmp_path):
    command = [sys.executable, str(REPO / "tests" / "benchmarks" / "bench_gpu.py"), "--small", "--device", "cpu"]
    command += ["--hidden", "64", "--layers", "2", "--heads", "4", "--intermediate", "128", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["card"] == "cpu" and 5e6 < results["parameters"] < 1e7
    assert results["precision"] == {"trained_weights": "float32", "compute": "float32"}
    stages = {row["stage"]: row for row in results["full"]}
    others = [
        f"{stage}:{algorithm}"
        for algorithm in ("rejection_sampling", "dpo", "grpo", "rloo")
        for stage in ("rl", "evaluate")
    ]
    assert list(stages) == ["prepare", "sft", "reward", "rl", "evaluate", *others]
    assert set(stages["rl"]["phase_seconds"]) == {"generation", "scoring", "reference_values", "optimization"}
    for name in ("sft", "reward", "rl", "rl:dpo", "rl:grpo", "rl:rloo"):
        row = stages[name]
        assert row["train_tokens"] > 0 and row["train_seconds"] > 0
        assert row["tokens_per_second"] == round(row["train_tokens"] / row["train_seconds"])
        assert row["tflops"] >= 0 and row["mfu"] is None  # no peak is known for a CPU
