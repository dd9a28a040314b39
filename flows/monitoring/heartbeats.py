"""Which runs are alive: a running pipeline keeps `runs/<run_id>/heartbeat.json` fresh in the store, and the
next run on the same store marks those whose heartbeat stopped as crashed, in the store and in Prefect.

A SIGKILLed `rlhf run` (or a lost machine) cannot report its own end, so its Prefect flow run would stay
"Running" for ever. The heartbeat names the flow run, its host and process, the config and the stages done so
far; a run is dead when its process is gone (the same pid namespace of the same boot: a container on the same
host, even with the host's network and name, numbers its processes apart) or its heartbeat is older than
STALE_SECONDS. The run that finds it writes its `run.json` (status `crashed`, the stages it finished), sets its
flow run Crashed, and, where it runs the same config, says that it resumes it.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from rlhf_pipeline.stages.core.progress import process_alive
from rlhf_pipeline.stages.core.store import ArtifactStore

log = logging.getLogger("rlhf.flows")

BEAT_SECONDS = 20
STALE_SECONDS = 120


def heartbeat_key(run_id: str) -> str:
    return f"runs/{run_id}/heartbeat.json"


class RunHeartbeat:
    """Writes the run's heartbeat now and every BEAT_SECONDS from a thread, until the run ends; a store that
    cannot be written for a while costs a warning, never the run."""

    def __init__(self, store: ArtifactStore, run_id: str, flow_run_id: str | None, config_hash: str) -> None:
        self.store = store
        self.key = heartbeat_key(run_id)
        self.record: dict[str, Any] = {
            "run_id": run_id,
            "flow_run_id": flow_run_id,
            "config_hash": config_hash,
            "host": platform.node(),
            "pid": os.getpid(),
            "pid_namespace": pid_namespace(),
            "stages": {},
        }
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="rlhf-heartbeat", daemon=True)

    def __enter__(self) -> RunHeartbeat:
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """An ended run's heartbeat goes; one that raised keeps it, for the next run to mark it crashed."""
        self.stopped.set()
        self.thread.join()
        if exc_type is None:
            self.store.delete(self.key)

    def update(self, stages: dict[str, Any]) -> None:
        self.record["stages"] = dict(stages)
        self.beat()

    def beat(self) -> None:
        try:
            self.store.write_json(self.key, self.record | {"beat_at": datetime.now(UTC).isoformat()})
        except Exception as exc:  # the next beat tries again
            log.warning("heartbeat of run %s not written: %s", self.record["run_id"], exc)

    def _beat(self) -> None:
        while not self.stopped.wait(BEAT_SECONDS):
            self.beat()


def pid_namespace() -> str:
    """Where a process id names one process: this boot of this machine, this pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{platform.node()} {boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:  # not Linux: the host's name alone
        return platform.node()


def is_dead(heartbeat: dict[str, Any], now: datetime) -> bool:
    if heartbeat.get("pid_namespace") == pid_namespace() and not process_alive(heartbeat["pid"]):
        return True
    return now - datetime.fromisoformat(heartbeat["beat_at"]) > timedelta(seconds=STALE_SECONDS)


def heartbeat_of(store: ArtifactStore, run_id: str, now: datetime) -> tuple[dict[str, Any], bool] | None:
    """A run's heartbeat and whether it stopped; None where the run has none, or one that cannot be read
    (logged and left as it is)."""
    key = heartbeat_key(run_id)
    try:
        heartbeat = store.read_json_if_present(key)
        return None if heartbeat is None else (heartbeat, is_dead(heartbeat, now))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable heartbeat, left as it is (%s)", store.uri_of(key), exc)
        return None


def mark_dead_runs(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every run of the store whose heartbeat stopped, marked crashed (its `run.json` written, its heartbeat
    removed, its Prefect flow run set Crashed); their heartbeats are returned."""
    now = datetime.now(UTC)
    dead = []
    for run_id in store.list_children("runs"):
        if store.exists(f"runs/{run_id}/run.json"):
            continue
        found = heartbeat_of(store, run_id, now)
        if found is None or not found[1]:
            continue
        heartbeat = found[0]
        reason = f"no heartbeat since {heartbeat['beat_at'][:19]} (host {heartbeat['host']}, pid {heartbeat['pid']})"
        store.write_json(
            f"runs/{run_id}/run.json",
            {
                "run_id": run_id,
                "status": "crashed",
                "store": store.uri,
                "stages": heartbeat["stages"],
                "recomputed": [],
                "finished_at": heartbeat["beat_at"],
                "error": reason,
            },
        )
        store.delete(heartbeat_key(run_id))
        mark_flow_run_crashed(heartbeat["flow_run_id"], f"run {run_id}: {reason}")
        log.warning("run %s crashed: %s", run_id, reason)
        dead.append(heartbeat)
    return dead


def mark_flow_run_crashed(flow_run_id: str | None, message: str) -> None:
    """Set the flow run Crashed on this Prefect server, where it is one of its own."""
    if flow_run_id is None:
        return
    with get_client(sync_client=True) as client:
        try:
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
        except ObjectNotFound:
            log.info("flow run %s is not on this Prefect server: left as it is", flow_run_id)
