#!/bin/sh
# The image's Python: the base's python3 (>= 3.11) in a venv at /opt/venv, installed from Debian/Ubuntu
# packages where the base has none; and the non-root user the images run as.
set -e
if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates
    rm -rf /var/lib/apt/lists/*
fi
python3 -m venv /opt/venv
useradd --create-home --uid 10001 rlhf
