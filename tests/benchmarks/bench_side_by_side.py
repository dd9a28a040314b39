"""Two pipeline runs at once on one machine against one alone (not part of `make test`).

Each side is `rlhf run` of the same small config into its own fresh store, timed from outside. Every stage
process takes its share of the CPUs (`stages/core/cpus.py`), so two runs side by side should take about twice
the time of one (goal: at most 2.3×), not the 24× that fighting compute threads cost before. Reports the wall
times, their ratio, PPO's mean step time on each side and the compute threads the stages logged.

Usage: python tests/benchmarks/bench_side_by_side.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The demo with fewer PPO steps: a run of about a minute on 2 cores, PPO's steps as in the demo.
SMALL = ["rl.ppo.steps=16"]
THREADS = re.compile(r"compute threads: (\d+)")


def start(overrides: list[str], store: Path) -> subprocess.Popen[str]:
    command = [str(Path(sys.executable).parent / "rlhf"), "run", "--store", str(store), "--json"]
    command += [a for o in overrides for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"
    }
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen[str], started: float) -> dict:
    stdout, stderr = process.communicate()
    seconds = time.monotonic() - started
    if process.returncode != 0:
        sys.exit(f"rlhf run failed:\n{stderr[-4000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    rl = summary["stages"]["rl"]["metrics"]
    return {
        "seconds": round(seconds, 1),
        "stage_seconds": {name: stage["seconds"] for name, stage in summary["stages"].items()},
        "ppo_step_seconds": round(rl["train_seconds"] / rl["steps"], 2),
        "threads_logged": sorted({int(n) for n in THREADS.findall(stderr + stdout)}),
    }


def runs_at_once(count: int, overrides: list[str], work: Path) -> list[dict]:
    started = time.monotonic()
    processes = [start(overrides, work / f"store-{count}-{i}") for i in range(count)]
    return [finish(process, started) for process in processes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    overrides = [*SMALL, *args.overrides]
    with tempfile.TemporaryDirectory(prefix="rlhf-side-by-side-") as tmp:
        alone = runs_at_once(1, overrides, Path(tmp))[0]
        together = runs_at_once(2, overrides, Path(tmp))
    slowest = max(run["seconds"] for run in together)
    report = {
        "cpus": len(os.sched_getaffinity(0)),
        "overrides": overrides,
        "alone": alone,
        "together": together,
        "ratio_together_over_alone": round(slowest / alone["seconds"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
