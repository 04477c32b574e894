"""Embedded deployment: runner threads inside the `ftjobs up` process, fed straight from the database.

There is no broker: threads poll for pending jobs (oldest first) and `submit` only wakes them early; the
runner then claims whichever job fits best (models/scheduling.py).
Training still happens in child processes, never in this process.
"""

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from models.db import session_scope
from models.jobs import JobRepository
from worker.runner import JobRunner

log = logging.getLogger("ftjobs.worker")


class EmbeddedDispatcher:
    def __init__(
        self,
        runner: JobRunner,
        session_factory: sessionmaker[Session],
        *,
        workers: int,
        poll_seconds: float = 5.0,
    ) -> None:
        self.runner = runner
        self.session_factory = session_factory
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._taken: set[str] = set()
        self._threads = [
            threading.Thread(target=self._loop, name=f"ftjobs-runner-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def submit(self, job_id: str, device_class: str | None = None) -> None:
        self._wake.set()

    def _next(self) -> str | None:
        """The oldest pending job no other thread of this process has taken."""
        with session_scope(self.session_factory) as session:
            pending = JobRepository(session).pending_ids(limit=len(self._threads) + 1)
        with self._lock:
            for job_id in pending:
                if job_id not in self._taken:
                    self._taken.add(job_id)
                    return job_id
        return None

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job_id = self._next()
            except Exception:
                log.exception("could not read pending jobs")
                job_id = None
            if job_id is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            ran = 0
            try:
                ran = self.runner.run(job_id)
            except Exception:
                log.exception("runner failed on job %s", job_id)
            finally:
                with self._lock:
                    self._taken.discard(job_id)
            if not ran:  # it waits for room (a cap, a busy device): not again until something changes
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
