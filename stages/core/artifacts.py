"""Artifacts: directories in the store whose `manifest.json`, written last, proves they are complete.

The manifest lists every file with size and sha256, the stage, its resolved config, its inputs' digests and
the code version. An artifact without a manifest does not exist; nor does one whose manifest cannot be read.
Two runs may compute the same artifact at once (two users, or a retry racing its predecessor): each attempt
uploads its files under its own folder of the artifact, and the manifest is created only where there is none
yet (an atomic create), naming the folder it vouches for. The first manifest wins and is never overwritten;
the later attempt removes its own upload and uses the winner's artifact.
Nothing from the store is trusted: a manifest naming a file outside its artifact is refused before anything is
written, downloads verify every digest, and an artifact that fails verification twice is set aside (its
manifest moved to `manifest.damaged-<time>.json`, nothing deleted) so that its stage is computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from rlhf_pipeline.stages.core.errors import DamagedArtifact, InputError
from rlhf_pipeline.stages.core.store import ArtifactStore

log = logging.getLogger("rlhf.stage")

MANIFEST = "manifest.json"
DAMAGED_MANIFEST = "manifest.damaged-"  # + when it was set aside: a damaged artifact's manifest, moved
# Pickles (the HF Trainer's `training_args.bin`) are never published: nothing read from the store is unpickled.
NEVER_PUBLISHED = {"training_args.bin"}
# What a stage records about its run (tracker event files of `run.report_to`, its metrics history and curves):
# they hold when and where it ran, so the content digest leaves them out.
LOGS_DIR = "logs"
# A training stage's metric curves plot wall-clock figures (tokens/s, runtimes): a record of the run.
CURVES_FILE = f"{LOGS_DIR}/curves.png"
# Figures drawn from an artifact's own numbers (core/plots.py): they add nothing the digest does not cover.
PLOTS_DIR = "plots"
REWARDS_FILE = f"{PLOTS_DIR}/rewards.png"
# A model artifact's card (README.md, modeling/model_card.py) describes the run that made it, whose metrics a
# resumed run reports from its own history: documentation, left out of the digest too.
MODEL_CARD = "README.md"


def in_digest(path: str) -> bool:
    """Whether an artifact's file is content that downstream stages key on (not logs, figures or the card)."""
    return path != MODEL_CARD and path.partition("/")[0] not in (LOGS_DIR, PLOTS_DIR)


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class InputRef(BaseModel):
    uri: str
    digest: str


