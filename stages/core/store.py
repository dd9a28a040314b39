"""Where artifacts live: a local directory or `s3://bucket/prefix` on any S3-compatible server.

Keys are '/'-separated paths relative to the store's root; a key that would resolve outside it is refused.
Large files are streamed, never read whole: locally with `shutil.copyfile`, on S3 through boto3's
TransferManager (multipart, parallel).

On S3 every operation is retried with exponential backoff while the server is unreachable or busy (on top of
botocore's standard retries of each request), so a restart of the S3 server costs a stage a pause, not its
run. Errors that no retry can cure (no such bucket, access denied) are input errors: exit 2 with the reason.
Optional operations that some S3-compatible servers do not implement (the multi-object `DeleteObjects`) fall
back to the basic ones.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rlhf_pipeline.stages.core.errors import InputError

log = logging.getLogger("rlhf.store")

MULTIPART_CHUNK = 16 * 1024 * 1024
DEFAULT_RETRIES = 10
MAX_RETRY_DELAY = 30
# S3 error codes worth another attempt (the server is busy or restarting), and those that mean the request will
# never succeed as it is: refused at once, with a reason to fix.
TRANSIENT_S3_ERRORS = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "ConditionalRequestConflict",  # another conditional write of the key is in flight: ask again
}
MISSING_S3_OBJECT = ("404", "NoSuchKey", "NotFound")
PERMANENT_S3_ERRORS = {
    "NoSuchBucket": "no such bucket",
    "AccessDenied": "access denied",
    "403": "access denied",
    "InvalidAccessKeyId": "unknown access key (AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "wrong secret key (AWS_SECRET_ACCESS_KEY)",
}


class ArtifactStore(ABC):
    """A flat key space of files plus the few operations the pipeline needs."""

    uri: str

    @staticmethod
    def from_uri(uri: str, retries: int = DEFAULT_RETRIES) -> ArtifactStore:
        """`retries`: attempts of each S3 operation before it fails (local stores do not retry)."""
        if uri.startswith("s3://"):
            return S3Store(uri, retries)
        if "://" in uri:
            raise InputError(f"store {uri!r}: only local paths and s3://bucket/prefix are supported")
        return LocalStore(uri)

    def uri_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def read_bytes_if_present(self, key: str) -> bytes | None:
        """The object's bytes, or None where there is none: one request where `exists` and `read_bytes` are two
        (manifests are read this way many times a run)."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write small objects (manifests, configs) atomically."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write a small object only where there is none yet, atomically: True if this call created it, False
        if it existed (another writer was first; its object is left as it is)."""

    @abstractmethod
    def upload_files(self, files: dict[str, Path]) -> None:
        """Upload `{key: local path}`, streaming, in parallel where the backend can."""

    @abstractmethod
    def download_files(self, files: dict[str, Path]) -> None:
        """Download `{key: local path}`, streaming, in parallel where the backend can."""

    @abstractmethod
    def list_children(self, prefix: str) -> list[str]:
        """The names directly under `prefix/` (like `ls`)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def check_access(self) -> None:
        """Raise InputError, saying what to fix, if the store cannot be used (before anything is started)."""

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def read_json_if_present(self, key: str) -> Any:
        """The object's JSON, or None where there is none (`read_bytes_if_present`: one request)."""
        data = self.read_bytes_if_present(key)
        return None if data is None else json.loads(data)

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2).encode())


