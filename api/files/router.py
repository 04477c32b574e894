from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from api.deps import OrgDep, SessionDep, SettingsDep, StoreDep
from api.files import service as file_service
from api.files.schemas import UPLOAD_BODY, FileDeleted, FileObject, UploadForm
from api.files.spool import SpooledUpload, UploadDep
from api.idempotency import IdempotencyDep
from api.pagination import After, Limit, ListPage, list_page

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileObject, openapi_extra={"requestBody": UPLOAD_BODY})
def upload_file(
    upload: UploadDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    org: OrgDep,
    idempotency: IdempotencyDep,
) -> Any:
    """Upload a JSONL file for fine-tuning."""
    form = _form(upload)
    file = upload.file
    assert file is not None  # _form checked it

    def store_upload() -> FileObject:
        stored = file_service.upload(
            session,
            store,
            organization_id=org,
            source=file,
            size=upload.size,
            filename=upload.filename,
            purpose=form.purpose,
            expires_after_seconds=form.expires_after_seconds,
            quota_bytes=settings.storage_quota_bytes,
        )
        return FileObject.model_validate(stored)

    def request() -> bytes:
        return f"{form.purpose}\0{upload.filename}\0{form.expires_after_seconds}\0{upload.sha256}".encode()

    return idempotency.run(request, store_upload)


def _form(upload: SpooledUpload) -> UploadForm:
    """The form fields, validated as FastAPI validates a declared form (a 400 naming the field)."""
    errors = []
    if upload.file is None:
        errors.append({"type": "missing", "loc": ("body", "file"), "msg": "Field required", "input": None})
    form: UploadForm | None = None
    try:
        form = UploadForm.model_validate(upload.fields)
    except ValidationError as exc:
        errors += [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
    if errors or form is None:
        raise RequestValidationError(errors)
    return form


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
