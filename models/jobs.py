"""Job, event and checkpoint queries. Status changes go through `models.states.transition` only."""

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import ids
from models.orm import Job, JobCheckpoint, JobEvent
from models.pagination import page
from models.states import ACTIVE, JobStatus


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, job: Job) -> Job:
        self.session.add(job)
        self.session.flush()
        return job

    def get(self, job_id: str, organization_id: str | None = None) -> Job | None:
        """A job by id; scoped to an organisation for API callers, unscoped for workers."""
        stmt = select(Job).where(Job.id == job_id)
        if organization_id is not None:
            stmt = stmt.where(Job.organization_id == organization_id)
        return self.session.scalar(stmt)

    def list(
        self,
        organization_id: str,
        *,
        metadata: dict[str, str] | None,
        no_metadata: bool,
        statuses: Sequence[JobStatus] | None,
        after: Job | None,
        limit: int,
    ) -> tuple[Sequence[Job], bool]:
        stmt = select(Job).where(Job.organization_id == organization_id)
        if statuses:
            stmt = stmt.where(Job.status.in_([status.value for status in statuses]))
        if no_metadata:
            stmt = stmt.where(Job.metadata_.is_(None))
        for key, value in (metadata or {}).items():
            stmt = stmt.where(Job.metadata_[key].as_string() == value)
        return page(self.session, stmt, Job.seq, after_seq=after.seq if after else None, limit=limit)

    def count_active(self, organization_id: str) -> int:
        """The organisation's jobs that have not finished (paused ones included)."""
        stmt = select(func.count()).where(
            Job.organization_id == organization_id, Job.status.in_([status.value for status in ACTIVE])
        )
        return self.session.scalar(stmt) or 0

    def pending_ids(self, limit: int) -> Sequence[str]:
        """Jobs waiting for a runner, oldest first."""
        stmt = (
            select(Job.id)
            .where(Job.status.in_([JobStatus.VALIDATING_FILES.value, JobStatus.QUEUED.value]))
            .order_by(Job.seq)
            .limit(limit)
        )
        return self.session.scalars(stmt).all()

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> JobEvent:
        event = JobEvent(
            id=ids.event_id(),
            job_id=job_id,
            created_at=int(time.time()),
            level=level,
            message=message,
            type=type,
            data=data,
        )
        self.session.add(event)
        return event

    def get_event(self, job_id: str, event_id: str) -> JobEvent | None:
        return self.session.scalar(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id == event_id))

    def list_events(
        self, job_id: str, *, after: JobEvent | None, limit: int
    ) -> tuple[Sequence[JobEvent], bool]:
        stmt = select(JobEvent).where(JobEvent.job_id == job_id)
        return page(self.session, stmt, JobEvent.seq, after_seq=after.seq if after else None, limit=limit)

    def add_checkpoint(self, checkpoint: JobCheckpoint) -> JobCheckpoint:
        self.session.add(checkpoint)
        return checkpoint

    def latest_checkpoint(self, job_id: str) -> JobCheckpoint | None:
        stmt = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id).order_by(JobCheckpoint.seq.desc())
        return self.session.scalar(stmt.limit(1))

    def drop_old_checkpoints(self, job_id: str, *, keep: int, spare: str | None = None) -> Sequence[str]:
        """Delete all but the newest `keep` checkpoint rows of a job, and the `spare` one (the best);
        return their storage keys."""
        stmt = (
            select(JobCheckpoint)
            .where(JobCheckpoint.job_id == job_id)
            .order_by(JobCheckpoint.seq.desc())
            .offset(keep)
        )
        old = [checkpoint for checkpoint in self.session.scalars(stmt) if checkpoint.id != spare]
        for checkpoint in old:
            self.session.delete(checkpoint)
        return [checkpoint.storage_key for checkpoint in old]

    def get_checkpoint(self, job_id: str, checkpoint_id: str) -> JobCheckpoint | None:
        return self.session.scalar(
            select(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.id == checkpoint_id)
        )

    def list_checkpoints(
        self, job_id: str, *, after: JobCheckpoint | None, limit: int
    ) -> tuple[Sequence[JobCheckpoint], bool]:
        stmt = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
        return page(
            self.session, stmt, JobCheckpoint.seq, after_seq=after.seq if after else None, limit=limit
        )
