"""Where artifacts live: a local directory or `s3://bucket/prefix` on any S3-compatible server.

Keys are '/'-separated paths relative to the store's root. Large files are streamed, never read whole:
locally with `shutil.copyfile`, on S3 through boto3's TransferManager (multipart, parallel).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stages.errors import InputError

MULTIPART_CHUNK = 16 * 1024 * 1024


class ArtifactStore(ABC):
    """A flat key space of files plus the few operations the pipeline needs."""

    uri: str

    @staticmethod
    def from_uri(uri: str) -> ArtifactStore:
        if uri.startswith("s3://"):
            return S3Store(uri)
        if "://" in uri:
            raise InputError(f"store {uri!r}: only local paths and s3://bucket/prefix are supported")
        return LocalStore(uri)

    def uri_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def key_of(self, uri: str) -> str:
        """The key of a URI inside this store (the inverse of `uri_of`)."""
        root = self.uri.rstrip("/") + "/"
        if not uri.startswith(root):
            raise InputError(f"{uri}: not inside store {self.uri}")
        return uri[len(root) :]

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write small objects (manifests, configs) atomically."""

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
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def check_access(self) -> None:
        """Raise InputError, saying what to fix, if the store cannot be used (before anything is started)."""

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2).encode())


class LocalStore(ArtifactStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def check_access(self) -> None:
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        if not existing.is_dir():
            raise InputError(f"store {self.uri}: {existing} is a file, not a directory")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

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

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


class S3Store(ArtifactStore):
    """S3 through boto3; the endpoint and credentials come from the standard AWS variables and config files
    (`AWS_ENDPOINT_URL` for MinIO or any other S3-compatible server)."""

    def __init__(self, uri: str) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise InputError(f"store {uri!r}: expected s3://bucket/prefix")
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3")
        self.transfer_config = TransferConfig(
            multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=8
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def check_access(self) -> None:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        endpoint = self.client.meta.endpoint_url
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise InputError(
                f"store {self.uri}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile "
                "in ~/.aws)"
            ) from None
        except EndpointConnectionError:
            raise InputError(f"store {self.uri}: cannot reach the S3 endpoint {endpoint} (AWS_ENDPOINT_URL)") from None
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            reason = {"404": "no such bucket", "NoSuchBucket": "no such bucket", "403": "access denied"}.get(code, code)
            raise InputError(f"store {self.uri}: bucket {self.bucket!r} at {endpoint}: {reason}") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def read_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_files(self, files: dict[str, Path]) -> None:
        with self._transfer_manager() as manager:
            futures = [manager.upload(str(src), self.bucket, self._key(key)) for key, src in files.items()]
            for future in futures:
                future.result()

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

    def list_children(self, prefix: str) -> list[str]:
        root = self._key(prefix).rstrip("/") + "/"
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root, Delimiter="/"):
            names.update(p["Prefix"][len(root) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            names.update(o["Key"][len(root) :] for o in page.get("Contents", []))
        return sorted(names)

    def delete_prefix(self, prefix: str) -> None:
        root = self._key(prefix).rstrip("/") + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


def read_uri(uri: str) -> bytes:
    """One object by its full location: a local path or s3://bucket/key."""
    directory, _, name = uri.rpartition("/")
    return ArtifactStore.from_uri(directory or ".").read_bytes(name)
