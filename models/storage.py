"""Artifact store: uploaded files, adapters, checkpoints and result files live under string keys.

The interface is what a job needs. The local directory store is the default (shared over a network file
system in distributed deployments); `FTJOBS_STORAGE_URL=s3://...` keeps artifacts in S3-compatible
object storage instead (models/storage_s3.py). Every process builds its store with `open_store`.
"""

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from models.settings import Settings

_CHUNK = 1 << 20
PARTIAL = ".partial"
"""Suffix of a local object or directory being written; renamed into place when complete."""


@dataclass(frozen=True)
class Swept:
    prefixes: list[str]
    """Keys removed: half-published or half-deleted directories, or half-written local objects."""
    uploads: int
    """Multipart uploads aborted (their parts are invisible, but stored and billed)."""


class ArtifactStore(Protocol):
    def put_stream(self, key: str, source: BinaryIO) -> tuple[int, str]:
        """Store a stream under `key`; return (size in bytes, sha256 hex)."""
        ...

    def open(self, key: str) -> BinaryIO: ...

    def size(self, key: str) -> int: ...

    def put_dir(self, key: str, source: Path) -> None:
        """Store a directory tree under the prefix `key`."""

    def local_path(self, key: str) -> Path:
        """A local path holding the object or directory (downloaded first for remote stores)."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object or a directory prefix; missing keys are fine."""

    def sweep(self, older_than: float) -> Swept:
        """Remove what crashed writers left, older than `older_than` seconds (the reconciler calls this)."""
        ...

    def probe(self) -> None:
        """Raise unless the store can be used right now (/readyz)."""


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        # Keys are built by the service from generated ids, never from user input; still refuse escapes.
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return path

    def put_stream(self, key: str, source: BinaryIO) -> tuple[int, str]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + PARTIAL)
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        tmp.replace(path)  # readers never see a half-written object
        return size, digest.hexdigest()

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def put_dir(self, key: str, source: Path) -> None:
        path = self._path(key)
        tmp = path.with_name(path.name + PARTIAL)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.replace(path)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def sweep(self, older_than: float) -> Swept:
        cutoff = time.time() - older_than
        removed = []
        for path in sorted(self.root.rglob(f"*{PARTIAL}")) if self.root.exists() else []:
            try:
                if path.lstat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:  # inside a leftover directory removed a moment ago
                continue
            self.delete(path.relative_to(self.root).as_posix())
            removed.append(path.relative_to(self.root).as_posix())
        return Swept(prefixes=removed, uploads=0)

    def probe(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)  # as the first write does
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".readyz-"):
            pass


class StoreUnavailable(Exception):
    """The configured artifact store cannot be used (misconfigured, unreachable, or refusing access)."""


def open_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings name; a remote one is checked first, so a process refuses to start
    with one clear line rather than failing its first job."""
    if settings.storage_url is None:
        return LocalArtifactStore(settings.artifacts_root)
    try:
        from models.storage_s3 import open_s3_store  # boto3 is the optional extra `s3`
    except ModuleNotFoundError as error:
        raise StoreUnavailable(
            f"FTJOBS_STORAGE_URL needs boto3: pip install 'ftjobs[s3]' ({error})"
        ) from error
    return open_s3_store(settings)
