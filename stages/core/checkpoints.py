"""Training checkpoints in the store, so that a retried or rerun stage resumes where it stopped.

A checkpoint is an artifact like any other (files + manifest written last) under
`checkpoints/<stage>/<cache key>/step-<N>`; only complete ones count, the newest `keep` are kept. A half
written one has no manifest and does not count; a damaged one is set aside and the one before it is used.
Attempts at the same artifact (two runs at once, a retry racing its predecessor) share its checkpoints: each
resumes from the newest that any of them completed (they train the same thing, so it is theirs as well), and
each step's first manifest wins, as for artifacts. They are deleted once the artifact they lead to exists.
A checkpoint of several processes holds what each of them wrote (its shards, its RNG state): every process
uploads its own files, on whatever machine it runs, and the main process writes the manifest over them all.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rlhf_pipeline.stages.core.artifacts import (
    FileEntry,
    attempt_folder,
    create_manifest,
    fetch_dir,
    read_manifest,
    upload_files,
)
from rlhf_pipeline.stages.core.errors import DamagedArtifact
from rlhf_pipeline.stages.core.store import ArtifactStore

log = logging.getLogger("rlhf.stage")


class StageProcesses(Protocol):
    """The processes of a multi-process stage (`modeling.data_parallel.Processes`)."""

    @property
    def main(self) -> bool: ...

    def gather_objects(self, mine: list[Any]) -> list[Any]: ...


class CheckpointStore:
    def __init__(self, store: ArtifactStore, stage: str, key: str, keep: int, root: str | None = None) -> None:
        self.store = store
        self.stage = stage
        self.key = key
        self.keep = keep
        self.root = root or f"checkpoints/{stage}/{key}"
        # Steps seen complete, so that each manifest is read once, not at every save's pruning: a manifest stays
        # until its checkpoint is deleted (no longer listed) or set aside as damaged (forgotten here when this
        # process does it; where another attempt does, pruning may keep it in place of an older good one).
        self._complete: set[int] = set()

    def nested(self, name: str) -> CheckpointStore:
        """Checkpoints of a second model trained in the same stage; cleared with this store's."""
        return CheckpointStore(self.store, self.stage, self.key, self.keep, f"{self.root}/{name}")

    def _prefix(self, step: int) -> str:
        return f"{self.root}/step-{step:08d}"

    def complete_steps(self) -> list[int]:
        names = self.store.list_children(self.root)
        steps = [int(name.removeprefix("step-")) for name in names if name.startswith("step-")]
        for step in steps:
            if step not in self._complete and read_manifest(self.store, self._prefix(step)) is not None:
                self._complete.add(step)
        return sorted(step for step in steps if step in self._complete)

    def restore_latest(self, local_dir: Callable[[int], Path], processes: StageProcesses | None = None) -> int | None:
        """Download the newest checkpoint that verifies into `local_dir(step)` and return its step; None when
        there is none. A damaged checkpoint is set aside (logged) and the previous one tried. With `processes`
        (a collective: every one of them calls this), they agree on one step: the main process's list of
        checkpoints, each tried until every process has it. Each listing on its own could differ, another
        attempt publishing or pruning between two processes' reads, and they would resume different steps."""
        steps = list(reversed(self.complete_steps()))
        if processes is not None:
            steps = processes.gather_objects([steps])[0]
        for step in steps:
            fetched = self._fetch(step, local_dir(step))
            if processes is not None:
                fetched = all(processes.gather_objects([fetched]))
            if fetched:
                return step
            self._complete.discard(step)
            shutil.rmtree(local_dir(step), ignore_errors=True)
        return None

    def _fetch(self, step: int, local_dir: Path) -> bool:
        """Whether the checkpoint downloaded whole; False where it was damaged (set aside) or pruned meanwhile."""
        try:
            fetch_dir(self.store, self._prefix(step), local_dir)
        except DamagedArtifact as exc:
            log.warning("%s; falling back to the checkpoint before it", exc)
            return False
        except Exception:
            if read_manifest(self.store, self._prefix(step)) is not None:
                raise
            log.info("checkpoint at step %d pruned by another attempt while it downloaded", step)
            return False
        return True

    def save(self, step: int, local_dir: Path, processes: StageProcesses | None = None) -> None:
        """The checkpoint in `local_dir`; with `processes`, every one of them calls this with the files it wrote
        (a collective: they all must), and the checkpoint is the union of their folders."""
        folder = attempt_folder()
        if processes is not None:
            folder = processes.gather_objects([folder])[0]  # the main process's: one attempt
        entries = upload_files(self.store, local_dir, self._prefix(step), folder)
        if processes is not None:
            entries = processes.gather_objects(entries)
            if not processes.main:
                return
        fields = {"stage": self.stage, "cache_key": self.key, "config": {}, "step": step}
        if create_manifest(self.store, self._prefix(step), folder, one_entry_per_path(entries), fields) is None:
            log.info(
                "%s: checkpoint at step %d passed over: another attempt's came first and is gone since "
                "(pruned or cleared)",
                self.root,
                step,
            )
        else:
            self._complete.add(step)  # this attempt's manifest or an earlier one's: complete either way
            log.info("%s: checkpoint at step %d saved to the store", self.root, step)
        for old in self.complete_steps()[: -self.keep]:
            self.store.delete_prefix(self._prefix(old))

    def clear(self) -> None:
        self.store.delete_prefix(self.root)


def one_entry_per_path(entries: list[FileEntry]) -> list[FileEntry]:
    """The processes' files, each path once: two processes may write the same file, never different bytes."""
    by_path: dict[str, FileEntry] = {}
    for entry in entries:
        if by_path.setdefault(entry.path, entry).sha256 != entry.sha256:
            raise RuntimeError(f"checkpoint file {entry.path}: two processes wrote different bytes")
    return list(by_path.values())
