"""The artifact store on a local directory and on two real S3 protocol servers (moto; localbucket, which keeps
objects on disk and lacks DeleteObjects): manifests, digests, streaming, and trusting nothing the store says."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError

from rlhf_pipeline.stages.core.artifacts import MANIFEST, fetch_dir, publish_dir, read_manifest, set_aside, sha256_file
from rlhf_pipeline.stages.core.checkpoints import CheckpointStore
from rlhf_pipeline.stages.core.errors import DamagedArtifact, InputError
from rlhf_pipeline.stages.core.store import ArtifactStore, LocalStore, S3Store, read_uri
from rlhf_pipeline.stages.tools.chat import input_uri

FIELDS = {"stage": "sft", "cache_key": "k", "code_version": "c0de", "config": {"lr": 1}}


def _make_dir(root: Path) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(200_000))
    (root / "metrics.json").write_text('{"loss": 1.0}')
    return root


@pytest.fixture(params=["local", "moto", "localbucket"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue({"moto": "s3_bucket", "localbucket": "localbucket_bucket"}[request.param])
    return S3Store(f"s3://{bucket}/prefix")


def _damage(store: ArtifactStore, key: str) -> None:
    """Flip one byte of a stored file, as a failing disk or a bad copy would."""
    data = bytearray(store.read_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(key, bytes(data))


def test_publish_then_fetch_round_trips_and_verifies(store, tmp_path):
    source = _make_dir(tmp_path / "src")
    manifest = publish_dir(store, source, "artifacts/sft/k", FIELDS)
    assert {f.path for f in manifest.files} == {"model/weights.bin", "metrics.json"}
    assert manifest.code_version == "c0de" and manifest.stage == "sft"

    fetched = fetch_dir(store, "artifacts/sft/k", tmp_path / "dst")
    assert fetched.digest == manifest.digest
    for entry in manifest.files:
        assert sha256_file(tmp_path / "dst" / entry.path) == sha256_file(source / entry.path) == entry.sha256


def test_an_object_that_is_not_there_reads_as_none(store):
    store.write_bytes("a/b/object", b"bytes")
    assert store.read_bytes_if_present("a/b/object") == b"bytes"
    assert store.read_bytes_if_present("a/b/other") is None
    assert store.read_bytes_if_present("a/b") is None  # a folder (a prefix) is no object
    assert store.read_bytes_if_present("a/b/object/below") is None


def test_only_the_first_create_of_a_key_lands(store):
    """Eight writers race to create one key: exactly one succeeds, and what it wrote stays."""
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def create(i: int) -> None:
        barrier.wait()
        results[i] = store.create("runs/race.json", f"writer {i}".encode())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, created in results.items() if created]
    assert len(winners) == 1 and store.read_bytes("runs/race.json") == f"writer {winners[0]}".encode()
    assert store.list_children("runs") == ["race.json"]  # no temporary file left behind


def test_two_attempts_at_one_artifact_the_first_manifest_wins(store, tmp_path):
    """Two runs compute the same artifact at once (different bytes, as on a GPU): each uploads under its own
    folder, the first manifest wins, the second attempt removes its upload and gets the winner's manifest;
    the winner's files are never touched, and they verify."""
    first = publish_dir(store, _make_dir(tmp_path / "first"), "artifacts/sft/k", FIELDS)
    second = publish_dir(store, _make_dir(tmp_path / "second"), "artifacts/sft/k", FIELDS)
    assert second == first
    assert store.list_children("artifacts/sft/k") == sorted([first.files_at, MANIFEST])
    fetched = fetch_dir(store, "artifacts/sft/k", tmp_path / "dst")
    assert fetched.digest == first.digest
    assert sha256_file(tmp_path / "dst" / "model/weights.bin") == sha256_file(tmp_path / "first/model/weights.bin")


