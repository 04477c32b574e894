"""Progress bars for long operations, drawn on stderr only when stderr is a terminal (rich decides, and
honours TTY_COMPATIBLE=1 / FORCE_COLOR to force them): a pipe or a CI log gets no carriage-return noise,
and stdout stays the result alone."""

import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import rich.progress
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cli.output import err


def bars(*columns: ProgressColumn) -> Progress:
    return Progress(*columns, console=err, disable=not err.is_terminal)


def reading(path: Path) -> AbstractContextManager[BinaryIO]:
    """The file opened for an upload: each read advances a bar, so streaming it to the client shows it."""
    return rich.progress.open(path, "rb", description=path.name, console=err, disable=not err.is_terminal)


class Download(Protocol):
    """A streamed response of the openai client (`with_streaming_response`, or raw with `stream`)."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    def iter_bytes(self) -> Iterator[bytes]: ...


def save(response: Download, output: Path | None, label: str) -> None:
    """Write a download to `output` (stdout when None) with a bar. A file is written beside its name and
    renamed when complete, so an interrupted download leaves no partial file under the name."""
    length = response.headers.get("content-length")
    total = int(length) if length else None
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with bars(*columns, TimeRemainingColumn()) as progress, _sink(output) as sink:
        task = progress.add_task(label, total=total)
        for chunk in response.iter_bytes():
            sink.write(chunk)
            progress.update(task, advance=len(chunk))


@contextmanager
def _sink(output: Path | None) -> Iterator[BinaryIO]:
    if output is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    partial = output.with_name(output.name + ".part")
    try:
        with open(partial, "wb") as sink:
            yield sink
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
