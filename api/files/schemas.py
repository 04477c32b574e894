from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OmittedWhenNone = Field(exclude_if=lambda value: value is None)
"""The openai SDKs declare these optional but not nullable (`expires_at?: number`): unset is absent."""


class UploadForm(BaseModel):
    """The form fields of an upload, beside its `file` part."""

    purpose: str
    expires_after_anchor: Literal["created_at"] | None = Field(default=None, alias="expires_after[anchor]")
    expires_after_seconds: int | None = Field(default=None, alias="expires_after[seconds]")


class FileObject(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: Annotated[int | None, OmittedWhenNone] = None
    status_details: Annotated[str | None, OmittedWhenNone] = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def _upload_body() -> dict[str, Any]:
    form = UploadForm.model_json_schema(by_alias=True)
    file = {"type": "string", "contentMediaType": "application/octet-stream", "title": "File"}
    schema = {**form, "properties": {"file": file, **form["properties"]}, "required": ["file", "purpose"]}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


UPLOAD_BODY = _upload_body()
"""The upload's request body for the OpenAPI schema: the route parses the body itself (api/files/spool.py),
so FastAPI can't describe it."""