class LocalStore(ArtifactStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = Path(os.path.normpath(self.root / key))  # lexical: links the store's owner made are theirs
        if not path.is_relative_to(self.root):
            raise InputError(f"store {self.uri}: key {key!r} points outside the store")
        return path

    def check_access(self) -> None:
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        if not existing.is_dir():
            raise InputError(f"store {self.uri}: {existing} is a file, not a directory")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_bytes_if_present(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Written beside the target and renamed over it; created with the umask's permissions like any other
        file (a named temporary file would be private to its owner), so a shared store works across users."""
        path = self._path(key)
        tmp = self._written_beside(path, data)
        os.replace(tmp, path)

    def create(self, key: str, data: bytes) -> bool:
        """Written beside the target and hard-linked to its name, which fails where the name exists."""
        path = self._path(key)
        tmp = self._written_beside(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    @staticmethod
    def _written_beside(path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            handle.write(data)
        return tmp

    def upload_files(self, files: dict[str, Path]) -> None:
        self._copy_all((src, self._path(key)) for key, src in files.items())

    def download_files(self, files: dict[str, Path]) -> None:
        self._copy_all((self._path(key), dst) for key, dst in files.items())

    @staticmethod
    def _copy_all(pairs: Iterable[tuple[Path, Path]]) -> None:
        for src, dst in pairs:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)

    def list_children(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        return sorted(child.name for child in path.iterdir()) if path.is_dir() else []

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


def _retried(method: Callable) -> Callable:
    """An S3 operation retried while the server is unreachable or busy, `store.retries` attempts in all, 1 s
    apart and doubling up to 30 s (each attempt is itself a few botocore requests with its standard retries:
    botocore alone gives up within seconds, and its retry quota runs dry when eight transfers fail at once).
    An error that no retry can cure becomes an input error naming the store and the reason."""

    @functools.wraps(method)
    def wrapper(self: S3Store, *args, **kwargs):
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError
        from s3transfer.exceptions import RetriesExceededError

        for attempt in range(1, self.retries + 1):
            try:
                return method(self, *args, **kwargs)
            except NoCredentialsError:
                raise InputError(
                    f"store {self.uri}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a "
                    "profile in ~/.aws)"
                ) from None
            except ClientError as exc:
                code = exc.response["Error"]["Code"]
                if code in PERMANENT_S3_ERRORS:
                    reason = PERMANENT_S3_ERRORS[code]
                    raise InputError(f"store {self.uri}: bucket {self.bucket!r} at {self.endpoint}: {reason}") from None
                if code not in TRANSIENT_S3_ERRORS or attempt == self.retries:
                    raise
                error: Exception = exc
            except (ConnectionError, HTTPClientError, RetriesExceededError) as exc:
                if attempt == self.retries:
                    raise
                error = exc
            delay = min(2 ** (attempt - 1), MAX_RETRY_DELAY)
            log.warning(
                "store %s: %s; attempt %d of %d again in %d s", self.uri, error, attempt + 1, self.retries, delay
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper


class S3Store(ArtifactStore):
    """S3 through boto3; the endpoint and credentials come from the standard AWS variables and config files
    (`AWS_ENDPOINT_URL` for MinIO or any other S3-compatible server)."""

    def __init__(self, uri: str, retries: int = DEFAULT_RETRIES) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from botocore.exceptions import PartialCredentialsError

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise InputError(f"store {uri!r}: expected s3://bucket/prefix")
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retries = retries
        try:
            self.client = boto3.client("s3", config=Config(retries={"mode": "standard"}))
        except PartialCredentialsError as exc:
            raise InputError(f"store {uri}: {exc}") from None
        except ValueError as exc:  # botocore's "Invalid endpoint: localhost:9000" (no scheme)
            raise InputError(f"store {uri}: AWS_ENDPOINT_URL: {exc} (expected http://host:port or https://…)") from None
        self.endpoint = self.client.meta.endpoint_url
        self.transfer_config = TransferConfig(
            multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=8
        )
        self.bulk_delete = True  # until the server answers NotImplemented to DeleteObjects

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @_retried
    def check_access(self) -> None:
        from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, SSLError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (EndpointConnectionError, ConnectTimeoutError):
            raise InputError(
                f"store {self.uri}: cannot reach the S3 endpoint {self.endpoint} (AWS_ENDPOINT_URL)"
            ) from None
        except SSLError as exc:
            raise InputError(
                f"store {self.uri}: no TLS connection to the S3 endpoint {self.endpoint} (AWS_ENDPOINT_URL; a "
                f"server that speaks plain HTTP needs an http:// address): {exc}"
            ) from None
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchBucket"):
                raise InputError(
                    f"store {self.uri}: bucket {self.bucket!r} at {self.endpoint}: no such bucket"
                ) from None
            raise

    @_retried
    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in MISSING_S3_OBJECT:
                return False
            raise
        return True

    @_retried
    def read_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    @_retried
    def read_bytes_if_present(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in MISSING_S3_OBJECT:
                return None
            raise

    @_retried
    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    @_retried
    def create(self, key: str, data: bytes) -> bool:
        """A conditional put (`If-None-Match: *`): the server refuses it where the key exists. A server that
        ignores the condition overwrites; MinIO, AWS S3 and Ceph honour it."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "412"):
                return False
            raise
        return True

    @_retried
    def upload_files(self, files: dict[str, Path]) -> None:
        with self._transfer_manager() as manager:
            futures = [manager.upload(str(src), self.bucket, self._key(key)) for key, src in files.items()]
            for future in futures:
                future.result()

    @_retried
    def download_files(self, files: dict[str, Path]) -> None:
        with self._transfer_manager() as manager:
            futures = []
            for key, dst in files.items():
                dst.parent.mkdir(parents=True, exist_ok=True)
                futures.append(manager.download(self.bucket, self._key(key), str(dst)))
            for future in futures:
                future.result()

    def _transfer_manager(self):
        from boto3.s3.transfer import create_transfer_manager

        return create_transfer_manager(self.client, self.transfer_config)

    @_retried
    def list_children(self, prefix: str) -> list[str]:
        root = self._key(prefix).rstrip("/") + "/"
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root, Delimiter="/"):
            names.update(p["Prefix"][len(root) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(root) :] for o in page.get("Contents", []))
        return sorted(names)

    @_retried
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    @_retried
    def delete_prefix(self, prefix: str) -> None:
        root = self._key(prefix).rstrip("/") + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
            self._delete_keys([o["Key"] for o in page.get("Contents", [])])

    def _delete_keys(self, keys: list[str]) -> None:
        """One DeleteObjects request per page of keys, or, on a server without it, one DeleteObject per key.

        DeleteObjects answers 200 also where some keys were not deleted, listing them under `Errors`: the first is
        raised as the error of a request, so that a busy server is asked again (the prefix is listed anew) and a
        refusal is an input error, never objects silently left behind."""
        from botocore.exceptions import ClientError

        if keys and self.bulk_delete:
            try:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
                )
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("NotImplemented", "501"):
                    raise
                self.bulk_delete = False
            else:
                if failed := answer.get("Errors"):
                    first = failed[0]
                    message = f"{len(failed)} key(s) not deleted, {first.get('Key')}: {first.get('Message')}"
                    raise ClientError({"Error": {"Code": first.get("Code", ""), "Message": message}}, "DeleteObjects")
                return
        for key in keys:
            self.client.delete_object(Bucket=self.bucket, Key=key)


def read_uri(uri: str) -> bytes:
    """One object by its full location: a local path or s3://bucket/key."""
    directory, slash, name = uri.rpartition("/")
    return ArtifactStore.from_uri(directory or slash or ".").read_bytes(name)
