"""Job, event and checkpoint queries, the jobs' aggregates, and the typed data of the events other code
reads back. Status changes go through `models.states.transition` only."""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    SQLColumnExpression,
    case,
    cast,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from models import ids
from models.orm import Job, JobCheckpoint, JobEvent
from models.pagination import page
from models.spec import DeviceInfo
from models.states import ACTIVE, TERMINAL, JobStatus

WAITING = (JobStatus.VALIDATING_FILES.value, JobStatus.QUEUED.value)
"""The statuses of a job waiting for a runner."""


class StartedData(BaseModel):
    """The data of a job's `Training N examples in M steps on DEVICE` event, from its trainer's
    `StartedMessage` (docs/api.md): the pre-flight estimate sizes jobs for the latest `device`."""

    model_config = ConfigDict(from_attributes=True)

    total_steps: int
    n_train_examples: int
    truncated_examples: int = 0
    device: DeviceInfo | None = None


class CompletedData(BaseModel):
    """The data of a job's `The job has successfully completed` event: the throughput the pre-flight
    estimate measures durations by."""

    model_config = ConfigDict(from_attributes=True)

    trained_tokens: int
    elapsed_seconds: float | None = None
    """Time in the training loop over every attempt; None from a trainer that did not measure it."""


def accrued(now: float) -> dict[str, Any]:
    """What a job's heartbeat at `now` writes: the device-seconds since its last one (its `usage`), and
    the new heartbeat time."""
    since = func.coalesce(Job.heartbeat_at, now)
    return {"device_seconds": Job.device_seconds + Job.devices * (now - since), "heartbeat_at": now}


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
        stmt = select(Job.id).where(Job.status.in_(WAITING)).order_by(Job.seq).limit(limit)
        return self.session.scalars(stmt).all()

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: StartedData | CompletedData | dict[str, Any] | None = None,
    ) -> JobEvent:
        event = JobEvent(
            id=ids.event_id(),
            job_id=job_id,
            created_at=int(time.time()),
            level=level,
            message=message,
            type=type,
            data=data.model_dump() if isinstance(data, BaseModel) else data,
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

    def latest_device(self, *, jobs: int) -> DeviceInfo | None:
        """The device the newest of the latest `jobs` jobs to start trained on, of any organisation."""
        started = (
            select(Job.id).where(Job.started_at.is_not(None)).order_by(Job.started_at.desc()).limit(jobs)
        )
        stmt = self._data_of(started).where(JobEvent.data["device"].as_string().is_not(None))
        data = self.session.scalar(stmt.order_by(JobEvent.seq.desc()).limit(1))
        return StartedData.model_validate(data).device if data else None

    def measured_throughputs(
        self, model: str, method_type: str, training_type: str, *, jobs: int
    ) -> Sequence[CompletedData]:
        """What the latest `jobs` succeeded jobs of this base model, method and training type, of any
        organisation, measured of their training loop (those that did)."""
        same = (
            select(Job.id)
            .where(
                Job.model == model,
                Job.status == JobStatus.SUCCEEDED.value,
                Job.method["type"].as_string() == method_type,
                Job.hyperparameters["training_type"].as_string() == training_type,
            )
            .order_by(Job.finished_at.desc())
            .limit(jobs)
        )
        stmt = self._data_of(same).where(JobEvent.data["elapsed_seconds"].as_float() > 0)
        return [CompletedData.model_validate(data) for data in self.session.scalars(stmt)]

    @staticmethod
    def _data_of(jobs: Select[str]) -> Select[dict[str, Any] | None]:
        """The data of these jobs' message events (metrics events are their own type)."""
        return select(JobEvent.data).where(JobEvent.job_id.in_(jobs), JobEvent.type == "message")

    def renew_lease(
        self,
        job_id: str,
        attempt: int,
        *,
        now: float,
        lease_seconds: float,
        paused_too: bool = False,
        values: dict[str, Any] | None = None,
    ) -> bool:
        """Heartbeat (plus `values`) only while the job is running on `attempt` (or, with `paused_too`, was
        paused on it); True if it was."""
        statuses = (
            [JobStatus.RUNNING.value, JobStatus.PAUSED.value] if paused_too else [JobStatus.RUNNING.value]
        )
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(statuses))
            .values(**accrued(now), lease_expires_at=now + lease_seconds, **(values or {}))
        )
        return self.session.execute(stmt).rowcount == 1  # pyright: ignore[reportAttributeAccessIssue]  # DML gives a CursorResult

    def expired_leases(self, *, now: float, lease_seconds: float) -> Sequence[Job]:
        """Running jobs whose lease ended before `now`."""
        # A claim always sets the lease; COALESCE still reaps a row that somehow has none.
        lease_end = func.coalesce(Job.lease_expires_at, Job.started_at + lease_seconds, 0)
        stmt = select(Job).where(Job.status == JobStatus.RUNNING.value, lease_end < now)
        return self.session.scalars(stmt).all()

    def redispatch_waiting(
        self, *, now: float, redispatch_seconds: float
    ) -> Sequence[tuple[str, str | None]]:
        """Mark as woken at `now` the waiting jobs not woken for a while, and return them (with their device
        class, which says whose queue); the interval grows with the job's age (few duplicates)."""
        waited = now - func.coalesce(Job.dispatched_at, 0)
        backoff = func.max if self.session.get_bind().dialect.name == "sqlite" else func.greatest
        interval = backoff(redispatch_seconds, func.coalesce(Job.dispatched_at, 0) - Job.created_at)
        stmt = (
            update(Job)
            .where(Job.status.in_(WAITING), or_(Job.dispatched_at.is_(None), waited > interval))
            .values(dispatched_at=now)
            .returning(Job.id, Job.device_class)
        )
        return self.session.execute(stmt).tuples().all()

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