def test_a_checkpoint_that_another_attempt_clears_before_it_is_read_is_passed_over(store, tmp_path):
    """Two attempts race to the last checkpoint; the other's manifest lands first, then goes before this attempt
    reads it (the other published the artifact and cleared its checkpoints, our upload with them): this attempt
    goes on (the step is done), it does not fail the stage. An artifact's manifest that cannot be read fails."""
    checkpoints = CheckpointStore(store, "sft", "k", keep=2)
    create = store.create

    def create_then_clear(key: str, data: bytes) -> bool:
        store.create = create  # once
        assert create(key, b'{"written by": "the other attempt"}')
        checkpoints.clear()
        return False

    store.create = create_then_clear
    checkpoints.save(40, _make_dir(tmp_path / "src"))
    assert checkpoints.complete_steps() == [] and store.list_children("checkpoints/sft/k") == []
    checkpoints.save(45, _make_dir(tmp_path / "next"))
    assert checkpoints.complete_steps() == [45]

    def create_unreadable(key: str, data: bytes) -> bool:  # lands while this attempt uploads
        store.create = create
        store.write_bytes(key, b"not a manifest")
        return False

    store.create = create_unreadable
    with pytest.raises(DamagedArtifact, match="another attempt's manifest is there but cannot be read"):
        publish_dir(store, _make_dir(tmp_path / "artifact"), "artifacts/sft/k", FIELDS)
    assert store.list_children("artifacts/sft/k") == [MANIFEST]  # this attempt's upload removed


def test_a_manifest_whose_files_folder_leaves_the_artifact_is_refused(store, tmp_path):
    manifest = publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS)
    for folder in ("../other", "/etc", "a/b"):
        store.write_json(f"artifacts/sft/k/{MANIFEST}", manifest.model_dump(mode="json") | {"files_at": folder})
        with pytest.raises(InputError, match=f"files_at {folder!r} is not a folder of the artifact"):
            read_manifest(store, "artifacts/sft/k")


def test_artifact_without_manifest_does_not_exist(store, tmp_path):
    source = _make_dir(tmp_path / "src")
    store.upload_files({f"artifacts/x/k/{p.name}": p for p in source.rglob("*") if p.is_file()})
    assert read_manifest(store, "artifacts/x/k") is None
    with pytest.raises(InputError, match="manifest.json missing"):
        fetch_dir(store, "artifacts/x/k", tmp_path / "dst")


def test_a_damaged_artifact_is_set_aside_not_deleted(store, tmp_path):
    manifest = publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS)
    _damage(store, manifest.location("artifacts/sft/k", "model/weights.bin"))
    with pytest.raises(DamagedArtifact, match="sha256 of model/weights.bin does not match the manifest"):
        fetch_dir(store, "artifacts/sft/k", tmp_path / "dst")
    assert read_manifest(store, "artifacts/sft/k") is None  # the planner computes it again
    aside = [name for name in store.list_children("artifacts/sft/k") if name.startswith("manifest.damaged-")]
    assert len(aside) == 1 and json.loads(store.read_bytes(f"artifacts/sft/k/{aside[0]}"))["files"] == [
        f.model_dump() for f in manifest.files
    ]
    assert store.exists(manifest.location("artifacts/sft/k", "model/weights.bin"))  # nothing deleted
    # The stage's other processes check the same input: they find it set aside, which is no input error
    set_aside(store, "artifacts/sft/k", "sha256 of model/weights.bin does not match the manifest")
    with pytest.raises(DamagedArtifact, match="set aside as damaged, to be computed again"):
        fetch_dir(store, "artifacts/sft/k", tmp_path / "other-process")
    assert len([name for name in store.list_children("artifacts/sft/k") if name.startswith("manifest.damaged-")]) == 1


def test_an_unreadable_manifest_is_set_aside_when_the_stage_publishes_again(store, tmp_path):
    """Counted as no artifact, so the stage ran again; its publish used to fail on the unreadable manifest, on
    every run."""
    store.write_bytes(f"artifacts/sft/k/{MANIFEST}", b'{"files": [truncated')
    assert read_manifest(store, "artifacts/sft/k") is None
    manifest = publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS)
    assert read_manifest(store, "artifacts/sft/k") == manifest
    aside = [name for name in store.list_children("artifacts/sft/k") if name.startswith("manifest.damaged-")]
    assert [store.read_bytes(f"artifacts/sft/k/{name}") for name in aside] == [b'{"files": [truncated']


