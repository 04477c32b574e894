import hashlib
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, Form, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import OrgDep, SessionDep, StoreDep
from api.files import service as file_service
from api.files.schemas import FileDeleted, FileObject
from api.idempotency import IdempotencyDep
from api.pagination import After, Limit, ListPage, list_page

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileObject)
def upload_file(
    file: UploadFile,
    session: SessionDep,
    store: StoreDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
    purpose: Annotated[str, Form()],
    expires_after_anchor: Annotated[Literal["created_at"] | None, Form(alias="expires_after[anchor]")] = None,
    expires_after_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
) -> Any:
    """Upload a JSONL file for fine-tuning."""

    def store_upload() -> FileObject:
        stored = file_service.upload(
            session,
            store,
            organization_id=org,
            source=file.file,
            filename=file.filename,
            purpose=purpose,
            expires_after_seconds=expires_after_seconds,
        )
        return FileObject.model_validate(stored)

    def request() -> bytes:
        return f"{purpose}\0{file.filename}\0{expires_after_seconds}\0{_sha256(file.file)}".encode()

    return idempotency.run(request, store_upload)


def _sha256(source: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := source.read(1 << 20):
        digest.update(chunk)
    source.seek(0)
    return digest.hexdigest()


@router.get("")
def list_files(
    session: SessionDep,
    org: OrgDep,
    after: After = None,
    limit: Annotated[int, Limit(10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> ListPage[FileObject]:
    """List files, newest first by default."""
    rows, has_more = file_service.list_files(
        session, org, purpose=purpose, after=after, limit=limit, order=order
    )
    return list_page(rows, has_more, FileObject.model_validate)


@router.get("/{file_id}")
def retrieve_file(file_id: str, session: SessionDep, org: OrgDep) -> FileObject:
    """Retrieve a file's metadata."""
    return FileObject.model_validate(file_service.get(session, org, file_id))


@router.delete("/{file_id}")
def delete_file(file_id: str, session: SessionDep, store: StoreDep, org: OrgDep) -> FileDeleted:
    """Delete a file and its bytes."""
    file_service.delete(session, store, org, file_id)
    return FileDeleted(id=file_id, deleted=True)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/jsonl": {}, "text/csv": {}}, "description": "The file's bytes."}
    },
)
def download_file(file_id: str, session: SessionDep, store: StoreDep, org: OrgDep) -> StreamingResponse:
    """Download a file's bytes."""
    file = file_service.get(session, org, file_id)
    media_type = "text/csv" if file.purpose == "fine-tune-results" else "application/jsonl"
    source = store.open(file.storage_key)

    def chunks() -> Iterator[bytes]:
        with source:
            while chunk := source.read(1 << 16):
                yield chunk

    return StreamingResponse(chunks(), media_type=media_type, headers={"content-length": str(file.bytes)})
