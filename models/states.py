"""The job state machine: the only way a job's status changes.

Every change is a compare-and-set UPDATE: it applies only if the job is still in one of the expected
states (and, for worker writes, still on the expected attempt), so a duplicate Celery delivery, a
stale attempt or a cancel racing a completion can never both win.
"""

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from models.orm import Job
from models.webhooks import WebhookRepository, job_event_type


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset(JobStatus) - TERMINAL

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset(
        {JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED}
    ),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED}),
    # running → queued: the reconciler requeues an attempt whose worker stopped renewing its lease.
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED, JobStatus.PAUSED}
    ),
    # paused → queued is resume: the next attempt continues from the latest checkpoint.
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def transition(
    session: Session,
    job_id: str,
    *,
    from_: JobStatus | Iterable[JobStatus],
    to: JobStatus,
    attempt: int | None = None,
    values: dict[str, Any] | None = None,
) -> bool:
    """Move `job_id` to `to` if it is in `from_` (and on `attempt`, when given); True if it moved.

    `values` are written in the same UPDATE, so a status and the data that goes with it (results,
    error, lease) are never seen apart. A move to a final status also writes the job's webhook event
    (the outbox) in the caller's transaction: the event exists if and only if the status change does.
    """
    expected = {JobStatus(from_)} if isinstance(from_, str) else {JobStatus(s) for s in from_}
    illegal = [s for s in expected if to not in ALLOWED[s]]
    if illegal:
        raise InvalidTransition(f"{', '.join(sorted(illegal))} -> {to}")
    conditions = [Job.id == job_id, Job.status.in_([s.value for s in expected])]
    if attempt is not None:
        conditions.append(Job.attempt == attempt)
    moved = session.execute(
        update(Job)
        .where(*conditions)
        .values(status=to.value, **(values or {}))
        .returning(Job.organization_id),
        execution_options={"synchronize_session": False},
    ).all()
    if moved and to in TERMINAL:
        WebhookRepository(session).enqueue_job_event(moved[0].organization_id, job_id, job_event_type(to))
    return bool(moved)