def test_a_file_damaged_in_transfer_is_downloaded_again(tmp_path):
    """A mismatch the store does not hold (a bad transfer) costs one more download, not the artifact."""

    class FlakyStore(LocalStore):
        downloads = 0

        def download_files(self, files):
            super().download_files(files)
            type(self).downloads += 1
            if type(self).downloads == 1:
                next(iter(files.values())).write_bytes(b"garbled in transit")

    store = FlakyStore(tmp_path / "store")
    manifest = publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS)
    assert fetch_dir(store, "artifacts/sft/k", tmp_path / "dst").digest == manifest.digest
    assert FlakyStore.downloads == 2 and read_manifest(store, "artifacts/sft/k") is not None


def test_unreadable_manifest_counts_as_no_artifact(store, tmp_path):
    publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS)
    store.write_bytes(f"artifacts/sft/k/{MANIFEST}", b'{"stage": "sft", "files": [')  # cut short
    assert read_manifest(store, "artifacts/sft/k") is None
    store.write_bytes(f"artifacts/sft/k/{MANIFEST}", b'{"stage": "sft"}')  # not a manifest
    assert read_manifest(store, "artifacts/sft/k") is None


@pytest.mark.parametrize("entry", ["../../../outside.txt", "/tmp/outside.txt", "model/../../outside.txt", ""])
def test_a_manifest_entry_outside_its_artifact_is_refused(store, tmp_path, entry):
    manifest = publish_dir(store, _make_dir(tmp_path / "src"), "artifacts/sft/k", FIELDS).model_dump(mode="json")
    manifest["files"].append({"path": entry, "size": 1, "sha256": "0" * 64})
    store.write_json(f"artifacts/sft/k/{MANIFEST}", manifest)
    work = tmp_path / "work" / "inputs" / "sft"
    with pytest.raises(InputError, match=f"{MANIFEST}: file entry {entry!r} points outside the artifact"):
        fetch_dir(store, "artifacts/sft/k", work)
    assert not work.exists()  # refused before anything was written
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize(
    "named",
    ["/etc", "{tmp}/other/artifacts/sft/abc", "{store}/artifacts/sft/../../../x", "s3://elsewhere/artifacts/sft/abc"],
)
def test_an_input_uri_outside_the_artifacts_store_is_not_followed(tmp_path, named):
    """`rlhf compare`/`chat` follow a kept adapter to its base through the manifest's inputs: only inside the
    artifact's own store."""
    store = LocalStore(tmp_path / "store")
    inside = f"{store.uri}/artifacts/sft/abc"
    named = named.format(tmp=tmp_path, store=store.uri)
    for key, (uri, expected) in enumerate(((inside, inside), (named, None))):
        fields = FIELDS | {"stage": "rl", "inputs": {"sft": {"uri": uri, "digest": "d"}}}
        manifest = publish_dir(store, _make_dir(tmp_path / uri.replace("/", "_")), f"artifacts/rl/{key}", fields)
        if expected is not None:
            assert input_uri(store.uri_of(f"artifacts/rl/{key}"), manifest, "sft") == expected
            continue
        with pytest.raises(InputError, match="outside the artifact's store"):
            input_uri(store.uri_of(f"artifacts/rl/{key}"), manifest, "sft")


def test_a_key_outside_the_local_store_is_refused(tmp_path):
    store = LocalStore(tmp_path / "store")
    for key in ("../escape", "a/../../escape", "/etc/passwd"):
        with pytest.raises(InputError, match="points outside the store"):
            store.write_bytes(key, b"x")
    assert not (tmp_path / "escape").exists()
    store.write_bytes("a/../b", b"inside")  # normalised, and still inside
    assert store.read_bytes("b") == b"inside"


