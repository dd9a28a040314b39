"""Artifacts: directories in the store whose `manifest.json`, written last, proves they are complete.

The manifest lists every file with size and sha256, the stage, its resolved config, its inputs' digests and
the code version. An artifact without a manifest does not exist; downloads verify every digest.
"""

from __future__ import annotations

import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from stages.errors import InputError
from stages.store import ArtifactStore

MANIFEST = "manifest.json"
# What a stage records about its run (tracker event files of `run.report_to`, its metrics history and curves):
# they hold when and where it ran, so the content digest leaves them out.
LOGS_DIR = "logs"


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
    code_version: str
    config: dict[str, Any]
    inputs: dict[str, InputRef] = {}
    files: list[FileEntry]
    metrics: dict[str, Any] = {}
    licenses: list[str] = Field([], description="licences of all data this artifact was trained on")
    resumed_from: int | None = None
    step: int | None = Field(None, description="for checkpoints: the training step it holds")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    host: str = Field(default_factory=platform.node)

    @property
    def digest(self) -> str:
        """The content digest downstream stages key on: the files, nothing about when or where (so not the
        tracker logs, whose event files carry wall times and host names)."""
        files = [f.model_dump() for f in self.files if not f.path.startswith(f"{LOGS_DIR}/")]
        listing = json.dumps(files, sort_keys=True)
        return hashlib.sha256(listing.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def code_version() -> str:
    """A digest of the `stages` package source: any change to training code invalidates cached artifacts."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(stage: str, config: dict[str, Any], input_digests: dict[str, str]) -> str:
    """A stage's identity: its name, resolved config, inputs' digests and code version."""
    payload = {"stage": stage, "config": config, "inputs": input_digests, "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def artifact_prefix(stage: str, key: str) -> str:
    return f"artifacts/{stage}/{key}"


def read_manifest(store: ArtifactStore, prefix: str) -> Manifest | None:
    """The manifest of a complete artifact, or None where there is none (yet)."""
    key = f"{prefix}/{MANIFEST}"
    if not store.exists(key):
        return None
    return Manifest.model_validate(store.read_json(key))


def publish_dir(store: ArtifactStore, local_dir: Path, prefix: str, manifest_fields: dict[str, Any]) -> Manifest:
    """Upload every file of `local_dir`, then the manifest: the artifact exists only once that lands.

    Files are hashed while they upload (hashlib releases the GIL), so the digests cost no extra time.
    """
    paths = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    paths = [p for p in paths if p != MANIFEST]
    with ThreadPoolExecutor(max_workers=1) as uploader:
        upload = uploader.submit(store.upload_files, {f"{prefix}/{p}": local_dir / p for p in paths})
        entries = [
            FileEntry(path=p, size=(local_dir / p).stat().st_size, sha256=sha256_file(local_dir / p)) for p in paths
        ]
        upload.result()
    manifest = Manifest(files=entries, code_version=code_version(), **manifest_fields)
    store.write_json(f"{prefix}/{MANIFEST}", manifest.model_dump(mode="json"))
    return manifest


def fetch_dir(store: ArtifactStore, prefix: str, local_dir: Path) -> Manifest:
    """Download a complete artifact and verify every file against its manifest."""
    manifest = read_manifest(store, prefix)
    if manifest is None:
        raise InputError(f"{store.uri_of(prefix)}: no complete artifact there (manifest.json missing)")
    store.download_files({f"{prefix}/{e.path}": local_dir / e.path for e in manifest.files})
    for entry in manifest.files:
        actual = sha256_file(local_dir / entry.path)
        if actual != entry.sha256:
            raise OSError(f"{store.uri_of(prefix)}/{entry.path}: sha256 {actual} does not match manifest")
    return manifest


def read_verified(store: ArtifactStore, prefix: str, path: str) -> bytes:
    """One (small) file of a complete artifact, checked against its manifest."""
    manifest = read_manifest(store, prefix)
    entry = next((e for e in manifest.files if e.path == path), None) if manifest is not None else None
    if entry is None:
        raise InputError(f"{store.uri_of(prefix)}/{path}: not a file of a complete artifact")
    data = store.read_bytes(f"{prefix}/{path}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise OSError(f"{store.uri_of(prefix)}/{path}: sha256 does not match manifest")
    return data
