"""The reconciler: puts right what crashes and lost messages leave behind, from the database alone.

- A `running` job whose lease expired (its worker died, or lost the database) is queued again as a new
  attempt, or fails once `max_attempts` attempts have been used. The old attempt, if it still runs,
  is fenced off: its writes name its attempt number and no longer match.
- A job still waiting (`validating_files`/`queued`) long after its last wake-up gets another one, with a
  growing interval, so a message lost by the broker (Redis restarted empty) costs a delay, not the job.
- With `FTJOBS_EXECUTOR=slurm`, a job trained by a Slurm allocation (lease owner `slurm:ID`) keeps its
  lease while the allocation waits for nodes, and is requeued as a killed attempt as soon as `squeue` shows
  the allocation ended (cancelled, a node failed, out of time) while the job still runs on it.
- Every `store_sweep_seconds` (an hour), and once at start, the artifact store is swept of what crashed
  writers left: half-published or half-deleted prefixes and multipart uploads never completed, older than
  `store_orphan_seconds` (a day). It lists the whole store, so it runs far less often than the job sweep.
- Sweeps (`models.sweeps`): after each job sweep, the `sweeps` hook advances every running hyperparameter
  sweep (stops weak trials early, starts new ones, finishes it); the process wires it to the jobs service.
- Scheduling (`models.scheduling.Preemption`): a queued job no live worker could run gets one event saying
  what it waits for; a higher-priority job that cannot start pauses a preemptible one; a preempted job is
  queued again once the job it made room for has started.

Every API and worker process runs one; on Postgres a transaction-scoped advisory lock lets one sweep at a
time, and every change is a compare-and-set, so overlapping sweeps cannot requeue a job twice. Store sweeps
take a session-level advisory lock of their own: one process sweeps the store at a time.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from models.db import session_scope
from models.idempotency import IdempotencyRepository
from models.jobs import JobRepository
from models.orm import Job
from models.queue import Dispatcher
from models.scheduling import Preemption
from models.settings import Settings
from models.states import JobStatus, transition
from models.storage import ArtifactStore, Swept
from worker import slurm

log = logging.getLogger("ftjobs.reconciler")

_SWEEP_LOCK = 7_102_932
_STORE_SWEEP_LOCK = 7_102_933


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
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        dispatcher: Dispatcher,
        store: ArtifactStore | None = None,
        sweeps: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.sweeps = sweeps
        self.session_factory = session_factory
        self.dispatcher = dispatcher
        self.store = store
        self._store_sweep_due = 0.0
        """When the store is swept next (monotonic clock): at the first tick, then every interval."""

    def sweep(self) -> Sweep:
        now = time.time()
        result = Sweep()
        with session_scope(self.session_factory) as session:
            if session.get_bind().dialect.name == "postgresql":
                locked = session.scalar(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": _SWEEP_LOCK})
                if not locked:
                    return result  # another process is sweeping right now
            repo = JobRepository(session)
            if self.settings.executor == "slurm":
                self._watch_allocations(session, now, result)
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
        self._count(
            retry_or_fail(session, job, reason, max_attempts=self.settings.max_attempts, now=now), job, result
        )

    @staticmethod
    def _count(outcome: Literal["requeued", "failed"] | None, job: Job, result: Sweep) -> None:
        if outcome == "requeued":
            result.requeued.append(job.id)
        elif outcome == "failed":
            result.failed.append(job.id)

    def _watch_allocations(self, session: Session, now: float, result: Sweep) -> None:
        """Keep the lease of a job whose allocation waits to start (nobody heartbeats for it yet), saying
        once why it waits; requeue one whose allocation ended while the job still runs on it (its runners
        were killed with it)."""
        stmt = select(Job).where(
            Job.status == JobStatus.RUNNING.value, Job.lease_owner.startswith(slurm.OWNER_PREFIX)
        )
        jobs = {job.id: job for job in session.scalars(stmt)}
        allocations = {
            job_id: (job.lease_owner or "").removeprefix(slurm.OWNER_PREFIX) for job_id, job in jobs.items()
        }
        if not allocations:
            return
        try:
            states = slurm.states(list(allocations.values()))
        except slurm.SlurmError as error:  # the leases still expire, as for any worker that went quiet
            log.warning("reconciler: cannot read Slurm's allocations: %s", error)
            return
        repo = JobRepository(session)
        for job_id, slurm_id in allocations.items():
            job, found = jobs[job_id], states.get(slurm_id)
            if found is not None and found.state in slurm.WAITING:
                repo.renew_lease(job_id, job.attempt, now=now, lease_seconds=self.settings.lease_seconds)
                # One event for what it waits for (busy nodes, more than its partition has), not one a sweep.
                waits = f"Slurm allocation {slurm_id} waits to start ({found.reason})"
                [latest], _ = repo.list_events(job_id, after=None, limit=1)
                if found.reason != "None" and latest.message != waits:
                    repo.add_event(job_id, waits)
            elif found is None or found.state not in slurm.ALIVE:
                ended = found.state if found else "gone from squeue"
                reason = f"Attempt {job.attempt} was killed: its Slurm allocation {slurm_id} ended ({ended})"
                outcome = retry_or_fail(
                    session, job, reason, max_attempts=self.settings.max_attempts, now=now
                )
                self._count(outcome, job, result)

    def sweep_store(self) -> Swept | None:
        """Sweep the artifact store if it is due (None: not due, no store, or another process sweeps)."""
        if self.store is None or time.monotonic() < self._store_sweep_due:
            return None
        self._store_sweep_due = time.monotonic() + self.settings.store_sweep_seconds
        with self.session_factory() as session:
            engine = session.get_bind()
        assert isinstance(engine, Engine)
        if engine.dialect.name != "postgresql":
            return self.store.sweep(self.settings.store_orphan_seconds)
        # A session-level lock on a connection held throughout, outside any transaction: a sweep can take
        # minutes and holds no rows.
        with engine.connect() as connection:
            lock = {"id": _STORE_SWEEP_LOCK}
            locked = connection.scalar(text("SELECT pg_try_advisory_lock(:id)"), lock)
            connection.commit()
            if not locked:
                return None
            try:
                return self.store.sweep(self.settings.store_orphan_seconds)
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), lock)
                connection.commit()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.reconcile_seconds):
            try:
                sweep = self.sweep()
                if sweep.requeued or sweep.failed:
                    log.warning("reconciler: requeued %s, failed %s", sweep.requeued, sweep.failed)
            except Exception:  # the database may be down; the next sweep tries again
                log.exception("reconciler sweep failed")
            try:
                if self.sweeps is not None:
                    self.sweeps()
            except Exception:  # as above: the next tick tries again
                log.exception("sweep driver tick failed")
            try:
                if (swept := self.sweep_store()) and (swept.prefixes or swept.uploads):
                    log.warning("store sweep: removed %s, aborted %d uploads", swept.prefixes, swept.uploads)
            except Exception:  # the store may be down; the next interval tries again
                log.exception("store sweep failed")

    def start(self) -> threading.Event:
        """Sweep in a daemon thread until the returned event is set."""
        stop = threading.Event()
        threading.Thread(target=self.run_forever, args=(stop,), name="ftjobs-reconciler", daemon=True).start()
        return stop
