"""How the API wakes a runner once a job is committed. The database row is the job; this is a nudge."""

import logging
from typing import Protocol

from models.queue import RUN_JOB, make_celery
from models.settings import Settings

log = logging.getLogger("ftjobs.api")


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)
        self.queue = settings.worker_queue

    def submit(self, job_id: str) -> None:
        try:
            self.celery.send_task(RUN_JOB, args=[job_id], queue=self.queue)
        except Exception:  # broker down: the committed job waits for the next wake-up, it is not lost
            log.exception("could not publish job %s to the broker", job_id)
