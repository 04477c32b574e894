from typing import Literal

from pydantic import BaseModel

from models.orm import File


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, file: File) -> "FileObject":
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=file.created_at,
            filename=file.filename,
            purpose=file.purpose,
            status=file.status,  # type: ignore[arg-type]
            expires_at=file.expires_at,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
