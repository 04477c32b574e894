"""File records: queries only (the bytes live in the artifact store)."""

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.orm import File, Job
from models.pagination import page
from models.states import ACTIVE


class FileRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, file: File) -> File:
        self.session.add(file)
        self.session.flush()
        return file

    def get(self, organization_id: str, file_id: str) -> File | None:
        return self.session.scalar(
            select(File).where(File.id == file_id, File.organization_id == organization_id)
        )

    def list(
        self, organization_id: str, *, purpose: str | None, after: File | None, limit: int, descending: bool
    ) -> tuple[Sequence[File], bool]:
        stmt = select(File).where(File.organization_id == organization_id)
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
