"""Read jobs straight from the database, for the fault tests' invariants (the API does not show
`attempt`, and a test must not trust the service it is checking to report on itself)."""

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, select

from models.db import make_engine
from models.orm import Job, JobEvent

STARTED = "Fine-tuning job started"


@dataclass(frozen=True)
class JobRow:
    status: str
    attempt: int
    fine_tuned_model: str | None
    result_files: tuple[str, ...]
    finished_at: int | None


def job_rows(database_url: str) -> dict[str, JobRow]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    Job.id, Job.status, Job.attempt, Job.fine_tuned_model, Job.result_files, Job.finished_at
                )
            )
            return {
                row.id: JobRow(
                    row.status, row.attempt, row.fine_tuned_model, tuple(row.result_files), row.finished_at
                )
                for row in rows
            }
    finally:
        engine.dispose()


def event_counts(database_url: str, message: str = STARTED) -> Counter[str]:
    """How many events with exactly `message` each job has."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            stmt = (
                select(JobEvent.job_id, func.count())
                .where(JobEvent.message == message)
                .group_by(JobEvent.job_id)
            )
            return Counter(dict(conn.execute(stmt).tuples().all()))
    finally:
        engine.dispose()
