"""The reconciler: puts right what crashes and lost messages leave behind, from the database alone.

- A `running` job whose lease expired (its worker died, or lost the database) is queued again as a new
  attempt, or fails once `max_attempts` attempts have been used. The old attempt, if it still runs,
  is fenced off: its writes name its attempt number and no longer match.
- A job still waiting (`validating_files`/`queued`) long after its last wake-up gets another one, with a
  growing interval, so a message lost by the broker (Redis restarted empty) costs a delay, not the job.
- Scheduling (`models.scheduling.Preemption`): a queued job no live worker could run gets one event saying
  what it waits for; a higher-priority job that cannot start pauses a preemptible one; a preempted job is
  queued again once the job it made room for has started.

Every API and worker process runs one; on Postgres a transaction-scoped advisory lock lets one sweep at a
time, and every change is a compare-and-set, so overlapping sweeps cannot requeue a job twice.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models.db import session_scope
from models.idempotency import IdempotencyRepository
from models.jobs import JobRepository
from models.orm import Job
from models.queue import Dispatcher
from models.scheduling import Preemption
from models.settings import Settings
from models.states import JobStatus, transition

log = logging.getLogger("ftjobs.reconciler")

_SWEEP_LOCK = 7_102_932


@dataclass
class Sweep:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    woken: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


def retry_or_fail(
    session: Session, job: Job, reason: str, *, max_attempts: int, now: float
) -> Literal["requeued", "failed"] | None:
    """Queue a running job's next attempt, or fail it once `max_attempts` are spent; None if it moved on."""
    repo = JobRepository(session)
    lease = {"lease_owner": None, "lease_expires_at": None, "estimated_finish": None}
    if job.attempt >= max_attempts:
        message = f"{reason}; that was attempt {job.attempt} of {max_attempts}, so the job failed."
        error = {"code": "max_attempts_exceeded", "message": message, "param": None}
        values = {**lease, "error": error, "finished_at": int(now)}
        if not transition(
            session, job.id, from_=JobStatus.RUNNING, to=JobStatus.FAILED, attempt=job.attempt, values=values
        ):
            return None
        repo.add_event(job.id, message, level="error")
        return "failed"
    # No wake-up time recorded: the next sweep (of any process) wakes a runner for it.
    values = {**lease, "dispatched_at": None}
    if not transition(
        session, job.id, from_=JobStatus.RUNNING, to=JobStatus.QUEUED, attempt=job.attempt, values=values
    ):
        return None
    repo.add_event(job.id, f"{reason}; the job is queued again.", level="warn")
    return "requeued"


class Reconciler:
    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], dispatcher: Dispatcher
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.dispatcher = dispatcher

    def sweep(self) -> Sweep:
        now = time.time()
        result = Sweep()
        with session_scope(self.session_factory) as session:
            if session.get_bind().dialect.name == "postgresql":
                locked = session.scalar(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": _SWEEP_LOCK})
                if not locked:
                    return result  # another process is sweeping right now
            repo = JobRepository(session)
            for job in repo.expired_leases(now=now, lease_seconds=self.settings.lease_seconds):
                self._recover(session, job, now, result)
            queue = Preemption(session, now=now, live_seconds=self.settings.lease_seconds)
            queue.note_waits()
            preempted = queue.preempt()
            queue.resume_preempted()
            woken = repo.redispatch_waiting(now=now, redispatch_seconds=self.settings.redispatch_seconds)
            result.woken = [job_id for job_id, _ in woken]
            result.preempted = [victim for victim, _ in preempted]
            IdempotencyRepository(session).expire()
        # Requeued and resumed jobs are among the woken (they have no wake-up time).
        for job_id, device_class in woken:
            self.dispatcher.submit(job_id, device_class)
        return result

    def _recover(self, session: Session, job: Job, now: float, result: Sweep) -> None:
        reason = f"Attempt {job.attempt} stopped reporting (its worker died or lost the database)"
        outcome = retry_or_fail(session, job, reason, max_attempts=self.settings.max_attempts, now=now)
        if outcome == "requeued":
            result.requeued.append(job.id)
        elif outcome == "failed":
            result.failed.append(job.id)

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.reconcile_seconds):
            try:
                sweep = self.sweep()
                if sweep.requeued or sweep.failed:
                    log.warning("reconciler: requeued %s, failed %s", sweep.requeued, sweep.failed)
            except Exception:  # the database may be down; the next sweep tries again
                log.exception("reconciler sweep failed")

    def start(self) -> threading.Event:
        """Sweep in a daemon thread until the returned event is set."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="ftjobs-reconciler", daemon=True).start()
        return stop
