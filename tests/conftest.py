"""Shared fixtures: two real S3 protocol servers (moto, in memory; localbucket, objects on disk, which can be
stopped and started again mid-run) and one Prefect server per session, on PostgreSQL as in infra/compose.yaml."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from rlhf_pipeline.flows.launchers.launcher import StageCrashed
from rlhf_pipeline.flows.launchers.process import ProcessLauncher
from rlhf_pipeline.stages.core.cpus import CPUS_ENV

REPO = Path(__file__).resolve().parent.parent
RLHF = str(Path(sys.executable).parent / "rlhf")


def artifact_key(store, uri: str) -> str:
    """The store key of an artifact URI that a run summary gives."""
    root = store.uri.rstrip("/") + "/"
    assert uri.startswith(root), (uri, store.uri)
    return uri[len(root) :]


# A pipeline small enough for tests on 2 CPU cores, with the same code paths as the demo.
# A manifest's losses and scores are rounded to 4 decimals: two runs within float rounding of each other can round
# to neighbours (0.6915 and 0.6916), one unit of the last decimal apart.
ROUNDED_METRIC = 1.5e-4
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
    # A checkpoint every 25 steps: four of sft's 100 steps, two of reward's 60. The tests that kill a stage
    # and resume it checkpoint more often (each checkpoint is a dozen uploads: at 5, a third of a run's requests).
    "run.checkpoint_every=25",
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


class MotoS3App(DomainDispatcherApplication):
    """moto's server application with S3 as its only service. moto otherwise works out the service of every
    request from its host, listing the folders of its ~200 backends and trying their URL patterns: over half of
    what each request cost, and a pipeline run makes about a thousand."""

    def get_backend_for_host(self, host: str | None) -> str:
        return "s3"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, in a thread; the AWS variables point every boto3 client (and child
    process) at it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(
        "127.0.0.1", 0, MotoS3App(create_backend_app), threaded=True, request_handler=MotoRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    saved = dict(os.environ)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, **S3_TEST_CREDENTIALS)
    yield endpoint
    server.shutdown()
    thread.join()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


class PidLog:
    """The launcher's logger: it says the stage process's pid."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def info(self, message, *args) -> None:
        if message.startswith("stage process pid"):
            self.pid = args[0]


class LaunchedStage:
    """A stage started as the pipeline starts it (`ProcessLauncher`), in a thread, for a test to do something
    to its processes while it trains; `crashed` holds its StageCrashed, if it crashes."""

    def __init__(self, stage: str, config_uri: str) -> None:
        self.log = PidLog()
        self.crashed: list[StageCrashed] = []
        self.thread = threading.Thread(target=self._launch, args=(stage, config_uri))
        self.thread.start()

    def _launch(self, stage: str, config_uri: str) -> None:
        try:
            ProcessLauncher().launch(stage, config_uri, self.log)
        except StageCrashed as exc:
            self.crashed.append(exc)

    def first_checkpoint(self, checkpoints: Path) -> int:
        """Once a checkpoint under `checkpoints` is complete (the stage process started): its step."""
        deadline = time.monotonic() + 300
        while not (complete := sorted(checkpoints.rglob("step-*/manifest.json"))) or not self.log.pid:
            assert time.monotonic() < deadline and self.thread.is_alive(), "no checkpoint: the stage was not training"
            time.sleep(0.02)
        return int(complete[0].parent.name.removeprefix("step-"))

    def processes(self) -> list[psutil.Process]:
        """The stage process and the processes it started (torchrun's)."""
        stage_process = psutil.Process(self.log.pid)
        return [stage_process, *stage_process.children(recursive=True)]


def kill_after_first_checkpoint(stage: str, config_path: Path, checkpoints: Path) -> int:
    """Start the stage as a real process; SIGKILL it once a checkpoint of it is complete, with the processes it
    started (torchrun's, which would otherwise train on for up to a second: a lost machine); that step."""
    launched = LaunchedStage(stage, str(config_path))
    step = launched.first_checkpoint(checkpoints)
    for process in launched.processes():
        process.send_signal(signal.SIGKILL)
    launched.thread.join()
    assert launched.crashed and "killed by SIGKILL" in str(launched.crashed[0]), "the stage ended before it was killed"
    return step


class LocalBucketServer:
    """localbucket, an S3 server that keeps its objects as files, on a loopback port: a second S3 implementation
    beside moto (it answers NotImplemented to DeleteObjects, as Google Cloud Storage does), and one that can go
    away and come back with its objects, like a restarted MinIO."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(Path(sys.executable).parent / "localbucket"), str(self.data_dir), "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, 30, self.process)

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


class PostgresServer:
    """Debian's PostgreSQL (`make test` installs it) in its own data directory, on a loopback port, trusting
    local connections. As root, it runs as the `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self, data_dir: Path) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not found:
            raise RuntimeError("PostgreSQL is not installed (make test installs Debian's postgresql)")
        self.bin = Path(found[-1])
        self.data_dir = data_dir
        self.port = free_port()

    def _run(self, *command: str) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_user, *command], check=True, capture_output=True, text=True)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-o",
            options,
            "-w",
            "-l",
            str(self.data_dir / "server.log"),
            "start",
        )

    def database(self, name: str) -> str:
        """A new database on this server, as the URL Prefect's server connects to."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")


@pytest.fixture(scope="session")
def postgres():
    """In a directory of its own under /tmp: the `postgres` user cannot enter pytest's private ones."""
    root = Path(tempfile.mkdtemp(prefix="rlhf-postgres-"))
    server = PostgresServer(root / "data")
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server.start()
        yield server
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api(postgres, tmp_path_factory):
    """One Prefect server for the whole session, on its own PostgreSQL database (a server on SQLite hit
    "database is locked" under load); child `rlhf run` processes reach it through PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    home = tmp_path_factory.mktemp("prefect-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.database("prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = (home / "server.log").open("w")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen([*command, "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_health(url, server, home / "server.log")
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
            drain_prefect_workers()
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
    finally:
        stop(server)
        log.close()


def drain_prefect_workers() -> None:
    """Send this process's queued logs and events before its server stops (as Prefect's test harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def wait_for_health(api_url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the Prefect server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no Prefect server at {api_url} after {timeout} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="session", autouse=True)
def one_compute_thread():
    """Every stage process of the session (forked, started by a launcher, or run here) runs one compute thread.
    A stage's sums come out in another order when its thread count changes, and a stage takes its share of the
    machine from the stage processes running beside it (`core.cpus`): the tests run on two workers side by side
    (`make test`), and those that compare bytes (a resumed run's, a recomputed artifact's) must not see what the
    other worker runs. The tests of that sharing set their own CPUs."""
    with pytest.MonkeyPatch.context() as session:
        session.setenv(CPUS_ENV, "1")
        yield


@pytest.fixture(autouse=True)
def isolated_prefect_home(tmp_path, monkeypatch):
    """Per-test Prefect home and result storage, so tests cannot see each other's results."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "prefect-results"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def forced_token(model, token_id: int, step: int | None, bias: float = 1e4):
    """Make `model` emit `token_id` as the `step`-th generated token (0-based) of every sequence, or favour it by
    `bias` in every forward pass where `step` is None: a forward hook on its output layer that counts generation
    steps (the prompt's forward pass is step 0). Random test models otherwise almost never sample a given
    special token."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if step is None or len(calls) == step + 1:
            output[..., token_id] += bias
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
