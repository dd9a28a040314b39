"""A private Docker daemon, a CPU base image and the stage images, for `make test-containers`.

dockerd runs as root without iptables or a bridge (containers use the host's network), with its own data
and exec roots and socket, and is stopped by its PID. No registry is reachable: the base image is a Debian
root filesystem made by debootstrap, and the images install the project from wheels built here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_pipeline.stages.core.registry import STAGE_NAMES
from tests.conftest import REPO

DOCKER_ROOT = Path(os.environ.get("RLHF_DOCKER_ROOT", "/var/tmp/rlhf-docker"))
CPU_BASE_IMAGE = "rlhf-cpu-base:bookworm"
IMAGE_TAG = "test"
WHEELS = REPO / "docker" / "wheels"


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def docker_host():
    for program in ("dockerd", "docker", "debootstrap"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is missing: `make test-containers` installs docker.io and debootstrap")
    DOCKER_ROOT.mkdir(parents=True, exist_ok=True)
    socket = DOCKER_ROOT / "docker.sock"
    host = f"unix://{socket}"
    log = (DOCKER_ROOT / "dockerd.log").open("a")
    daemon = subprocess.Popen(
        [
            "dockerd",
            "--iptables=false",
            "--bridge=none",
            f"--data-root={DOCKER_ROOT / 'data'}",
            f"--exec-root={DOCKER_ROOT / 'exec'}",
            f"--pidfile={DOCKER_ROOT / 'docker.pid'}",
            "-H",
            host,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    saved = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host
    os.environ["DOCKER_BUILDKIT"] = "0"
    try:
        deadline = time.monotonic() + 60
        while docker("info").returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start; see {DOCKER_ROOT / 'dockerd.log'}")
            time.sleep(1)
        yield host
    finally:
        ids = docker("ps", "-aq").stdout.split()
        if ids:
            docker("rm", "-f", *ids)
        daemon.terminate()
        daemon.wait(timeout=60)
        log.close()
        netns = DOCKER_ROOT / "exec" / "netns" / "default"  # dockerd leaves its network namespace mounted
        if os.path.ismount(netns):
            subprocess.run(["umount", str(netns)], check=False)
        os.environ.pop("DOCKER_BUILDKIT", None)
        if saved is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved


@pytest.fixture(scope="session")
def cpu_base_image(docker_host) -> str:
    """Debian bookworm (minbase) with Python 3.11 and venv, imported as an image."""
    if docker("image", "inspect", CPU_BASE_IMAGE).returncode == 0:
        return CPU_BASE_IMAGE
    rootfs = DOCKER_ROOT / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
        ],
        check=True,
        capture_output=True,
    )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", CPU_BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs)
    return CPU_BASE_IMAGE


@pytest.fixture(scope="session")
def stage_images(cpu_base_image) -> dict[str, str]:
    """`rlhf-<stage>:test` for every stage, built from docker/Dockerfile offline on the CPU base."""
    WHEELS.mkdir(exist_ok=True)
    # The images' versions, resolved for this machine's Python; Debian's 3.11.2 also needs what markers add
    # below 3.11.3.
    requirements = ["torch==2.13.0", ".[train,flows,qlora]", "bitsandbytes==0.50.2", "setuptools", "async-timeout"]
    constraints = ["-c", str(REPO / "docker" / "constraints.txt")]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(WHEELS), *constraints, *requirements],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    (WHEELS / "rlhf_pipeline-0.1.0-py3-none-any.whl").unlink(missing_ok=True)
    return {stage: build_image(stage, cpu_base_image) for stage in STAGE_NAMES}


@pytest.fixture(scope="session")
def orchestrator_image(stage_images, cpu_base_image) -> str:
    """`rlhf-orchestrator:test` (the flows, no torch), from the wheels the stage images were built from."""
    return build_image("orchestrator", cpu_base_image)


def build_image(target: str, base: str) -> str:
    """The Dockerfile's target, offline on the CPU base (both bases: the classic builder goes through every
    stage before the target, the stage images' base among them)."""
    image = f"rlhf-{target}:{IMAGE_TAG}"
    build = docker(
        "build",
        "--network",
        "host",
        "-f",
        "docker/Dockerfile",
        "--target",
        target,
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"ORCHESTRATOR_BASE_IMAGE={base}",
        "--build-arg",
        "PIP_NO_INDEX=1",
        "-t",
        image,
        ".",
        cwd=REPO,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return image