@dataclass(frozen=True)
class Distribution:
    """One label set's observations: how many, their sum, and how many are at most each bucket's bound."""

    labels: tuple[str, ...]
    count: int
    total: float
    buckets: list[tuple[float, int]]


class JobStatistics:
    """The jobs' aggregates /metrics reports: each is one query returning a row per label set, however many
    jobs there are."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def count_by_status(self) -> dict[str, int]:
        return dict(
            self.session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all()
        )

    def oldest_waiting_since(self) -> float | None:
        """Since when the longest-waiting job has waited for a worker; None when none waits."""
        # A job starts waiting when it is created, resumed or queued again, and each of those writes an event:
        # its latest event says since when (created_at would count a resumed job's whole history).
        waiting = (
            select(func.max(JobEvent.created_at).label("since"))
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.status.in_(WAITING))
            .group_by(JobEvent.job_id)
            .subquery()
        )
        return self.session.execute(select(func.min(waiting.c.since))).scalar()

    def queue_waits(self, buckets: Sequence[float]) -> list[Distribution]:
        """Time from a job's creation to the start of its (latest) attempt, for jobs that started."""
        return self._distributions(Job.started_at - Job.created_at, buckets, [Job.started_at.is_not(None)])

    def durations(self, buckets: Sequence[float]) -> list[Distribution]:
        """Wall-clock time of finished jobs' (last) attempt, start to finish, by final status."""
        finished = [
            Job.status.in_([s.value for s in TERMINAL]),
            Job.started_at.is_not(None),
            Job.finished_at.is_not(None),
        ]
        return self._distributions(Job.finished_at - Job.started_at, buckets, finished, [Job.status])

    def training_rates(self, buckets: Sequence[float]) -> list[Distribution]:
        """Succeeded jobs' trained tokens over their wall-clock duration, by base model and training type."""
        duration = Job.finished_at - Job.started_at
        # Jobs that ran in one attempt only: a resumed job's tokens span attempts its times do not.
        single = [
            Job.status == JobStatus.SUCCEEDED.value,
            Job.attempt == 1,
            Job.trained_tokens > 0,
            duration > 0,
        ]
        labels = [Job.model, Job.hyperparameters["training_type"].as_string()]
        return self._distributions(cast(Job.trained_tokens, Float) / duration, buckets, single, labels)

    def _distributions(
        self,
        value: ColumnElement[float],
        buckets: Sequence[float],
        where: Sequence[ColumnElement[bool]],
        labels: Sequence[SQLColumnExpression[Any]] = (),
    ) -> list[Distribution]:
        """Per label set, the count, the sum and a count per bucket (unlabelled: one, even of no jobs)."""
        counts = [func.sum(case((value <= bound, 1), else_=0)) for bound in buckets]
        query = select(*labels, func.count(), func.sum(value), *counts).where(*where).group_by(*labels)
        distributions = []
        for row in self.session.execute(query):
            names, (count, total, *cumulative) = row[: len(labels)], row[len(labels) :]
            distributions.append(
                Distribution(
                    labels=tuple(str(name or "") for name in names),
                    count=int(count),
                    total=float(total or 0),
                    buckets=[(bound, int(n or 0)) for bound, n in zip(buckets, cumulative, strict=True)],
                )
            )
        return distributions
