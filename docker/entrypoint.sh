#!/bin/sh
# Every image's entrypoint. A Prefect worker's command (`prefect flow-run execute`, or any program) runs as given.
# Otherwise a stage image runs its stage (`docker run rlhf-sft --config s3://bucket/run/config.yaml` is
# `rlhf stage sft --config ...`) and the orchestrator image the CLI (`docker run rlhf-orchestrator runs` is
# `rlhf runs`). In the pods after the first of a stage on several nodes (a Kubernetes indexed Job, whose pods all
# get the worker's command), the first pod runs the stage's flow run and the first node's processes, each other pod
# runs its own node's processes (`rlhf node`), which meet the first node's.
set -e
if [ "${JOB_COMPLETION_INDEX:-0}" != 0 ] && [ -n "${RLHF_NODE_CONFIG:-}" ]; then
    exec rlhf node "$RLHF_STAGE" --config "$RLHF_NODE_CONFIG" --node-rank "$JOB_COMPLETION_INDEX"
fi
case "$1" in
    prefect|python|python3|rlhf|sh) exec "$@" ;;
esac
if [ -n "${RLHF_STAGE:-}" ]; then
    exec rlhf stage "$RLHF_STAGE" "$@"
fi
exec rlhf "$@"
