"""PPO (or sft) with FSDP2 on 1, 2 and 4 processes (not part of `make test`): memory per process, step time,
checkpoints.

Trains prepare, sft and reward once for a built-in tiny Llama widened to tens of millions of parameters, then
runs the rl stage with `rl.distributed.strategy: fsdp` on each process count (one process: nothing to shard,
the baseline), side by side in one session. Reports, per count: the trained state one process holds
(parameters, gradients and AdamW state of the policy and the value model) against one process's and against
1/N of it, the peak resident memory of a process, seconds per PPO step, the seconds to save a (sharded)
checkpoint and to load it back in a run killed after it, and whether that resumed run ends with the bytes of
the uninterrupted one. On a machine with fewer cores than processes the step times show the overhead of
sharding, not a speed-up. With `--stage sft`: the sft stage with `sft.distributed.strategy: fsdp` instead (the
HF Trainer's batch is per process, so N processes train N times the rows per step), its trained parameters and
AdamW state per process and seconds per step.

Usage: python tests/benchmarks/bench_sharding.py [--stage rl|sft] [--processes 1 2 4] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from rlhf_pipeline.flows.launchers.process import ProcessLauncher  # noqa: E402
from rlhf_pipeline.stages.core.artifacts import Manifest, read_manifest  # noqa: E402
from rlhf_pipeline.stages.core.config_loading import dump_config, load_config  # noqa: E402
from rlhf_pipeline.stages.core.planner import plan_stage  # noqa: E402
from rlhf_pipeline.stages.core.store import LocalStore  # noqa: E402
from tests.conftest import kill_after_first_checkpoint  # noqa: E402

WIDE = [
    "model.tiny.hidden_size=512",
    "model.tiny.num_layers=8",
    "model.tiny.num_heads=8",
    "data.demo.sft_rows=400",
    "data.demo.preference_rows=400",
    "data.demo.prompt_rows=200",
    "sft.max_steps=20",
    "sft.batch_size=16",
    "reward.max_steps=20",
    "reward.batch_size=16",
    "rl.ppo.steps=4",
    "rl.ppo.batch_size=16",
    "rl.ppo.mini_batch_size=8",
    "rl.ppo.generation.max_new_tokens=12",
    "rl.distributed.strategy=fsdp",
    "sft.distributed.strategy=fsdp",
    "run.checkpoint_every=2",
    "run.device=cpu",
]
HELD = ("parameter_bytes", "gradient_bytes", "optimizer_bytes")


class Quiet:
    def info(self, message, *args) -> None:
        pass


def rl_stage(store: LocalStore, overrides: list[str], processes: int, work: Path) -> tuple[Manifest, Manifest]:
    """The rl stage on `processes` processes run through, and again killed after its first checkpoint and
    resumed from it; each in its own copy of the upstream artifacts (PPO is keyed alike on any count)."""
    runs = []
    for name in ("through", "resumed"):
        copy = LocalStore(work / f"store-{processes}-{name}")
        shutil.copytree(store.root, copy.root, ignore=shutil.ignore_patterns("rl"))
        config = load_config(None, [*overrides, f"run.store={copy.uri}", f"deploy.stages.rl.processes={processes}"])
        path = work / f"rl-{processes}-{name}.yaml"
        path.write_text(dump_config(config))
        if name == "resumed":
            kill_after_first_checkpoint("rl", path, copy.root / "checkpoints" / "rl")
        ProcessLauncher(warm=False).launch("rl", str(path), Quiet())
        manifest = read_manifest(copy, plan_stage(copy, config, "rl").prefix)
        assert manifest is not None
        runs.append(manifest)
    return runs[0], runs[1]


def sft_rows(store: LocalStore, overrides: list[str], counts: list[int], work: Path) -> None:
    """sft sharded over each number of processes, after prepare (keyed apart: the batch grows with them)."""
    single: dict | None = None
    for processes in counts:
        config = load_config(None, [*overrides, f"deploy.stages.sft.processes={processes}"])
        path = work / f"sft-{processes}.yaml"
        path.write_text(dump_config(config))
        ProcessLauncher(warm=False).launch("sft", str(path), Quiet())
        metrics = read_manifest(store, plan_stage(store, config, "sft").prefix).metrics
        single = single or metrics
        held = metrics["parameter_bytes"] + metrics["optimizer_bytes"]
        whole = single["parameter_bytes"] + single["optimizer_bytes"]
        row = {
            "stage": "sft",
            "processes": processes,
            "trained_parameters_millions": round(single["parameter_bytes"] / 4 / 1e6, 1),  # fp32
            "parameters_and_adamw_mb_per_process": round(held / 2**20, 1),
            "of_one_process": round(held / whole, 3),
            "of_one_over_n": round(held * processes / whole, 3),
            "sft_step_seconds": round(metrics["train_seconds"] / metrics["steps"], 2),
            "last_loss": metrics["last_loss"],
        }
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["rl", "sft"], default="rl")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = LocalStore(work / "store")
        overrides = [*WIDE, *args.overrides, f"run.store={store.uri}"]
        config_path = work / "upstream.yaml"
        config_path.write_text(dump_config(load_config(None, overrides)))
        if args.stage == "sft":
            ProcessLauncher(warm=False).launch("prepare", str(config_path), Quiet())
            sft_rows(store, overrides, args.processes, work)
            return
        for stage in ("prepare", "sft", "reward"):
            ProcessLauncher(warm=False).launch(stage, str(config_path), Quiet())
        single: dict | None = None
        for processes in args.processes:
            through, resumed = rl_stage(store, overrides, processes, work)
            metrics = through.metrics
            single = single or metrics
            held = sum(metrics[f"{name}_per_process"] for name in HELD)
            whole = sum(single[f"{name}_per_process"] for name in HELD)
            row = {
                "processes": processes,
                "trained_parameters_millions": round(single["parameter_bytes_per_process"] / 4 / 1e6, 1),  # fp32
                "trained_state_mb_per_process": round(held / 2**20, 1),
                "of_one_process": round(held / whole, 3),
                "of_one_over_n": round(held * processes / whole, 3),
                "peak_rss_mb_per_process": round(metrics["peak_rss_bytes_per_process"] / 2**20),
                **{
                    f"peak_rss_mb_{name}": round(metrics.get(f"peak_rss_bytes_{name}", 0) / 2**20)
                    for name in ("main_process", "other_processes")
                },
                "ppo_step_seconds": round(metrics["train_seconds"] / metrics["steps"], 2),
                "checkpoint_save_seconds": metrics.get("checkpoint_save_seconds"),
                "checkpoint_load_seconds": resumed.metrics.get("checkpoint_load_seconds"),
                "resumed_from": resumed.resumed_from,
                "resumed_bytes_identical": resumed.digest == through.digest,
                "last_score": metrics["last_score"],
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
