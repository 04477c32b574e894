"""Stream an artifact directory as a gzipped tar without holding it in memory or on disk: a thread writes
the archive into a bounded queue that the response reads from."""

import io
import queue
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

from models.lineage import renamed_metadata
from models.spec import PICKLE_SUFFIXES

_CHUNKS_AHEAD = 16
_DONE = b""

SKIPPED = {"trainer", "COMPLETE"}
"""Checkpoints' trainer state (optimizer, RNG) and completion marker: for resuming, not for using."""


class _Abandoned(Exception):
    """The client went away: stop writing."""


class _QueueWriter:
    def __init__(self, chunks: "queue.Queue[bytes]", abandoned: threading.Event) -> None:
        self.chunks, self.abandoned = chunks, abandoned

    def write(self, data: bytes) -> int:
        while data and not self.abandoned.is_set():
            try:
                self.chunks.put(bytes(data), timeout=1.0)
                return len(data)
            except queue.Full:
                continue
        if self.abandoned.is_set():
            raise _Abandoned
        return len(data)


def archive_members(directory: Path) -> list[Path]:
    """The files an archive of `directory` holds, in a stable order."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and not SKIPPED & set(path.relative_to(directory).parts)
        and not path.name.endswith(PICKLE_SUFFIXES)  # never served, whatever put them there
    )


def stream_tar_gz(directory: Path, root: str, renames: dict[str, str] | None = None) -> Iterator[bytes]:
    """The archive's bytes; its members sit under `root/`. `renames`: strings replaced in its text metadata
    files (a server path by a public name)."""
    chunks: queue.Queue[bytes] = queue.Queue(maxsize=_CHUNKS_AHEAD)
    abandoned = threading.Event()

    failed = threading.Event()

    def write() -> None:
        try:
            writer = _QueueWriter(chunks, abandoned)
            # Stream mode only writes; typeshed asks every file object for read, seek and tell.
            with tarfile.open(fileobj=writer, mode="w|gz") as archive:  # pyright: ignore[reportArgumentType, reportCallIssue]
                for path in archive_members(directory):
                    arcname = f"{root}/{path.relative_to(directory)}"
                    renamed = renamed_metadata(path, renames or {})
                    if renamed is None:
                        archive.add(path, arcname=arcname, recursive=False)
                        continue
                    member = archive.gettarinfo(path, arcname=arcname)
                    member.size = len(renamed)
                    archive.addfile(member, io.BytesIO(renamed))
        except _Abandoned:
            return
        except BaseException:
            failed.set()
            raise
        finally:
            if not abandoned.is_set():
                chunks.put(_DONE)

    threading.Thread(target=write, daemon=True).start()
    try:
        while chunk := chunks.get():
            yield chunk
    finally:
        abandoned.set()
    if failed.is_set():
        # Break the response off, so the client sees a failed download rather than a short archive.
        raise OSError(f"could not archive {directory}")
