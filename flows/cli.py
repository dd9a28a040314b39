"""The `rlhf` command: run the pipeline, run one stage, validate a config.

Bad input exits with code 2 and a one-line message naming the file and the field, never a traceback; a damaged
artifact in the store (set aside, to be computed again) with code 3; a full disk with code 1 (worth a retry)
and a message saying so.
The Prefect side and the training side are imported only by the subcommands that need them.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from rlhf_pipeline.stages.core.config import DataConfig, PipelineConfig, RunConfig
from rlhf_pipeline.stages.core.config_loading import load_config, read_config, with_overrides
from rlhf_pipeline.stages.core.errors import (
    ERROR_PREFIX,
    EXIT_DAMAGED_ARTIFACT,
    EXIT_INPUT_ERROR,
    DamagedArtifact,
    InputError,
)
from rlhf_pipeline.stages.core.progress import stop_with_launcher
from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from rlhf_pipeline.stages.core.store import ArtifactStore

EPHEMERAL_STARTUP_TIMEOUT_S = "180"
DISK_FULL_ADVICE = (
    "free space in the work directory's file system (TMPDIR), or give the stage more "
    "(deploy.stages.<stage>.work_storage on Kubernetes); a retry first removes what killed attempts left behind"
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except DamagedArtifact as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_DAMAGED_ARTIFACT
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"{ERROR_PREFIX}no space left on the device{where}: {DISK_FULL_ADVICE}", file=sys.stderr)
        return 1


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

    node = commands.add_parser(
        "node",
        help="start one node's processes of a stage on several nodes (deploy.stages.<stage>.nodes); the nodes meet "
        "at the first one, RLHF_NODE0_ADDRESS (host:port, default 127.0.0.1:29500)",
    )
    node.add_argument("name", choices=STAGE_NAMES)
    node.add_argument("--config", required=True, help="resolved config: a local path or s3://bucket/key")
    node.add_argument("--node-rank", type=int, required=True, help="this node's number, 0 being the first")
    node.set_defaults(handler=_node)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(required=True, metavar="COMMAND")
    convert = data.add_parser("convert", help="print a dataset's rows in TRL's conversational format as JSONL")
    convert.add_argument(
        "path", help="a .json/.jsonl/.csv/.parquet file (the first three also .gz) or a Hugging Face Hub dataset id"
    )
    convert.add_argument("--format", required=True, help="dolly, alpaca, oasst, shp, hh-rlhf, messages, ...")
    convert.add_argument("--kind", required=True, choices=("sft", "preference", "prompt"))
    convert.add_argument("--split", default="train", help="the Hub dataset's split")
    convert.add_argument(
        "--max-skipped-fraction",
        type=float,
        default=DataConfig().max_skipped_fraction,
        help="refuse the dataset when more of its rows than this share cannot be used (default: %(default)s)",
    )
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

    ui = commands.add_parser("ui", help="start a local Prefect server with its UI (on 127.0.0.1 by default)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (keep 127.0.0.1 unless you mean it)")
    ui.add_argument("--port", type=int, default=4200)
    ui.set_defaults(handler=_ui)

    validate = commands.add_parser("validate", help="check a config and every input it names")
    validate.add_argument("config")
    _add_common(validate)
    validate.set_defaults(handler=_validate)
    _add_model_commands(commands)
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
    return load_config(args.config, _overrides(args))


def _overrides(args: argparse.Namespace) -> list[str]:
    """The `--set` overrides, and `--store` as `run.store`: quoted, since a path is a string whatever YAML would
    read in it (`2025`, `yes`, `@runs`)."""
    return args.overrides + ([f"run.store={json.dumps(args.store)}"] if args.store else [])


def _prefect_defaults() -> None:
    """Settings Prefect reads when it is first imported, so before that. Without PREFECT_API_URL a run starts
    Prefect's ephemeral server, which creates and migrates its database on first use: 28-33 s on a 2-core machine
    with a fresh PREFECT_HOME (16-19 s after), past the 20 s Prefect waits for it by default (`make demo` on a
    fresh machine failed its first run with Prefect's traceback)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)


def _run(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from rlhf_pipeline.flows.monitoring.run_view import print_summary, watching
    from rlhf_pipeline.flows.pipeline import run_pipeline, step_labels
    from rlhf_pipeline.stages.tools.validate import validate_inputs

    config = _resolve(args)
    validate_inputs(config)
    with watching(step_labels(config)):
        summary = run_pipeline(config)
    print_summary(summary)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0 if summary["status"] == "completed" else 1


def _deploy(args: argparse.Namespace) -> int:
    _prefect_defaults()
    from rlhf_pipeline.flows.deployments import deploy

    config = _resolve(args)
    for name in deploy(config, args.pool_type):
        print(f"deployment {name} on work pool {config.deploy.work_pool!r} ({args.pool_type})")
    print(f"start a worker: prefect worker start --pool {config.deploy.work_pool} --type {args.pool_type}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    """Replaces this process with `prefect server start`, so that stopping `rlhf ui` stops the server."""
    address = f"http://{args.host}:{args.port}"
    print(f"Prefect UI at {address} (stop with Ctrl-C)")
    print(f"runs show there when started with: export PREFECT_API_URL={address}/api", flush=True)
    server = ["server", "start", "--host", args.host, "--port", str(args.port), "--ui", "--analytics-off"]
    # The UI's pages call the API it is told of, by default the one on port 4200: tell it this one.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.setdefault("PREFECT_UI_API_URL", f"{address}/api")
    os.execve(sys.executable, [sys.executable, "-m", "prefect", *server], env)


def _runs(args: argparse.Namespace) -> int:
    from rlhf_pipeline.flows.monitoring.heartbeats import heartbeat_of
    from rlhf_pipeline.flows.monitoring.run_view import headline

    store = ArtifactStore.from_uri(args.store)
    store.check_access()
    rows = []
    now = datetime.now(UTC)
    for run_id in store.list_children("runs"):
        summary = store.read_json_if_present(f"runs/{run_id}/run.json")
        if summary is None:
            found = heartbeat_of(store, run_id, now)
            status = "stopped" if found is None else "crashed" if found[1] else "running"
            summary = {"status": status, "stages": {}}
        metrics = {name: stage["metrics"] for name, stage in summary["stages"].items()}
        rows.append((summary.get("finished_at", ""), run_id, summary["status"], headline(metrics)))
    if not rows:
        print(f"no runs in {store.uri}")
    for finished, run_id, status, numbers in sorted(rows, reverse=True):
        print(f"{run_id:<40} {status:<18} {finished[:19]:<19}  {numbers}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from rlhf_pipeline.flows.monitoring.run_view import print_summary

    store = ArtifactStore.from_uri(args.store)
    store.check_access()
    key = f"runs/{args.run_id}/run.json"
    summary = store.read_json_if_present(key)
    if summary is None:
        raise InputError(f"{store.uri_of(key)}: no finished run {args.run_id!r} in this store (see `rlhf runs`)")
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0


def _stage(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from rlhf_pipeline.stages.runner import run_stage

    stop_with_launcher()
    config = read_config(args.config)
    if overrides := _overrides(args):
        config = with_overrides(config, overrides)
    run_stage(args.name, config, config.run.open_store())
    return 0


def _node(args: argparse.Namespace) -> int:
    from rlhf_pipeline.flows.launchers.process import run_node

    return run_node(args.name, args.config, args.node_rank)


def _convert(args: argparse.Namespace) -> int:
    from rlhf_pipeline.stages.data.formats import convert

    converted = convert(args.path, args.format, args.kind, args.split, args.max_skipped_fraction)
    for row in converted.rows:
        print(json.dumps(row, ensure_ascii=False))
    if converted.skipped.count:
        print(f"{args.path}: {converted.skipped.summary()}", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from rlhf_pipeline.stages.tools.validate import validate_inputs

    config = _resolve(args)
    for line in validate_inputs(config):
        print(f"ok  {line}")
    print(f"{args.config}: valid")
    return 0


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser("compare", help="answer the same prompts with several models, side by side")
    compare.add_argument("models", nargs="+", metavar="MODEL_URI", help="a policy artifact's URI or a model directory")
    compare.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        default=[],
        metavar="TEXT",
        help="a user prompt; repeatable (default: held-out prompts of the run)",
    )
    compare.add_argument("--prompts-file", help="a file of user prompts, one a line")
    compare.add_argument("--max-new-tokens", type=int, default=128)
    compare.add_argument("--json", action="store_true", help="print the answers as JSON on the last line")
    compare.set_defaults(handler=_compare)

    chat = commands.add_parser("chat", help="chat with a model: user turns on stdin, until EOF or /exit")
    chat.add_argument("model", metavar="MODEL_URI", help="a policy artifact's URI or a model directory")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.set_defaults(handler=_chat)


def _compare(args: argparse.Namespace) -> int:
    from rlhf_pipeline.stages.tools.chat import ChatModel, default_prompts, fetch_model

    with tempfile.TemporaryDirectory(prefix="rlhf-compare-") as tmp:
        sources = [fetch_model(uri, Path(tmp)) for uri in args.models]
        prompts = [[{"role": "user", "content": text}] for text in _prompt_texts(args)] or default_prompts(sources)
        labels = _distinct([source.label for source in sources])
        answers = {
            label: ChatModel.load(source).answer(prompts, args.max_new_tokens)
            for label, source in zip(labels, sources, strict=True)
        }
    shown = [conversation[-1]["content"] for conversation in prompts]
    if args.json:
        print(json.dumps({"models": labels, "prompts": shown, "answers": answers}))
        return 0
    width = max(map(len, labels))
    for label, uri in zip(labels, args.models, strict=True):
        print(f"{label:<{width}}  {uri}")
    for i, prompt in enumerate(shown):
        print(f"\n[{i + 1}] {prompt}")
        for label in labels:
            print(f"  {label:<{width}}  {answers[label][i]}")
    return 0


def _prompt_texts(args: argparse.Namespace) -> list[str]:
    if not args.prompts_file:
        return args.prompts
    try:
        lines = Path(args.prompts_file).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"{args.prompts_file}: cannot read the prompts ({exc.strerror})") from None
    return args.prompts + [line.strip() for line in lines if line.strip()]


def _distinct(labels: list[str]) -> list[str]:
    """A label two models share gets each one's position appended."""
    return [label if labels.count(label) == 1 else f"{label}#{i + 1}" for i, label in enumerate(labels)]


def _chat(args: argparse.Namespace) -> int:
    from rlhf_pipeline.stages.tools.chat import ChatModel, fetch_model

    conversation = [{"role": "system", "content": args.system}] if args.system else []
    prompt = "you> " if sys.stdin.isatty() else ""
    with tempfile.TemporaryDirectory(prefix="rlhf-chat-") as tmp:
        model = ChatModel.load(fetch_model(args.model, Path(tmp)))
        while (line := _read_turn(prompt)) != "/exit":
            if not line:
                continue
            conversation = model.within_context([*conversation, {"role": "user", "content": line}], args.max_new_tokens)
            reply = model.answer([conversation], args.max_new_tokens)[0]
            conversation.append({"role": "assistant", "content": reply})
            print(f"{model.label}> {reply}", flush=True)
    return 0


def _read_turn(prompt: str) -> str:
    """The user's next line; end of input (or Ctrl-C at the prompt) reads as `/exit`."""
    try:
        return input(prompt).strip()
    except (EOFError, KeyboardInterrupt):
        return "/exit"


if __name__ == "__main__":
    sys.exit(main())
