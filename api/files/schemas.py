from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

OmittedWhenNone = Field(exclude_if=lambda value: value is None)
"""The openai SDKs declare these optional but not nullable (`expires_at?: number`): unset is absent."""


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
