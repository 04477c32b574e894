"""A node-local cache of remote objects and directories, for code that needs a local path.

An entry is named by its store key and version (an ETag), so a changed object is fetched again as a new
entry. A fill downloads into a temporary name inside the cache and renames it into place, so a reader
sees a whole entry or none; fills of one entry, by threads or processes sharing the directory, happen
once. Past the size bound the least recently used entries go (use refreshes an entry's mtime).
"""

import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_STALE_SECONDS = 24 * 3600.0
"""Temporary fills this old were left by a process that died mid-download."""


class NodeCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self._entries, self._tmp, self._locks = self.root / "entries", self.root / "tmp", self.root / "locks"
        for directory in (self._entries, self._tmp, self._locks):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():
            if leftover.stat().st_mtime < time.time() - _STALE_SECONDS:
                _remove(leftover)

    def entry(self, key: str, version: str) -> Path:
        """Where the entry for this version of `key` is (or would be) kept."""
        return self._entries / hashlib.sha256(f"{key}\0{version}".encode()).hexdigest()[:40]

    def get(self, key: str, version: str, fill: Callable[[Path], None]) -> Path:
        """The entry's path, filled first by `fill(path)` (a file or a directory) if it is not cached."""
        path = self.entry(key, version)
        if not path.exists():
            # 256 lock files in all: fills of different entries rarely share one.
            with _locked(self._locks / f"{path.name[:2]}.lock"):
                if not path.exists():  # filled by another thread or process while this one waited
                    tmp = self._tmp / f"{path.name}.{uuid.uuid4().hex}"
                    try:
                        fill(tmp)
                        tmp.replace(path)
                    finally:
                        _remove(tmp)
            self._evict(keep=path)
        os.utime(path)
        return path

    def _evict(self, keep: Path) -> None:
        with _locked(self._locks / "evict.lock"):
            entries = []
            for path in self._entries.iterdir():
                try:
                    entries.append((path.stat().st_mtime, _size(path), path))
                except FileNotFoundError:
                    continue
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                if path != keep:
                    _remove(path, via=self._tmp)
                    total -= size


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # per open file, so it excludes other threads as well as processes
        yield


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _remove(path: Path, via: Path | None = None) -> None:
    """Delete a file or directory; a directory is first renamed into `via`, so no one sees it half gone."""
    if path.is_dir():
        if via is not None:
            moved = via / f"{path.name}.{uuid.uuid4().hex}"
            path.replace(moved)
            path = moved
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
