"""Training checkpoints in the store, so that a retried or rerun stage resumes where it stopped.

A checkpoint is an artifact like any other (files + manifest written last) under
`checkpoints/<stage>/<cache key>/step-<N>`; only complete ones count, the newest `keep` are kept. A half
written one has no manifest and does not count; a damaged one is set aside and the one before it is used.
Attempts at the same artifact (two runs at once, a retry racing its predecessor) share its checkpoints: each
resumes from the newest that any of them completed (they train the same thing, so it is theirs as well), and
each step's first manifest wins, as for artifacts. They are deleted once the artifact they lead to exists.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from rlhf_pipeline.stages.core.artifacts import fetch_dir, publish_dir, read_manifest
from rlhf_pipeline.stages.core.errors import DamagedArtifact
from rlhf_pipeline.stages.core.store import ArtifactStore

log = logging.getLogger("rlhf.stage")


class CheckpointStore:
    def __init__(self, store: ArtifactStore, stage: str, key: str, keep: int, root: str | None = None) -> None:
        self.store = store
        self.stage = stage
        self.key = key
        self.keep = keep
        self.root = root or f"checkpoints/{stage}/{key}"

    def nested(self, name: str) -> CheckpointStore:
        """Checkpoints of a second model trained in the same stage; cleared with this store's."""
        return CheckpointStore(self.store, self.stage, self.key, self.keep, f"{self.root}/{name}")

    def _prefix(self, step: int) -> str:
        return f"{self.root}/step-{step:08d}"

    def complete_steps(self) -> list[int]:
        names = self.store.list_children(self.root)
        steps = [int(name.removeprefix("step-")) for name in names if name.startswith("step-")]
        return sorted(s for s in steps if read_manifest(self.store, self._prefix(s)) is not None)

    def restore_latest(self, local_dir: Callable[[int], Path]) -> int | None:
        """Download the newest checkpoint that verifies into `local_dir(step)` and return its step; None when
        there is none. A damaged checkpoint is set aside (logged) and the previous one tried."""
        for step in reversed(self.complete_steps()):
            try:
                fetch_dir(self.store, self._prefix(step), local_dir(step))
            except DamagedArtifact as exc:
                log.warning("%s; falling back to the checkpoint before it", exc)
                shutil.rmtree(local_dir(step), ignore_errors=True)
                continue
            except Exception:
                if read_manifest(self.store, self._prefix(step)) is not None:
                    raise
                log.info("checkpoint at step %d pruned by another attempt while it downloaded", step)
                shutil.rmtree(local_dir(step), ignore_errors=True)
                continue
            return step
        return None

    def save(self, step: int, local_dir: Path) -> None:
        publish_dir(
            self.store,
            local_dir,
            self._prefix(step),
            {"stage": self.stage, "cache_key": self.key, "config": {}, "step": step},
        )
        for old in self.complete_steps()[: -self.keep]:
            self.store.delete_prefix(self._prefix(old))

    def clear(self) -> None:
        self.store.delete_prefix(self.root)
