"""The `rlhf` command: run the pipeline, run one stage, validate a config.

Bad input exits with code 2 and a one-line message naming the file and the field, never a traceback.
The Prefect side and the training side are imported only by the subcommands that need them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from stages import STAGE_NAMES
from stages.config import PipelineConfig, RunConfig, apply_overrides, load_config, read_config
from stages.errors import InputError
from stages.store import ArtifactStore


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF pipeline for open LLMs")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the whole pipeline (the built-in demo without CONFIG)")
    run.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in demo)")
    _add_common(run)
    run.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")
    run.set_defaults(handler=_run)

    stage = commands.add_parser("stage", help="run one stage in this process (what a stage container runs)")
    stage.add_argument("name", choices=STAGE_NAMES)
    stage.add_argument("--config", required=True, help="resolved config: a local path or s3://bucket/key")
    _add_common(stage)
    stage.set_defaults(handler=_stage)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(required=True, metavar="COMMAND")
    convert = data.add_parser("convert", help="print a dataset's rows in TRL's conversational format as JSONL")
    convert.add_argument("path", help="a .json/.jsonl/.parquet file or a Hugging Face Hub dataset id")
    convert.add_argument("--format", required=True, help="dolly, alpaca, oasst, shp, hh-rlhf, messages, ...")
    convert.add_argument("--kind", required=True, choices=("sft", "preference", "prompt"))
    convert.add_argument("--split", default="train", help="the Hub dataset's split")
    convert.set_defaults(handler=_convert)

    deploy = commands.add_parser(
        "deploy", help="register the stage and pipeline deployments on deploy.work_pool (created if missing)"
    )
    deploy.add_argument("config", nargs="?", help="pipeline YAML (default: the built-in demo)")
    deploy.add_argument("--pool-type", choices=("process", "docker", "kubernetes"), default="process")
    _add_common(deploy)
    deploy.set_defaults(handler=_deploy)

    runs = commands.add_parser("runs", help="the runs in a store, newest first, with status and headline metrics")
    runs.add_argument("--store", default=RunConfig().store, help="a directory or s3://bucket/prefix")
    runs.set_defaults(handler=_runs)

    show = commands.add_parser("show", help="one run of a store: its stages, artifacts and metrics")
    show.add_argument("run_id")
    show.add_argument("--store", default=RunConfig().store, help="a directory or s3://bucket/prefix")
    show.add_argument("--json", action="store_true", help="the run summary as JSON")
    show.set_defaults(handler=_show)

    validate = commands.add_parser("validate", help="check a config and every input it names")
    validate.add_argument("config")
    _add_common(validate)
    validate.set_defaults(handler=_validate)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="artifact store: a directory or s3://bucket/prefix (overrides run.store)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config field; repeatable",
    )


def _resolve(args: argparse.Namespace) -> PipelineConfig:
    overrides = args.overrides + ([f"run.store={args.store}"] if args.store else [])
    return load_config(args.config, overrides)


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import run_pipeline
    from stages.validation import validate_inputs

    config = _resolve(args)
    validate_inputs(config)
    summary = run_pipeline(config)
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        _print_summary(summary)
    return 0 if summary["status"] == "completed" else 1


def _deploy(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.deployments import deploy

    config = _resolve(args)
    for name in deploy(config, args.pool_type):
        print(f"deployment {name} on work pool {config.deploy.work_pool!r} ({args.pool_type})")
    print(f"start a worker: prefect worker start --pool {config.deploy.work_pool} --type {args.pool_type}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    store = ArtifactStore.from_uri(args.store)
    rows = []
    for run_id in store.list_children("runs"):
        key = f"runs/{run_id}/run.json"
        summary = store.read_json(key) if store.exists(key) else {"status": "running or stopped", "stages": {}}
        metrics = {name: stage["metrics"] for name, stage in summary["stages"].items()}
        rows.append((summary.get("finished_at", ""), run_id, summary["status"], _headline(metrics)))
    if not rows:
        print(f"no runs in {store.uri}")
    for finished, run_id, status, headline in sorted(rows, reverse=True):
        print(f"{run_id:<40} {status:<18} {finished[:19]:<19}  {headline}")
    return 0


def _headline(metrics: dict[str, dict]) -> str:
    """The numbers that say whether a run worked: the reward model's accuracy and RL's win rate over SFT."""
    parts = []
    if "eval_accuracy" in metrics.get("reward", {}):
        parts.append(f"reward accuracy {metrics['reward']['eval_accuracy']:.3f}")
    if "win_rate_vs_sft" in metrics.get("evaluate", {}):
        parts.append(f"win rate vs SFT {metrics['evaluate']['win_rate_vs_sft']:.3f}")
    return ", ".join(parts)


def _show(args: argparse.Namespace) -> int:
    store = ArtifactStore.from_uri(args.store)
    key = f"runs/{args.run_id}/run.json"
    if not store.exists(key):
        raise InputError(f"{store.uri_of(key)}: no finished run {args.run_id!r} in this store (see `rlhf runs`)")
    summary = store.read_json(key)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    print(f"run {summary['run_id']}: {summary['status']} (store {summary['store']})")
    for name, stage in summary["stages"].items():
        print(f"  {name:<9} {stage['status']:<7} {stage['seconds']:7.1f}s  {json.dumps(stage['metrics'])}")


def _stage(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from stages.runner import run_stage

    config = read_config(args.config)
    overrides = args.overrides + ([f"run.store={args.store}"] if args.store else [])
    if overrides:
        config = PipelineConfig.model_validate(apply_overrides(config.model_dump(mode="json"), overrides))
    run_stage(args.name, config, ArtifactStore.from_uri(config.run.store))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from stages.formats import convert

    for row in convert(args.path, args.format, args.kind, args.split):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from stages.validation import validate_inputs

    config = _resolve(args)
    for line in validate_inputs(config):
        print(f"ok  {line}")
    print(f"{args.config}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
