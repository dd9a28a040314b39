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
from stages.config import PipelineConfig, apply_overrides, load_config, parse_config_text
from stages.errors import InputError
from stages.store import ArtifactStore, read_uri


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


def _print_summary(summary: dict) -> None:
    print(f"run {summary['run_id']}: {summary['status']} (store {summary['store']})")
    for name, stage in summary["stages"].items():
        print(f"  {name:<9} {stage['status']:<7} {stage['seconds']:7.1f}s  {json.dumps(stage['metrics'])}")


def _stage(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from stages.runner import run_stage

    config = parse_config_text(_read_config_text(args.config), args.config)
    overrides = args.overrides + ([f"run.store={args.store}"] if args.store else [])
    if overrides:
        config = PipelineConfig.model_validate(apply_overrides(config.model_dump(mode="json"), overrides))
    run_stage(args.name, config, ArtifactStore.from_uri(config.run.store))
    return 0


def _read_config_text(location: str) -> str:
    try:
        return read_uri(location).decode()
    except Exception as exc:
        raise InputError(f"{location}: cannot read config ({exc})") from None


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