def test_local_store_files_are_as_shareable_as_the_umask_allows(tmp_path):
    """Manifests and run summaries are readable by the group like any other file, not private to their writer."""
    old = os.umask(0o002)
    try:
        store = LocalStore(tmp_path / "store")
        store.write_json("runs/r/run.json", {"status": "completed"})
        manifest_dir = tmp_path / "src"
        publish_dir(store, _make_dir(manifest_dir), "artifacts/sft/k", FIELDS)
    finally:
        os.umask(old)
    assert (tmp_path / "store/runs/r/run.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / f"store/artifacts/sft/k/{MANIFEST}").stat().st_mode & 0o777 == 0o664


def test_pickles_are_never_published(store, tmp_path):
    source = _make_dir(tmp_path / "src")
    (source / "training_args.bin").write_bytes(b"\x80\x04 a pickle")
    (source / "model" / "training_args.bin").write_bytes(b"\x80\x04 a pickle")
    manifest = publish_dir(store, source, "artifacts/rl/k", FIELDS)
    assert {f.path for f in manifest.files} == {"model/weights.bin", "metrics.json"}
    assert not store.exists(manifest.location("artifacts/rl/k", "training_args.bin"))
    assert store.list_children(f"artifacts/rl/k/{manifest.files_at}") == ["metrics.json", "model"]


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


def test_a_location_is_read_where_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text("here")
    assert read_uri("config.yaml") == read_uri(str(tmp_path / "config.yaml")) == b"here"
    with pytest.raises(FileNotFoundError, match="'/config.yaml'"):  # the file system's root, not here
        read_uri("/config.yaml")


def _save_checkpoints(store: ArtifactStore, tmp_path: Path, steps: tuple[int, ...], keep: int) -> CheckpointStore:
    checkpoints = CheckpointStore(store, "rl", "key", keep=keep)
    for step in steps:
        directory = tmp_path / f"ckpt-{step}"
        directory.mkdir()
        (directory / "state.txt").write_text(f"the state at step {step}")
        checkpoints.save(step, directory)
    return checkpoints


def test_checkpoints_keep_the_newest_complete_ones(store, tmp_path):
    checkpoints = _save_checkpoints(store, tmp_path, (5, 10, 15), keep=2)
    store.write_bytes(f"checkpoints/rl/key/step-{20:08d}/state.txt", b"half written, no manifest")
    assert checkpoints.complete_steps() == [10, 15]
    assert checkpoints.restore_latest(lambda step: tmp_path / f"restored-{step}") == 15
    assert (tmp_path / "restored-15" / "state.txt").read_text() == "the state at step 15"
    checkpoints.clear()
    assert checkpoints.complete_steps() == []
    assert checkpoints.restore_latest(lambda step: tmp_path / f"again-{step}") is None


def test_a_damaged_checkpoint_falls_back_to_the_one_before(store, tmp_path, caplog):
    checkpoints = _save_checkpoints(store, tmp_path, (5, 10), keep=2)
    newest = f"checkpoints/rl/key/step-{10:08d}"
    _damage(store, read_manifest(store, newest).location(newest, "state.txt"))
    assert checkpoints.restore_latest(lambda step: tmp_path / f"restored-{step}") == 5
    assert (tmp_path / "restored-5" / "state.txt").read_text() == "the state at step 5"
    assert not (tmp_path / "restored-10").exists()
    assert "falling back to the checkpoint before it" in caplog.text
    assert checkpoints.complete_steps() == [5]  # set aside: the next retry does not try it again


class ThreadedProcesses:
    """The processes of a stage as threads: `gather_objects` meets every thread's call, as all_gather does."""

    def __init__(self, count: int) -> None:
        self.barrier = threading.Barrier(count, timeout=30)
        self.slots: list[list] = [[] for _ in range(count)]

    def process(self, rank: int) -> SimpleNamespace:
        def gather_objects(mine: list) -> list:
            self.slots[rank] = list(mine)
            self.barrier.wait()
            everyone = [item for part in self.slots for item in part]
            self.barrier.wait()  # all have read the slots before any writes them again
            return everyone

        return SimpleNamespace(main=rank == 0, gather_objects=gather_objects)


def test_the_processes_of_a_stage_resume_the_same_step_whatever_each_listed(store, tmp_path):
    """Another attempt at the artifact completes step 10 between two processes' listings: each resumed the
    newest it saw (5 and 10), and they trained different steps' batches into one model. They now agree on the
    main process's."""
    _save_checkpoints(store, tmp_path, (5,), keep=3)
    threaded = ThreadedProcesses(2)
    views = [CheckpointStore(store, "rl", "key", keep=3) for _ in range(2)]  # each process's own
    listed = threading.Event()
    first_listing = views[0].complete_steps

    def list_then_signal() -> list[int]:
        steps = first_listing()
        listed.set()
        return steps

    views[0].complete_steps = list_then_signal
    resumed: dict[int, int | None] = {}

    def resume(rank: int) -> None:
        restore_dir = tmp_path / f"rank-{rank}"
        resumed[rank] = views[rank].restore_latest(lambda step: restore_dir / f"step-{step}", threaded.process(rank))

    main = threading.Thread(target=resume, args=(0,))
    main.start()
    assert listed.wait(timeout=30)
    (tmp_path / "other-attempt").mkdir()
    _save_checkpoints(store, tmp_path / "other-attempt", (10,), keep=3)  # published after the main one listed
    other = threading.Thread(target=resume, args=(1,))
    other.start()
    main.join(timeout=60)
    other.join(timeout=60)
    assert resumed == {0: 5, 1: 5}
    assert (tmp_path / "rank-1" / "step-5" / "state.txt").read_text() == "the state at step 5"


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


def test_s3_errors_no_retry_can_cure_are_input_errors(s3_bucket):
    """A bucket deleted under a running stage: exit 2 with the reason, not a traceback after retrying."""
    store = S3Store(f"s3://{s3_bucket}/x")
    store.write_bytes("a", b"1")
    client = boto3.client("s3")
    client.delete_object(Bucket=s3_bucket, Key="x/a")
    client.delete_bucket(Bucket=s3_bucket)
    for operation in (lambda: store.read_bytes("a"), lambda: store.write_bytes("a", b"1"), store.check_access):
        with pytest.raises(InputError, match=f"bucket '{s3_bucket}' at .*: no such bucket"):
            operation()


def test_s3_requests_ride_out_a_server_restart(localbucket, localbucket_bucket, tmp_path):
    """localbucket goes away for 4 s in the middle of a stage's uploads and comes back with its objects: the
    store's retries carry each request across, nothing fails, everything verifies."""
    store = S3Store(f"s3://{localbucket_bucket}/x", retries=10)
    publish_dir(store, _make_dir(tmp_path / "before"), "artifacts/sft/a", FIELDS)
    localbucket.stop()
    restart = threading.Timer(4, localbucket.start)
    restart.start()
    started = time.monotonic()
    try:
        manifest = publish_dir(store, _make_dir(tmp_path / "during"), "artifacts/sft/b", FIELDS)
    finally:
        restart.join()
    assert time.monotonic() - started >= 3.5  # it did wait for the server
    assert fetch_dir(store, "artifacts/sft/b", tmp_path / "b").digest == manifest.digest
    assert fetch_dir(store, "artifacts/sft/a", tmp_path / "a") is not None  # kept across the restart


def test_s3_retries_are_configurable_and_finite(monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    started = time.monotonic()
    with pytest.raises(EndpointConnectionError):
        S3Store("s3://bucket/x", retries=2).read_bytes("k")
    assert 1 <= time.monotonic() - started < 10  # one pause of 1 s between the two attempts
    assert "attempt 2 of 2 again in 1 s" in caplog.text
    with pytest.raises(InputError, match="cannot reach the S3 endpoint"):
        S3Store("s3://bucket/x", retries=10).check_access()  # a wrong endpoint is said at once, not retried


def test_unknown_store_scheme_is_an_input_error():
    with pytest.raises(InputError, match="only local paths and s3://"):
        ArtifactStore.from_uri("gs://bucket/x")


@pytest.mark.parametrize(("code", "refused"), [("AccessDenied", True), ("SlowDown", False)])
def test_keys_a_bulk_delete_leaves_are_never_passed_over(s3_bucket, code, refused):
    """DeleteObjects answers 200 with the keys it did not delete listed: a refusal is an input error and a busy
    server is asked again, until every key is gone; the old code returned as if all were deleted."""
    store = S3Store(f"s3://{s3_bucket}/p", retries=3)
    for key in ("old/1", "old/2", "kept"):
        store.write_bytes(key, b"1")
    answers = []

    def leave_one_behind(parsed, **_):
        if not answers:  # the first answer only: the server deleted old/1 but not old/2
            parsed["Deleted"] = [d for d in parsed.get("Deleted", []) if d["Key"] != "p/old/2"]
            parsed["Errors"] = [{"Key": "p/old/2", "Code": code, "Message": "we encountered an internal error"}]
            boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/old/2", Body=b"1")  # as if never deleted
        answers.append(parsed)

    store.client.meta.events.register("after-call.s3.DeleteObjects", leave_one_behind)
    if refused:
        with pytest.raises(InputError, match="access denied"):
            store.delete_prefix("old")
        assert store.list_children("old") == ["2"]
    else:
        store.delete_prefix("old")
        assert len(answers) == 2
        assert store.list_children("") == ["kept"]