class Manifest(BaseModel):
    stage: str
    cache_key: str
    code_version: str = Field("", description="of the modules the stage ran (empty for a checkpoint)")
    config: dict[str, Any]
    inputs: dict[str, InputRef] = {}
    files: list[FileEntry]
    files_at: str = Field("", description="the attempt's folder, under the artifact's prefix, holding the files")
    metrics: dict[str, Any] = {}
    licenses: list[str] = Field([], description="licences of all data this artifact was trained on")
    resumed_from: int | None = None
    step: int | None = Field(None, description="for checkpoints: the training step it holds")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    host: str = Field(default_factory=platform.node)

    @property
    def digest(self) -> str:
        """The content digest downstream stages key on: the files, nothing about when or where (so not the
        tracker logs, whose event files carry wall times and host names), nor the figures and the model card."""
        files = [f.model_dump() for f in self.files if in_digest(f.path)]
        listing = json.dumps(files, sort_keys=True)
        return hashlib.sha256(listing.encode()).hexdigest()

    def location(self, prefix: str, path: str) -> str:
        """The store key of one of the artifact's files."""
        return f"{prefix}/{self.files_at}/{path}" if self.files_at else f"{prefix}/{path}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(stage: str, config: dict[str, Any], input_digests: dict[str, str], code: str) -> str:
    """A stage's identity: its name, resolved config, inputs' digests and code version."""
    payload = {"stage": stage, "config": config, "inputs": input_digests, "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def artifact_prefix(stage: str, key: str) -> str:
    return f"artifacts/{stage}/{key}"


def read_manifest(store: ArtifactStore, prefix: str) -> Manifest | None:
    """The manifest of a complete artifact, or None where there is none (yet), or none that can be read."""
    key = f"{prefix}/{MANIFEST}"
    data = store.read_bytes_if_present(key)
    if data is None:
        return None
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        log.warning("%s: unreadable manifest, counted as no artifact (%s)", store.uri_of(key), exc.errors()[0]["msg"])
        return None
    for entry in manifest.files:
        if not is_inside(entry.path):
            raise InputError(f"{store.uri_of(key)}: file entry {entry.path!r} points outside the artifact")
    if manifest.files_at and not (is_inside(manifest.files_at) and "/" not in manifest.files_at):
        raise InputError(f"{store.uri_of(key)}: files_at {manifest.files_at!r} is not a folder of the artifact")
    return manifest


def is_inside(path: str) -> bool:
    """A relative path that stays inside the directory it is joined to."""
    parts = PurePosixPath(path).parts
    return bool(parts) and not path.startswith("/") and "\\" not in path and ".." not in parts


def set_aside(store: ArtifactStore, prefix: str, reason: str) -> None:
    """Move a damaged artifact's manifest out of the way: the artifact no longer exists for the planner, and
    its files stay where they are for whoever looks into it. Every process of a stage checks its inputs: the
    others find the manifest already moved."""
    manifest = store.read_bytes_if_present(f"{prefix}/{MANIFEST}")
    if manifest is None:
        log.error("%s: %s; set aside already", store.uri_of(prefix), reason)
        return
    aside = f"{prefix}/{DAMAGED_MANIFEST}{datetime.now(UTC):%Y%m%dT%H%M%S%f}.json"
    store.write_bytes(aside, manifest)
    store.delete(f"{prefix}/{MANIFEST}")
    log.error("%s: %s; set aside (manifest moved to %s)", store.uri_of(prefix), reason, aside)


def attempt_folder() -> str:
    """A name no other attempt at the same artifact uses, wherever and whenever it runs."""
    return f"attempt-{uuid.uuid4().hex[:12]}"


def publish_dir(store: ArtifactStore, local_dir: Path, prefix: str, manifest_fields: dict[str, Any]) -> Manifest:
    """Upload every file of `local_dir` under a folder of this attempt's own, then create the manifest: the
    artifact exists only once that lands (`create_manifest`)."""
    if store.exists(f"{prefix}/{MANIFEST}") and read_manifest(store, prefix) is None:
        # a manifest that cannot be parsed made the planner count no artifact, and would now refuse ours
        set_aside(store, prefix, "its manifest cannot be read")
    folder = attempt_folder()
    manifest = create_manifest(store, prefix, folder, upload_files(store, local_dir, prefix, folder), manifest_fields)
    if manifest is None:
        raise DamagedArtifact(f"{store.uri_of(prefix)}: another attempt's manifest is there but cannot be read")
    return manifest


def upload_files(store: ArtifactStore, local_dir: Path, prefix: str, folder: str) -> list[FileEntry]:
    """Every file of `local_dir` uploaded under the attempt's `folder` of the artifact; their entries for its
    manifest. Files are hashed while they upload (hashlib releases the GIL), so the digests cost no extra time."""
    paths = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    paths = [p for p in paths if p != MANIFEST and Path(p).name not in NEVER_PUBLISHED]
    with ThreadPoolExecutor(max_workers=1) as uploader:
        upload = uploader.submit(store.upload_files, {f"{prefix}/{folder}/{p}": local_dir / p for p in paths})
        entries = [
            FileEntry(path=p, size=(local_dir / p).stat().st_size, sha256=sha256_file(local_dir / p)) for p in paths
        ]
        upload.result()
    return entries


def create_manifest(
    store: ArtifactStore, prefix: str, folder: str, entries: list[FileEntry], manifest_fields: dict[str, Any]
) -> Manifest | None:
    """The manifest of the files uploaded under `folder`, created only where there is none yet. Where another
    attempt's manifest landed first, this attempt's files are removed and the other's manifest is returned: the
    artifact that exists is never changed. None where the other's could not be read: unreadable, or gone since
    (another attempt pruned its checkpoint, or cleared them all once its artifact landed; our upload with them)."""
    manifest = Manifest(files=sorted(entries, key=lambda entry: entry.path), files_at=folder, **manifest_fields)
    if store.create(f"{prefix}/{MANIFEST}", manifest.model_dump_json(indent=2).encode()):
        return manifest
    existing = read_manifest(store, prefix)
    if existing is not None and existing.files_at == folder:  # ours after all: the reply to the create was lost
        return existing
    store.delete_prefix(f"{prefix}/{folder}")
    log.info("%s: published first by another attempt; this attempt's upload removed", store.uri_of(prefix))
    return existing


def fetch_dir(store: ArtifactStore, prefix: str, local_dir: Path) -> Manifest:
    """Download a complete artifact and verify every file against its manifest. A file that does not match is
    downloaded once more (a transfer can go wrong); if it still does not, the artifact is damaged in the store:
    it is set aside and DamagedArtifact raised, so that no stage trains on it and its producer runs again."""
    manifest = read_manifest(store, prefix)
    if manifest is None and any(name.startswith(DAMAGED_MANIFEST) for name in store.list_children(prefix)):
        # another process of this stage (or another run) found it damaged: its producer is to run again
        raise DamagedArtifact(f"{store.uri_of(prefix)}: set aside as damaged, to be computed again")
    if manifest is None:
        raise InputError(f"{store.uri_of(prefix)}: no complete artifact there (manifest.json missing)")
    store.download_files({manifest.location(prefix, e.path): local_dir / e.path for e in manifest.files})
    mismatched = [e for e in manifest.files if sha256_file(local_dir / e.path) != e.sha256]
    if mismatched:
        store.download_files({manifest.location(prefix, e.path): local_dir / e.path for e in mismatched})
        damaged = [e.path for e in mismatched if sha256_file(local_dir / e.path) != e.sha256]
        if damaged:
            reason = f"sha256 of {', '.join(damaged)} does not match the manifest"
            set_aside(store, prefix, reason)
            raise DamagedArtifact(f"{store.uri_of(prefix)}: {reason}; set aside to be computed again")
    return manifest


def read_verified(store: ArtifactStore, prefix: str, path: str, manifest: Manifest | None = None) -> bytes:
    """One (small) file of a complete artifact, checked against its manifest (read here unless given)."""
    manifest = manifest or read_manifest(store, prefix)
    entry = next((e for e in manifest.files if e.path == path), None) if manifest is not None else None
    if manifest is None or entry is None:
        raise InputError(f"{store.uri_of(prefix)}/{path}: not a file of a complete artifact")
    data = store.read_bytes(manifest.location(prefix, path))
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DamagedArtifact(f"{store.uri_of(prefix)}/{path}: sha256 does not match the manifest")
    return data
