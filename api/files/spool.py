"""Multipart uploads read by hand: the file part is spooled inside the data directory (Starlette's form
parser would spool it to the system temp directory), and an upload is refused as soon as it is known not
to fit the organisation's storage quota: from Content-Length before the body is read, else while it streams
in, discarding what was spooled."""

import hashlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

from fastapi import Depends, Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from api.deps import OrgDep, SettingsDep
from api.files.service import quota_exceeded
from models.db import session_scope
from models.errors import APIError
from models.quota import QuotaExceeded, StorageQuota, Usage

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # a typing-only name

FIELD_BYTES = 64 * 1024
"""All the form fields together (purpose, expiry): a few short strings."""
OVERHEAD_BYTES = 2 * FIELD_BYTES
"""More than boundaries, part headers (python-multipart caps them) and fields add to the file's size."""


@dataclass
class SpooledUpload:
    fields: dict[str, str] = field(default_factory=dict)
    file: BinaryIO | None = None
    filename: str | None = None
    size: int = 0
    sha256: str = ""


class _Reader:
    """python-multipart callbacks: form fields in memory, the `file` part's bytes handed out to spool."""

    def __init__(self, spool_dir: Path, charset: str) -> None:
        self.spool_dir, self.charset = spool_dir, charset
        self.upload = SpooledUpload()
        self.digest = hashlib.sha256()
        self.pending: list[bytes] = []
        self.field_bytes = 0
        self._header, self._value, self._disposition = b"", b"", b""
        self._name: str | None = None
        self._data = bytearray()
        self._in_file = False

    def _decode(self, value: bytes) -> str:
        try:
            return value.decode(self.charset)
        except UnicodeDecodeError:
            return value.decode("latin-1")

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._data, self._in_file = b"", None, bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise APIError('A multipart part has no Content-Disposition "name".')
        self._name = self._decode(options[b"name"])
        if self._name == "file" and b"filename" in options:
            if self.upload.file is not None:
                raise APIError("Send one file per upload.", param="file")
            self.upload.filename = self._decode(options[b"filename"])
            self.upload.file = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115 (closed by the route)
            self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._in_file:
            self.upload.size += len(chunk)
            self.digest.update(chunk)
            self.pending.append(chunk)
            return
        self.field_bytes += len(chunk)
        if self.field_bytes > FIELD_BYTES:
            raise APIError(f"The form fields beside the file are larger than {FIELD_BYTES} bytes.")
        self._data.extend(chunk)

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_end(self) -> None:
        if not self._in_file and self._name is not None:
            self.upload.fields[self._name] = self._decode(bytes(self._data))


async def _usage(request: Request, organization_id: str, default_limit: int) -> Usage:
    # A short session of its own: nothing stays open (or locked) while the body streams in.
    def read() -> Usage:
        with session_scope(request.app.state.session_factory) as session:
            return StorageQuota(session, default_limit).usage(organization_id)

    return await run_in_threadpool(read)


async def receive_upload(request: Request, spool_dir: Path, usage: Usage) -> SpooledUpload:
    """Read the multipart body, spooling the `file` part into `spool_dir` and stopping as soon as it is
    larger than the organisation's quota leaves room for."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        message = "Send the upload as multipart/form-data, with the file in the 'file' part."
        raise APIError(message, param="file")
    reader = _Reader(spool_dir, params.get(b"charset", b"utf-8").decode("latin-1"))
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    try:
        length = request.headers.get("content-length", "")
        if length.isdigit():
            usage.check(int(length) - OVERHEAD_BYTES)
        spool_dir.mkdir(parents=True, exist_ok=True)
        async for chunk in request.stream():
            parser.write(chunk)
            usage.check(reader.upload.size)
            if reader.pending and reader.upload.file is not None:
                await run_in_threadpool(reader.upload.file.write, b"".join(reader.pending))
            reader.pending.clear()
        parser.finalize()
    except BaseException as exc:
        if reader.upload.file is not None:
            reader.upload.file.close()  # an anonymous file: closing it discards what was spooled
        if isinstance(exc, FormParserError):
            raise APIError("Invalid multipart data.") from exc
        if isinstance(exc, QuotaExceeded):
            raise quota_exceeded(exc) from exc
        raise
    reader.upload.sha256 = reader.digest.hexdigest()
    if reader.upload.file is not None:
        reader.upload.file.seek(0)
    return reader.upload


async def spooled_upload(
    request: Request, organization_id: OrgDep, settings: SettingsDep
) -> AsyncIterator[SpooledUpload]:
    usage = await _usage(request, organization_id, settings.storage_quota_bytes)
    upload = await receive_upload(request, settings.data_dir / "tmp", usage)
    try:
        yield upload
    finally:
        if upload.file is not None:
            upload.file.close()


UploadDep = Annotated[SpooledUpload, Depends(spooled_upload)]
