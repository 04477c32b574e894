"""Files: stored under generated ids in the artifact store; the client's file name is only a label."""

from typing import BinaryIO

from sqlalchemy.orm import Session

from api.deps import on_commit
from api.pagination import cursor
from models.errors import APIError, not_found
from models.files import FileRepository
from models.orm import File
from models.quota import QuotaExceeded, StorageQuota
from models.storage import ArtifactStore

UPLOAD_PURPOSES = ("fine-tune",)
LIST_PURPOSES = ("fine-tune", "fine-tune-results")
MIN_EXPIRY, MAX_EXPIRY = 3600, 2_592_000


def _clean_filename(name: str | None) -> str:
    # Shown back to the client only; never used as a path. Drop control characters and directories.
    name = "".join(ch for ch in (name or "") if ch.isprintable()).replace("\\", "/").rsplit("/", 1)[-1]
    return name[:255] or "upload.jsonl"


def quota_exceeded(exc: QuotaExceeded) -> APIError:
    # 413, not 429: the SDKs retry a 429, and sending the same bytes again can't fit any better.
    return APIError(str(exc), status_code=413, param="file", code=exc.code)


def upload(
    session: Session,
    store: ArtifactStore,
    *,
    organization_id: str,
    source: BinaryIO,
    size: int,
    filename: str | None,
    purpose: str,
    expires_after_seconds: int | None,
    quota_bytes: int,
) -> File:
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(f"Invalid purpose {purpose!r}: ftjobs accepts 'fine-tune' files.", param="purpose")
    if expires_after_seconds is not None and not MIN_EXPIRY <= expires_after_seconds <= MAX_EXPIRY:
        raise APIError(
            f"expires_after[seconds] must be between {MIN_EXPIRY} and {MAX_EXPIRY}.",
            param="expires_after[seconds]",
        )
    try:
        StorageQuota(session, quota_bytes).reserve(organization_id, size)
    except QuotaExceeded as exc:
        raise quota_exceeded(exc) from exc
    return FileRepository(session).store(
        store,
        organization_id=organization_id,
        source=source,
        filename=_clean_filename(filename),
        purpose=purpose,
        expires_after_seconds=expires_after_seconds,
    )


def get(session: Session, organization_id: str, file_id: str) -> File:
    file = FileRepository(session).get(organization_id, file_id)
    if file is None:
        raise not_found("file", file_id, "file_id")
    return file


def list_files(
    session: Session, organization_id: str, *, purpose: str | None, after: str | None, limit: int, order: str
) -> tuple[list[File], bool]:
    if purpose is not None and purpose not in LIST_PURPOSES:
        raise APIError(f"Invalid purpose {purpose!r}.", param="purpose")
    repo = FileRepository(session)
    start = cursor(after, lambda file_id: repo.get(organization_id, file_id), "file")
    rows, has_more = repo.list(
        organization_id, purpose=purpose, after=start, limit=limit, descending=order == "desc"
    )
    return list(rows), has_more


def delete(session: Session, store: ArtifactStore, organization_id: str, file_id: str) -> None:
    repo = FileRepository(session)
    file = get(session, organization_id, file_id)
    if repo.used_by_active_job(file.id):
        raise APIError(
            f"File {file_id} is used by a fine-tuning job that has not finished; cancel the job first.",
            param="file_id",
            code="file_in_use",
        )
    repo.delete(file)
    on_commit(session, lambda: store.delete(file.storage_key))
