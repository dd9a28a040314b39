#!/bin/sh
# A stage image runs its stage: `docker run rlhf-sft --config s3://bucket/run/config.yaml` is
# `rlhf stage sft --config ...`. A Prefect worker's command (`prefect flow-run execute`, or any program) runs as given.
set -e
case "$1" in
    prefect|python|python3|rlhf|sh) exec "$@" ;;
    *) exec rlhf stage "$RLHF_STAGE" "$@" ;;
esac
