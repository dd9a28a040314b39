"""Shared fixtures: two real S3 protocol servers (moto, in memory; localbucket, objects on disk, which can be
stopped and started again mid-run) and one Prefect test server per session."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

REPO = Path(__file__).resolve().parent.parent
RLHF = str(Path(sys.executable).parent / "rlhf")

# A pipeline small enough for tests on 2 CPU cores, with the same code paths as the demo.
TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "data.demo.sft_rows=400",
    "data.demo.preference_rows=400",
    "data.demo.prompt_rows=200",
    "sft.epochs=1",
    "sft.max_steps=100",
    "sft.batch_size=16",
    "sft.learning_rate=3e-3",
    "reward.max_steps=60",
    "reward.batch_size=16",
    "reward.learning_rate=2e-3",
    "rl.ppo.steps=12",
    "rl.ppo.batch_size=16",
    "rl.ppo.mini_batch_size=8",
    "rl.ppo.learning_rate=1e-4",
    "rl.ppo.generation.max_new_tokens=12",
    "rl.rejection_sampling.rounds=2",
    "rl.rejection_sampling.prompts_per_round=16",
    "rl.rejection_sampling.samples_per_prompt=4",
    "rl.rejection_sampling.generation.max_new_tokens=12",
    "rl.rejection_sampling.training.batch_size=8",
    "rl.rejection_sampling.training.learning_rate=1e-3",
    "evaluate.prompts=32",
    "evaluate.generation.max_new_tokens=12",
    "run.checkpoint_every=5",
    "run.retry_delay_seconds=0.5",
]


S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def tiny_args(*extra: str) -> list[str]:
    return [arg for override in [*TINY, *extra] for arg in ("--set", override)]


def rlhf(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """Stop a process this session started, by its PID: SIGTERM, then SIGKILL if it is still there after `grace`
    seconds (a busy Prefect worker or server can take longer to shut down than a test should wait)."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1; the AWS variables point every boto3 client (and child process) at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = dict(os.environ)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, **S3_TEST_CREDENTIALS)
    yield endpoint
    server.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


class LocalBucketServer:
    """localbucket, an S3 server that keeps its objects as files, on a loopback port: a second S3 implementation
    beside moto (it answers NotImplemented to DeleteObjects, as Google Cloud Storage does), and one that can go
    away and come back with its objects, like a restarted MinIO."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(Path(sys.executable).parent / "localbucket"), str(self.data_dir), "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"localbucket did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, grace=5)
            self.process = None


@pytest.fixture(scope="session")
def localbucket(tmp_path_factory):
    server = LocalBucketServer(tmp_path_factory.mktemp("localbucket"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def localbucket_bucket(localbucket, monkeypatch) -> str:
    """A fresh bucket on localbucket, with the AWS variables pointing at it for this test (and its children)."""
    for name, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", localbucket.endpoint)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect server for the whole session; child `rlhf run` processes reach it through PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        yield url
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


@pytest.fixture(autouse=True)
def isolated_prefect_home(tmp_path, monkeypatch):
    """Per-test Prefect home and result storage, so tests cannot see each other's results."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def forced_token(model, token_id: int, step: int):
    """Make `model` emit `token_id` as the `step`-th generated token (0-based) of every sequence: a forward hook
    on its output layer that counts generation steps (the prompt's forward pass is step 0). Random test models
    otherwise almost never sample a given special token."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) == step + 1:
            output[..., token_id] += 1e4
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
