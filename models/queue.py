"""The Celery app both sides share: the API publishes wake-ups, workers consume them.

A message carries only a job id; Postgres holds the job. One queue per device class: a job for class C wakes
only the workers of C (docs/scheduling.md). Settings suit multi-hour tasks: early ack
(the database, not the broker, recovers crashed jobs), one message per worker process at a time,
JSON only, no result backend.
"""

import logging
from typing import Protocol

from celery import Celery

from models.settings import Settings

log = logging.getLogger("ftjobs")

RUN_JOB = "ftjobs.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("ftjobs", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        task_default_queue=settings.worker_queue,
        broker_connection_retry_on_startup=True,
        # Publishing must not hang an API request when Redis is down; the job is already committed.
        broker_transport_options={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        worker_hijack_root_logger=False,
    )
    return app


class Dispatcher(Protocol):
    """Wakes a runner for a committed job. The database row is the job; this is only a nudge."""

    def submit(self, job_id: str, device_class: str | None = None) -> None: ...


def class_queue(prefix: str, device_class: str | None) -> str:
    """The queue whose workers a job of `device_class` wakes: `prefix` for any class, `prefix.CLASS`."""
    return f"{prefix}.{device_class}" if device_class else prefix


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)
        self.queue = settings.worker_queue

    def submit(self, job_id: str, device_class: str | None = None) -> None:
        try:
            self.celery.send_task(RUN_JOB, args=[job_id], queue=class_queue(self.queue, device_class))
        except Exception:  # broker down: the reconciler publishes the job again later; it is not lost
            log.exception("could not publish job %s to the broker", job_id)
