"""The artifact store in S3-compatible object storage (`FTJOBS_STORAGE_URL=s3://...`), through boto3.

S3 has no rename, so a directory (adapter, checkpoint, merged model) is published by uploading its files,
then its manifest (each file's size and sha256) last, with a conditional create: readers trust only a
prefix that has one. A marker object says a prefix is being published or deleted, so what a crash leaves
behind is found by `sweep`. Whatever needs a local path is downloaded into the node's cache.
"""

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from functools import partial, wraps
from pathlib import Path
from typing import Any, BinaryIO, Concatenate, ParamSpec, TypeVar

import boto3.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as EndpointUnreachable

from models.node_cache import NodeCache
from models.settings import Settings
from models.storage import StoreUnavailable, Swept

MANIFEST = ".manifest.json"
PUBLISHING = ".publishing"
"""Marks a prefix whose files are being uploaded; its manifest, written last, makes it trusted."""
DELETING = ".deleting"
"""Marks a prefix being deleted; once its manifest is gone nothing else in it is trusted."""
_CHUNK = 1 << 20


P = ParamSpec("P")
R = TypeVar("R")


def _outage_is_unavailable(
    method: Callable[Concatenate["S3ArtifactStore", P], R],
) -> Callable[Concatenate["S3ArtifactStore", P], R]:
    """Report a server that does not answer (after boto3's own retries) or answers 5xx as
    `StoreUnavailable`: a passing outage that callers ride out (the job runner, within its lease) or
    answer with a 503, unlike a refusal or a local error."""

    @wraps(method)
    def guarded(self: "S3ArtifactStore", *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except (EndpointUnreachable, HTTPClientError) as error:
            raise StoreUnavailable(f"bucket {self.bucket!r} did not answer: {error}") from error
        except ClientError as error:
            if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) < 500:
                raise
            raise StoreUnavailable(f"bucket {self.bucket!r} failed: {error}") from error

    return guarded


