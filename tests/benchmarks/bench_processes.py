"""PPO and rejection sampling on one process and on N (not part of `make test`).

Runs prepare, sft and reward of the demo once, then the rl stage of each method in one process and under
`torchrun` with `--processes` processes (gloo on CPU, NCCL on GPUs), side by side in one session. Reports the
rl stage's wall-clock seconds (processes started and models loaded included) and PPO's seconds per step, the
ratios, and whether the rollouts agree: PPO's kept samples (its first and last steps' answers) token for
token, the largest difference of any PPO step's numbers and of any rejection-sampling round's. On a
machine with fewer cores than processes this measures the overhead of splitting the work, not a speed-up.

Usage: python tests/benchmarks/bench_processes.py [--processes 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from rlhf_pipeline.flows.launchers.process import ProcessLauncher  # noqa: E402
from rlhf_pipeline.stages.core.artifacts import Manifest, read_manifest, read_verified  # noqa: E402
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config  # noqa: E402
from rlhf_pipeline.stages.core.planner import plan_stage  # noqa: E402
from rlhf_pipeline.stages.core.store import LocalStore  # noqa: E402

# The demo with fewer PPO steps and two rejection-sampling rounds of the demo's size (the second samples from
# the first's fine-tuned policy).
SMALL = ["rl.ppo.steps=8", "rl.rejection_sampling.rounds=2", "run.device=cpu"]
METHODS = {"ppo": "ppo_history.jsonl", "rejection_sampling": "rounds.jsonl"}
COMPARED = ("score", "kl", "response_length", "policy_loss", "value_loss", "best_score")


class Quiet:
    def info(self, message, *args) -> None:
        pass


def rl_stage(store: LocalStore, overrides: list[str], processes: int) -> tuple[LocalStore, Manifest, float]:
    """The rl stage in a copy of `store`'s upstream artifacts (PPO is keyed alike on any count): that copy, the
    artifact and its wall-clock seconds (the processes' start and loading included)."""
    copy = LocalStore(store.root.parent / f"store-{processes}")
    shutil.rmtree(copy.root, ignore_errors=True)
    shutil.copytree(store.root, copy.root, ignore=shutil.ignore_patterns("rl"))
    config = load_config(None, [*overrides, f"deploy.stages.rl.processes={processes}", f"run.store={copy.uri}"])
    key = f"runs/bench-{config.rl.method}-{processes}/config.yaml"
    copy.write_bytes(key, dump_config(config).encode())
    started = time.monotonic()
    ProcessLauncher(warm=False).launch("rl", copy.uri_of(key), Quiet())
    seconds = time.monotonic() - started
    manifest = read_manifest(copy, plan_stage(copy, config, "rl").prefix)
    assert manifest is not None
    return copy, manifest, seconds


def rows(store: LocalStore, manifest: Manifest, path: str) -> list[dict]:
    text = read_verified(store, f"artifacts/rl/{manifest.cache_key}", path, manifest).decode()
    return [json.loads(line) for line in text.splitlines()]


def compare(method: str, one: tuple[LocalStore, Manifest], many: tuple[LocalStore, Manifest]) -> dict:
    """How far the two runs' numbers are apart (every step's or round's) and, for PPO, its seconds per step."""
    history = [rows(store, m, METHODS[method]) for store, m in (one, many)]
    pairs = zip(*history, strict=True)
    result: dict = {"largest_difference": max(abs(a[k] - b[k]) for a, b in pairs for k in COMPARED if k in a)}
    if method == "ppo":
        result["ppo_step_seconds"] = [round(m.metrics["train_seconds"] / m.metrics["steps"], 3) for _, m in (one, many)]
        samples = [rows(store, m, "ppo_samples.jsonl") for store, m in (one, many)]
        result["samples_identical"] = [s["response"] for s in samples[0]] == [s["response"] for s in samples[1]]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        overrides = [*SMALL, *args.overrides, f"run.store={store.uri}"]
        config = load_config(None, overrides)
        for stage in ("prepare", "sft", "reward"):
            store.write_bytes("runs/bench/config.yaml", dump_config(config).encode())
            ProcessLauncher(warm=False).launch(stage, store.uri_of("runs/bench/config.yaml"), Quiet())
        for method in METHODS:
            method_overrides = [*overrides, f"rl.algorithm={method}"]
            (one_store, one, one_seconds), (many_store, many, many_seconds) = (
                rl_stage(store, method_overrides, n) for n in (1, args.processes)
            )
            result = {"stage_seconds": [round(one_seconds, 1), round(many_seconds, 1)]}
            result["ratio"] = round(many_seconds / one_seconds, 2)
            result |= compare(method, (one_store, one), (many_store, many))
            print(json.dumps({"method": method, "processes": args.processes, **result}), flush=True)


if __name__ == "__main__":
    main()
