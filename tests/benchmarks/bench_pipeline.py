"""Measures, side by side in one run (not part of `make test`):

(a) orchestration overhead: the whole `rlhf run` of a config (Prefect in ephemeral mode, one process per stage,
    artifacts and checkpoints in a local store) against the same stages' training code called one after the
    other in one plain Python process with no Prefect, no store and no subprocesses; each side is a fresh
    process timed from outside, so both pay their interpreter start and imports;
(b) checkpoint transfer: upload and download of checkpoint-shaped files through the ArtifactStore (manifest,
    sha256, TransferManager) against raw boto3 `upload_file`/`download_file` of the same files to the same S3
    server (moto on 127.0.0.1), each in its own process so that its peak memory (max RSS, and the peak of
    Python allocations from tracemalloc) is its own.

Usage: python tests/benchmarks/bench_pipeline.py [--config CONFIG] [--set key=value ...] [--repeats N]
       [--skip-pipeline] [--skip-transfer]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

REPEATS = 3
CHECKPOINT_FILES = {
    "model.safetensors": 256 << 20,
    "optimizer.pt": 128 << 20,
    "scheduler.pt": 1 << 10,
    "trainer_state.json": 4 << 10,
}


def in_process(config_path: str | None, overrides: list[str], work: Path) -> tuple[float, dict]:
    """Every stage's `run` in this process; inputs are the previous stages' output directories."""
    from rlhf_pipeline.stages.core.artifacts import Manifest
    from rlhf_pipeline.stages.core.checkpoints import CheckpointStore
    from rlhf_pipeline.stages.core.config_loading import load_config
    from rlhf_pipeline.stages.core.planner import StagePlan
    from rlhf_pipeline.stages.core.registry import STAGE_NAMES, STAGES
    from rlhf_pipeline.stages.core.store import LocalStore
    from rlhf_pipeline.stages.modeling.stage_context import StageContext

    # Checkpoints every 10^9 steps: none are written, this side never touches a store.
    config = load_config(config_path, [*overrides, "run.checkpoint_every=1000000000"])
    started = time.monotonic()
    outputs: dict[str, Path] = {}
    metrics: dict[str, dict] = {}
    timings = {}
    for stage in STAGE_NAMES:
        stage_started = time.monotonic()
        manifests = {
            name: ("", Manifest(stage=name, cache_key="", code_version="", config={}, files=[], metrics=metrics[name]))
            for name in STAGES[stage].inputs_for(config)
        }
        ctx = StageContext(
            stage=stage,
            config=config,
            plan=StagePlan(stage, "in-process", "in-process", manifests),
            work_dir=work / stage,
            out_dir=work / stage / "artifact",
            inputs={name: outputs[name] for name in STAGES[stage].inputs_for(config)},
            checkpoints=CheckpointStore(LocalStore(work / "never-used"), stage, "in-process", 1),
        )
        ctx.out_dir.mkdir(parents=True)
        metrics[stage] = importlib.import_module(STAGES[stage].program).run(ctx)
        outputs[stage] = ctx.out_dir
        timings[stage] = round(time.monotonic() - stage_started, 1)
    return time.monotonic() - started, {"stages": timings, "metrics": metrics}


def plain_process(config_path: str | None, overrides: list[str], work: Path) -> tuple[float, dict]:
    """`in_process` in a fresh Python process, timed from outside like `rlhf run`."""
    request = json.dumps({"config": config_path, "overrides": overrides, "work": str(work)})
    started = time.monotonic()
    result = subprocess.run([sys.executable, __file__, "--in-process", request], capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"the plain process failed:\n{result.stderr[-4000:]}")
    return elapsed, json.loads(result.stdout.strip().splitlines()[-1])


def orchestrated(config_path: str | None, overrides: list[str], store: Path) -> tuple[float, dict]:
    command = [
        str(Path(sys.executable).parent / "rlhf"),
        "run",
        *([config_path] if config_path else []),
        "--store",
        str(store),
        "--json",
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"
    }
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"rlhf run failed:\n{result.stderr[-4000:]}")
    return elapsed, json.loads(result.stdout.strip().splitlines()[-1])


def transfer(mode: str, bucket: str, source: Path, target: Path) -> dict:
    """One side of (b), in a fresh process: upload then download, with this process's peak RSS."""
    import boto3

    from rlhf_pipeline.stages.core.artifacts import fetch_dir, publish_dir
    from rlhf_pipeline.stages.core.store import S3Store

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    tracemalloc.start()
    started = time.monotonic()
    if mode == "store":
        store = S3Store(f"s3://{bucket}/store")
        publish_dir(store, source, "checkpoint", {"stage": "bench", "cache_key": "k", "config": {}})
        uploaded = time.monotonic()
        fetch_dir(store, "checkpoint", target)
    else:
        for path in sorted(source.iterdir()):
            client.upload_file(str(path), bucket, f"raw/{path.name}")
        uploaded = time.monotonic()
        for path in sorted(source.iterdir()):
            client.download_file(bucket, f"raw/{path.name}", str(target / path.name))
    done = time.monotonic()
    return {
        "upload_s": round(uploaded - started, 2),
        "download_s": round(done - uploaded, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_python_heap_mb": round(tracemalloc.get_traced_memory()[1] / (1 << 20), 1),
    }


def _transfer_once(mode: str, source: Path, target: Path) -> dict:
    """One side, in its own process against its own fresh moto server."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = os.environ | {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        target.mkdir()
        output = subprocess.run(
            [sys.executable, __file__, "--transfer", mode, str(source), str(target)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        return json.loads(output.stdout.strip().splitlines()[-1])
    finally:
        server.stop()


def transfer_benchmark(work: Path) -> dict:
    """Medians over REPEATS runs of each side, each run with a fresh process and moto server."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    source = work / "checkpoint"
    source.mkdir()
    for name, size in CHECKPOINT_FILES.items():
        with (source / name).open("wb") as handle:
            for _ in range(0, size, 1 << 20):
                handle.write(os.urandom(min(size, 1 << 20)))
    results: dict = {"megabytes": round(sum(CHECKPOINT_FILES.values()) / (1 << 20), 1), "repeats": REPEATS}
    for mode in ("boto3", "store"):
        runs = [_transfer_once(mode, source, work / f"back-{mode}-{i}") for i in range(REPEATS)]
        results[mode] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    for direction in ("upload_s", "download_s"):
        results[f"{direction[:-2]}_ratio_raw_over_store"] = round(
            results["boto3"][direction] / results["store"][direction], 3
        )
    return results


def pipeline_benchmark(config: str | None, overrides: list[str], repeats: int, work: Path) -> dict:
    """Both sides `repeats` times, interleaved, so that drift of the machine hits both alike; medians."""
    bare_runs, orchestrated_runs = [], []
    for i in range(repeats):
        bare_runs.append(plain_process(config, overrides, work / f"bare-{i}"))
        orchestrated_runs.append(orchestrated(config, overrides, work / f"store-{i}"))
    bare_s = statistics.median(seconds for seconds, _ in bare_runs)
    orchestrated_s = statistics.median(seconds for seconds, _ in orchestrated_runs)
    return {
        "repeats": repeats,
        "in_process_s": [round(seconds, 1) for seconds, _ in bare_runs],
        "orchestrated_s": [round(seconds, 1) for seconds, _ in orchestrated_runs],
        "overhead_ratio_of_medians": round(orchestrated_s / bare_s, 3),
        "in_process_stage_s": [bare["stages"] for _, bare in bare_runs],
        "orchestrated_stage_s": [{n: s["seconds"] for n, s in o["stages"].items()} for _, o in orchestrated_runs],
        "orchestrated_metrics": {name: s["metrics"] for name, s in orchestrated_runs[0][1]["stages"].items()},
        "in_process_metrics": bare_runs[0][1]["metrics"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side of (a), interleaved")
    parser.add_argument("--transfer", nargs=3, metavar=("MODE", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--in-process", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        request = json.loads(args.in_process)
        _, report = in_process(request["config"], request["overrides"], Path(request["work"]))
        print(json.dumps(report))
        return
    if args.transfer:
        mode, source, target = args.transfer
        print(json.dumps(transfer(mode, "bench", Path(source), Path(target))))
        return

    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_transfer:
            report["transfer"] = transfer_benchmark(work)
            print(json.dumps({"transfer": report["transfer"]}, indent=2), flush=True)
        if not args.skip_pipeline:
            report["pipeline"] = pipeline_benchmark(args.config, args.overrides, args.repeats, work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