class S3ArtifactStore:
    def __init__(self, client: Any, bucket: str, prefix: str, cache: NodeCache) -> None:
        # `client` is boto3's S3 client, a class generated at run time (so `Any`: boto3 ships no types).
        self.client = client
        self.bucket = bucket
        self.root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        """What every object key of this store starts with."""
        self.cache = cache

    def _key(self, key: str) -> str:
        # Keys are built by the service from generated ids, never from user input; still refuse escapes.
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return self.root + key

    @_outage_is_unavailable
    def put_stream(self, key: str, source: BinaryIO) -> tuple[int, str]:
        reader = _HashingReader(source)
        # Managed upload (multipart past 8 MiB): it reads the stream part by part, never all of it.
        self.client.upload_fileobj(reader, self.bucket, self._key(key))
        return reader.size, reader.digest.hexdigest()

    @_outage_is_unavailable
    def open(self, key: str) -> BinaryIO:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as error:
            raise _missing(error, key) from error
        return io.BufferedReader(_Body(body), _CHUNK)

    @_outage_is_unavailable
    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(key)
        size: int = head["ContentLength"]
        return size

    @_outage_is_unavailable
    def put_dir(self, key: str, source: Path) -> None:
        # Anything but a directory is a file to publish: an unreadable one fails the publication.
        files = sorted(path for path in source.rglob("*") if not path.is_dir())
        if existing := self._head(f"{key}/{MANIFEST}"):
            # Published already: the same contents again (a retried write) is done, others are refused.
            if self._manifest(key, existing["ETag"]) != _manifest(source, files):
                raise FileExistsError(f"{key} is already published with other contents")
            return
        self._put(f"{key}/{PUBLISHING}", b"")
        entries = {}
        for path in files:
            name = path.relative_to(source).as_posix()
            with open(path, "rb") as file:
                size, sha256 = self.put_stream(f"{key}/{name}", file)
            entries[name] = {"size": size, "sha256": sha256}
        body = json.dumps({"files": entries}, sort_keys=True).encode()
        try:
            self._put(f"{key}/{MANIFEST}", body, IfNoneMatch="*")
        except ClientError as error:
            if _code(error) != "PreconditionFailed":
                raise
            raise FileExistsError(f"{key} was published by another writer at the same time") from error
        self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{key}/{PUBLISHING}"))

    @_outage_is_unavailable
    def local_path(self, key: str) -> Path:
        if manifest := self._head(f"{key}/{MANIFEST}"):
            return self.cache.get(key, manifest["ETag"], partial(self._fetch_dir, key, manifest["ETag"]))
        if head := self._head(key):
            return self.cache.get(key, head["ETag"], partial(self._fetch, key, head["ETag"]))
        return self.cache.entry(key, "absent")  # never filled: a path that does not exist, as for local keys

    @_outage_is_unavailable
    def delete(self, key: str) -> None:
        names = list(self._list(f"{key}/"))
        if not names:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
            return
        self._put(f"{key}/{DELETING}", b"")  # a crash from here on leaves a prefix `sweep` removes
        self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{key}/{MANIFEST}"))  # untrusted first
        self._delete([name for name, _ in names if name != f"{key}/{MANIFEST}"] + [f"{key}/{DELETING}"])

    @_outage_is_unavailable
    def sweep(self, older_than: float) -> Swept:
        """Remove prefixes a crash left half-published or half-deleted, and abort multipart uploads, both
        older than `older_than` seconds (`FTJOBS_STORE_ORPHAN_SECONDS`: a day by default)."""
        cutoff = time.time() - older_than
        names = dict(self._list(""))
        removed = []
        for name, modified in names.items():
            prefix, _, marker = name.rpartition("/")
            if modified > cutoff or marker not in (PUBLISHING, DELETING):
                continue
            if marker == PUBLISHING and f"{prefix}/{MANIFEST}" in names:
                self._delete([name])  # published; only the marker's own deletion was lost
            else:
                self.delete(prefix)
                removed.append(prefix)
        aborted = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.root
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return Swept(prefixes=removed, uploads=aborted)

    @_outage_is_unavailable
    def probe(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _code(error) in ("404", "NoSuchKey"):
                return None
            raise
        return head

    def _put(self, key: str, body: bytes, **conditions: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, **conditions)

    def _get(self, key: str, etag: str) -> Any:
        """The object's streaming body, only if it is still the version `etag` names."""
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key), IfMatch=etag)["Body"]

    def _manifest(self, key: str, etag: str) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = json.loads(self._get(f"{key}/{MANIFEST}", etag).read())["files"]
        return files

    def _list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modification time) of every object under `prefix`, keys relative to the store's prefix."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.root + prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(self.root) :], item["LastModified"].timestamp()

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 1000):  # the most one request may name
            batch = [{"Key": self._key(name)} for name in names[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _fetch(self, key: str, etag: str, target: Path) -> None:
        _download(self._get(key, etag), target)

    def _fetch_dir(self, key: str, etag: str, target: Path) -> None:
        for name, expected in self._manifest(key, etag).items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(f"{key}/{name}"))["Body"]
            size, sha256 = _download(body, path)
            if (size, sha256) != (expected["size"], expected["sha256"]):
                raise OSError(f"{key}/{name} does not match its manifest (changed while downloading?)")
        target.mkdir(exist_ok=True)  # a directory with no files is still a directory


def open_s3_store(settings: Settings) -> S3ArtifactStore:
    """The store `settings.storage_url` names, once its bucket answered (`StoreUnavailable` if not)."""
    assert settings.storage_url is not None
    bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
    if not settings.storage_url.startswith("s3://") or not bucket:
        raise StoreUnavailable(
            f"FTJOBS_STORAGE_URL must look like s3://BUCKET/PREFIX, not {settings.storage_url!r}"
        )
    # Standard retries (a few, with backoff), not the legacy mode's five; the rest from the AWS_* variables.
    config = Config(retries={"mode": "standard"})
    # A session of its own: the shared default one would keep the credentials it found first.
    client = boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
    for operation in ("PutObject", "UploadPart"):
        client.meta.events.register(f"before-sign.s3.{operation}", _without_expect_continue)
    where = f"bucket {bucket!r} at {settings.s3_endpoint_url or 'AWS'}"
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError as error:
        hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        raise StoreUnavailable(f"no credentials for {where}: {hint}") from error
    except ClientError as error:
        reason = {"404": "does not exist", "403": "refused these credentials"}.get(_code(error), str(error))
        raise StoreUnavailable(f"{where} {reason}") from error
    except BotoCoreError as error:
        raise StoreUnavailable(f"{where} did not answer: {error}") from error
    return S3ArtifactStore(client, bucket, prefix, NodeCache(settings.cache_root, settings.cache_max_bytes))


def _without_expect_continue(request: Any, **_: Any) -> None:
    # SeaweedFS answers `Expect: 100-continue` on an empty body so that the pooled connection falls out of
    # step and the next request on it hangs. Without the header a refused upload costs its body, no more.
    del request.headers["Expect"]  # a no-op when absent


class _HashingReader:
    """A read-only stream that counts and hashes what passes through (a non-seekable file to boto3)."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk


class _Body(io.RawIOBase):
    """botocore's streaming body as a raw stream, so `io.BufferedReader` gives it fast `readline`."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.body.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self.body.close()
        super().close()


def _download(body: Any, target: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with body, open(target, "wb") as out:
        while chunk := body.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def _manifest(source: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    entries = {}
    for path in files:
        with open(path, "rb") as file:
            sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        entries[path.relative_to(source).as_posix()] = {"size": path.stat().st_size, "sha256": sha256}
    return entries


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _missing(error: ClientError, key: str) -> Exception:
    return FileNotFoundError(key) if _code(error) in ("404", "NoSuchKey") else error
