"""File records: queries only (the bytes live in the artifact store)."""

import time
from collections.abc import Sequence
from typing import BinaryIO

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from models import ids
from models.orm import File, Job
from models.pagination import page
from models.states import ACTIVE
from models.storage import ArtifactStore


class FileRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def store(
        self,
        store: ArtifactStore,
        *,
        organization_id: str,
        source: BinaryIO,
        filename: str,
        purpose: str,
        expires_after_seconds: int | None = None,
    ) -> File:
        """Write the bytes under a generated key, then the row (uploads and jobs' results files)."""
        file_id = ids.file_id()
        key = f"files/{file_id}"
        size, sha256 = store.put_stream(key, source)
        now = int(time.time())
        file = File(
            id=file_id,
            organization_id=organization_id,
            filename=filename,
            purpose=purpose,
            bytes=size,
            sha256=sha256,
            status="processed",
            storage_key=key,
            created_at=now,
            expires_at=now + expires_after_seconds if expires_after_seconds else None,
        )
        self.session.add(file)
        self.session.flush()
        return file

    def _visible(self, organization_id: str) -> Select[File]:
        """An organisation's files that have not expired (`expires_after`)."""
        now = int(time.time())
        return select(File).where(
            File.organization_id == organization_id, File.expires_at.is_(None) | (File.expires_at > now)
        )

    def get(self, organization_id: str, file_id: str) -> File | None:
        return self.session.scalar(self._visible(organization_id).where(File.id == file_id))

    def list(
        self, organization_id: str, *, purpose: str | None, after: File | None, limit: int, descending: bool
    ) -> tuple[Sequence[File], bool]:
        stmt = self._visible(organization_id)
        if purpose is not None:
            stmt = stmt.where(File.purpose == purpose)
        return page(
            self.session,
            stmt,
            File.seq,
            after_seq=after.seq if after else None,
            limit=limit,
            descending=descending,
        )

    def used_by_active_job(self, file_id: str) -> bool:
        """A file an unfinished job still has to read must not be deleted under it."""
        stmt = select(Job.id).where(
            Job.status.in_([s.value for s in ACTIVE]),
            (Job.training_file == file_id) | (Job.validation_file == file_id),
        )
        return self.session.scalar(stmt.limit(1)) is not None

    def delete(self, file: File) -> None:
        self.session.delete(file)
        self.session.flush()
