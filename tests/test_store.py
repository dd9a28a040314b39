"""The artifact store on a local directory and on a real S3 protocol server: manifests, digests, streaming."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from stages.artifacts import MANIFEST, fetch_dir, publish_dir, read_manifest, sha256_file
from stages.checkpoints import CheckpointStore
from stages.errors import InputError
from stages.store import ArtifactStore, LocalStore, S3Store, read_uri

FIELDS = {"stage": "sft", "cache_key": "k", "config": {"lr": 1}}


def _make_dir(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(200_000))
    (root / "metrics.json").write_text('{"loss": 1.0}')
    return root


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(f"s3://{bucket}/prefix")


def test_publish_then_fetch_round_trips_and_verifies(store, tmp_path):
    source = _make_dir(tmp_path / "src")
    manifest = publish_dir(store, source, "artifacts/sft/k", FIELDS)
    assert {f.path for f in manifest.files} == {"model/weights.bin", "metrics.json"}
    assert manifest.code_version and manifest.stage == "sft"

    fetched = fetch_dir(store, "artifacts/sft/k", tmp_path / "dst")
    assert fetched.digest == manifest.digest
    for entry in manifest.files:
        assert sha256_file(tmp_path / "dst" / entry.path) == sha256_file(source / entry.path) == entry.sha256


def test_artifact_without_manifest_does_not_exist(store, tmp_path):
    source = _make_dir(tmp_path / "src")
    store.upload_files({f"artifacts/x/k/{p.name}": p for p in source.rglob("*") if p.is_file()})
    assert read_manifest(store, "artifacts/x/k") is None
    with pytest.raises(InputError, match="manifest.json missing"):
        fetch_dir(store, "artifacts/x/k", tmp_path / "dst")


def test_tampered_file_fails_its_digest(store, tmp_path):
    publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS)
    store.write_bytes("artifacts/sft/k/metrics.json", b'{"loss": 0.0}')
    with pytest.raises(OSError, match="does not match manifest"):
        fetch_dir(store, "artifacts/sft/k", tmp_path / "dst")


def test_manifest_is_written_last(tmp_path):
    """A publish that dies while uploading leaves no manifest, hence no artifact."""

    class DyingStore(LocalStore):
        def upload_files(self, files):
            super().upload_files(dict(list(files.items())[:1]))
            raise ConnectionError("network gone")

    store = DyingStore(tmp_path / "store")
    with pytest.raises(ConnectionError):
        publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS)
    assert not store.exists(f"artifacts/sft/k/{MANIFEST}")
    assert read_manifest(store, "artifacts/sft/k") is None


def test_listing_and_deleting(store):
    for key in ("a/1/x", "a/1/y", "a/2/x", "a/z"):
        store.write_bytes(key, b"1")
    assert store.list_children("a") == ["1", "2", "z"]
    store.delete_prefix("a/1")
    assert store.list_children("a") == ["2", "z"]
    assert store.read_bytes("a/2/x") == b"1"
    assert read_uri(store.uri_of("a/z")) == b"1"


def test_checkpoints_keep_the_newest_complete_ones(store, tmp_path):
    checkpoints = CheckpointStore(store, "rl", "key", keep=2)
    assert checkpoints.latest() is None
    for step in (5, 10, 15):
        directory = tmp_path / f"ckpt-{step}"
        directory.mkdir()
        (directory / "state.txt").write_text(str(step))
        checkpoints.save(step, directory)
    store.write_bytes(f"checkpoints/rl/key/step-{20:08d}/state.txt", b"partial, no manifest")
    assert checkpoints.complete_steps() == [10, 15]
    assert checkpoints.latest() == 15
    checkpoints.restore(15, tmp_path / "restored")
    assert (tmp_path / "restored" / "state.txt").read_text() == "15"
    checkpoints.clear()
    assert checkpoints.latest() is None


def test_s3_multipart_upload_streams_large_files(s3_bucket, tmp_path):
    store = S3Store(f"s3://{s3_bucket}/big")
    store.transfer_config.multipart_threshold = store.transfer_config.multipart_chunksize = 5 * 1024 * 1024
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    store.upload_files({"big.bin": big})
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="big/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    store.download_files({"big.bin": tmp_path / "back.bin"})
    assert sha256_file(tmp_path / "back.bin") == sha256_file(big)


def test_unknown_store_scheme_is_an_input_error():
    with pytest.raises(InputError, match="only local paths and s3://"):
        ArtifactStore.from_uri("gs://bucket/x")
