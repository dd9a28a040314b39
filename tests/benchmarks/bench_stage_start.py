"""A stage of two processes started forked from the warm interpreter against exec'd (not part of `make test`).

`run.stage_start: fork` (the default on CPU) runs torchrun in a child of the launcher's warm interpreter, which
forks the ranks from it; `exec` starts a fresh torchrun whose ranks each import torch, transformers and TRL. The
same sft stage (two processes, a few steps) is launched alternately each way, in one session, into stores that
hold only its upstream artifact, so every launch trains. The first forked launch also waits for the warm
interpreter's own imports (once per orchestrator): reported apart.

Usage: python tests/benchmarks/bench_stage_start.py [--repeats 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from rlhf_pipeline.flows.launchers.process import ProcessLauncher  # noqa: E402
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config  # noqa: E402
from rlhf_pipeline.stages.core.store import LocalStore  # noqa: E402
from rlhf_pipeline.stages.runner import run_stage  # noqa: E402

SFT = ["run.device=cpu", "sft.max_steps=4", "sft.batch_size=8"]


class Quiet:
    def info(self, message, *args) -> None:
        pass


def launch(upstream: LocalStore, where: Path, overrides: list[str]) -> float:
    """sft launched into a copy of `upstream` with `overrides`: its wall-clock seconds."""
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(upstream.root, where)
    store = LocalStore(where)
    config = load_config(None, [*overrides, f"run.store={store.uri}"])
    store.write_bytes("runs/bench/config.yaml", dump_config(config).encode())
    started = time.monotonic()
    ProcessLauncher().launch("sft", store.uri_of("runs/bench/config.yaml"), Quiet())
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        upstream = LocalStore(Path(tmp) / "upstream")
        run_stage("prepare", load_config(None, [*SFT, f"run.store={upstream.uri}"]), upstream)
        layout = [*SFT, f"deploy.stages.sft.processes={args.processes}"]
        seconds: dict[str, list[float]] = {"fork": [], "exec": []}
        first_fork = launch(upstream, Path(tmp) / "first", [*layout, "run.stage_start=fork"])
        for repeat in range(args.repeats):
            for start in ("exec", "fork"):
                where = Path(tmp) / f"{start}-{repeat}"
                seconds[start].append(launch(upstream, where, [*layout, f"run.stage_start={start}"]))
        median = {start: statistics.median(values) for start, values in seconds.items()}
        result = {
            "processes": args.processes,
            "seconds": {start: [round(s, 1) for s in values] for start, values in seconds.items()},
            "first_fork_seconds": round(first_fork, 1),
            "median_ratio_fork_to_exec": round(median["fork"] / median["exec"], 2),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
